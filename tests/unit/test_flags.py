"""Flags: the RWF mapping, the mask, open flags -> request flags, Request.clone()."""

import os

import pytest

from backingfs.flags import BACKING_IOCB_MASK, IocbFlags, from_open_flags, to_rwf
from backingfs.request import Request


@pytest.mark.parametrize(
    ("flag", "rwf"),
    [
        (IocbFlags.APPEND, os.RWF_APPEND),
        (IocbFlags.DSYNC, os.RWF_DSYNC),
        (IocbFlags.SYNC, os.RWF_SYNC),
        (IocbFlags.HIPRI, os.RWF_HIPRI),
        (IocbFlags.NOWAIT, os.RWF_NOWAIT),
        (IocbFlags.DIRECT, 0),
        (IocbFlags.WRITE, 0),
    ],
)
def test_each_flag_maps_to_its_rwf(flag: IocbFlags, rwf: int) -> None:
    assert to_rwf(flag) == rwf


def test_stacked_only_flags_never_travel_down() -> None:
    every = IocbFlags(0)
    for f in IocbFlags:
        every |= f
    assert to_rwf(every) == (os.RWF_APPEND | os.RWF_DSYNC | os.RWF_SYNC | os.RWF_HIPRI
                             | os.RWF_NOWAIT)
    clone = Request("stacked", 7, every).clone("backing")
    assert not clone.flags & (IocbFlags.DIRECT | IocbFlags.WRITE)
    assert clone.flags == every & BACKING_IOCB_MASK


def test_from_open_flags() -> None:
    assert from_open_flags(os.O_WRONLY) == IocbFlags.NONE
    assert from_open_flags(os.O_WRONLY | os.O_APPEND) == IocbFlags.APPEND
    assert from_open_flags(os.O_DSYNC) == IocbFlags.DSYNC
    assert from_open_flags(os.O_SYNC) == IocbFlags.DSYNC | IocbFlags.SYNC
    assert from_open_flags(os.O_DIRECT) == IocbFlags.DIRECT


def test_clone_keeps_position_and_targets_backing_file() -> None:
    req = Request("stacked", 4096, IocbFlags.APPEND, complete=lambda r, n: None)
    clone = req.clone("backing", IocbFlags.DSYNC | IocbFlags.DIRECT)
    assert (clone.file, clone.pos, clone.flags) == ("backing", 4096, IocbFlags.DSYNC)
    assert clone.is_sync and not req.is_sync
    with pytest.raises(ValueError):
        Request("stacked", -1)
