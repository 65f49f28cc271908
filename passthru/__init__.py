"""passthru: a FUSE passthrough filesystem mirroring one SOURCE directory, on backingfs.

``backingfs-passthru [-f] [-d] [-o OPTS] SOURCE MOUNTPOINT`` (or ``python -m passthru``).

Cache modes (``-o cache=``; ``timeout=SEC`` overrides the timeouts):
    never   entry/attr timeouts 0, no keep_cache: a change made in SOURCE behind the mount
            is seen by the next access. Every access costs a request.
    auto    1 s timeouts (default): SOURCE changes are seen within a second; the kernel
            drops cached file data when it sees mtime or size change.
    always  86400 s timeouts and keep_cache: fastest, for a SOURCE that changes only
            through the mount; changes behind it may stay invisible for a day.
Negative entries (a name that does not exist) are cached for the same timeout.

``-o writeback`` lets the kernel cache writes and send them in large batches. Files opened
write-only are then opened read-write on the backing side (the kernel reads partial
pages), O_APPEND is placed by the kernel, and a change of a file's size in SOURCE during a
write may be overwritten by the kernel's idea of it.

Permissions: ``default_permissions`` is always on. The daemon makes every backing syscall
as itself (root), so the kernel checks the caller against the stacked attributes; new
objects are then given the caller's uid/gid. The daemon runs with umask 0 and creates
objects with the mode the kernel computed for the caller.

FLUSH (every close(2)) closes a duplicate of the backing fd only when SOURCE is on a
network or FUSE filesystem, whose close may report write errors; on a local SOURCE the
first FLUSH answers ENOSYS and the kernel stops sending it (one round trip per close).

Statistics: SIGUSR1 logs ``statistics: {'inodes': ..., 'lookups': ..., 'handles': ...,
'in_flight': ...}`` (``PassthruFs.statistics``); after ``echo 2 > /proc/sys/vm/drop_caches``
the kernel forgets its inodes and ``inodes`` falls back to 1 (the root).

POSIX ACLs are enforced by the kernel (FUSE_POSIX_ACL) unless ``noacl``; default ACLs of
SOURCE directories are inherited by SOURCE's filesystem, and the umask applied only where
none is (``dir.made_mode``). On the native session, read and write of a file opened
without writeback cache go straight to the backing file (kernel passthrough,
``backingfs.passthrough``); otherwise through the daemon (``backingfs.rw``).

Limits: file locks are local to the mount; ``fcntl(F_SETFL, O_APPEND)`` after open is not
seen; SOURCE itself must not be replaced while mounted; O_TMPFILE needs the native session
(pyfuse3: EOPNOTSUPP).

Modules: cli (argv, errors), params (option table), superblock (PassthruFs: state and
operation table), inode (lookup, attributes, xattrs, access, statfs), dir (namespace
operations), file (open files and I/O), readdir (directory handles).
"""
