"""allow_other and default_permissions as root, and new objects owned by the caller."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from ovl_layers import OvlLayers

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                       reason="needs root and setpriv"),
]

NOBODY = 65534


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *cmd], capture_output=True, text=True,
                          timeout=30)


def test_other_users_see_the_mount_and_permissions_apply(ovl_public: OvlLayers) -> None:
    ovl = ovl_public
    (ovl.lower1 / "public").write_text("hello")
    (ovl.lower1 / "secret").write_text("no")
    os.chmod(ovl.lower1 / "secret", 0o600)
    mnt = ovl.mount()
    r = as_nobody("cat", str(mnt / "public"))
    assert r.returncode == 0 and r.stdout == "hello", r.stderr
    r = as_nobody("cat", str(mnt / "secret"))
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_new_objects_belong_to_the_caller(ovl_public: OvlLayers) -> None:
    ovl = ovl_public
    (ovl.lower1 / "shared").mkdir()
    os.chmod(ovl.lower1 / "shared", 0o777)
    mnt = ovl.mount()
    d = mnt / "shared"
    r = as_nobody("sh", "-c", f"umask 022; echo x > {d}/file && mkdir {d}/dir && "
                              f"ln -s file {d}/sl && mkfifo {d}/fifo")
    assert r.returncode == 0, r.stderr
    for name, mode in (("file", 0o644), ("dir", 0o755), ("fifo", 0o644)):
        st = os.lstat(ovl.upper / "shared" / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
        assert st.st_mode & 0o7777 == mode, name
        assert os.lstat(d / name).st_uid == NOBODY
    assert os.lstat(ovl.upper / "shared" / "sl").st_uid == NOBODY
    # the copied-up parent keeps its lower owner and mode
    st = os.stat(ovl.upper / "shared")
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o777)
