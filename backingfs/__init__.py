"""backingfs: the shared backing-file layer, the userspace twin of the kernel's fs/backing-file.c.

Modules (one concept each):
    flags        IocbFlags, BACKING_IOCB_MASK, open-flags -> request flags -> os.RWF_*
    request      Request (the iocb): target file, position, flags, completion; clone()
    backing_file BackingFile: refcounted backing fd (get/put), never O_APPEND
    inflight     InFlight: in-flight request counts per handle/inode/mount, wait_drained()
    context      BackingFileCtx: accessed, end_write, credential policy, dropped flags
    workers      Workers: threads for blocking backing syscalls; never abandons work
    aio          BackingAio: one queued request, refcount 2, ordered completion
    rw           read_iter/write_iter (sync and queued) and the awaitable read/write helpers
    attrs        Attr (plain stat record), AttrCache (versioned size/mtime/ctime/mode)
"""
