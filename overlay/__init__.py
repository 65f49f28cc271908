"""overlay: an overlayfs-compatible union filesystem on backingfs (``backingfs-overlay``).

Semantics are the kernel overlayfs's (reference kernel-backing-and-overlay.md §B), on its
on-disk format, so an upper written here mounts under the kernel's overlayfs and the
reverse; the command line is fuse-overlayfs's (userspace-anchors.md §b).

Modules (one concept each, as fs/overlayfs/):

    cli.py        backingfs-overlay (+ __main__.py): argv -> OvlParams -> Superblock -> run
    params.py     option table (lowerdir, upperdir, workdir, userxattr, fsync, ...), verify
    superblock.py Superblock: open and validate layers (kernel rules), work/ dir, tables
    layers.py     Layer, LayerStack: layer root O_PATH fds, xino st_ino mapping
    entry.py      OvlInode: upper + lower backing objects of one inode, parent, locks
    namei.py      lookup through the layers: whiteouts, opaque dirs, persistent st_ino
    inode.py      getattr/setattr/access/readlink/xattrs/statfs, nlink, EROFS
    dir.py        create/tmpfile/mknod/mkdir/symlink/link/unlink/rmdir/rename, whiteouts
    file.py       open/read/write/fsync/release via backingfs.rw; handles follow copy-up
    readdir.py    merged listing: upper first, whiteouts/opaque, stable offsets, d_ino
    copyup.py     copy-up in work/ + one rename; parents first; once per inode
    protattr.py   chattr +i/+a of lower objects enforced (EPERM), kept as overlay.protattr
    whiteout.py   whiteout/opaque formats: char 0/0, xattr form, AUFS .wh. names
    xattrs.py     overlay-private xattr names, the overlay.overlay. escape, copy-up filter
    idmap.py      ownership options: uid/gid mapping, squash_to_*, owner/mode in xattrs
    ops.py        OverlayFs(fsapi.Filesystem): one-line handlers over the modules above

Inode numbers (st_ino == the FUSE node id == d_ino; one st_dev, the mount's):

- a lower object reports its own st_ino; an upper object without origin its own;
- layers on several filesystems: ``real_ino | fsid << 56`` (fsid 0 = upper's fs), the
  kernel's xino scheme, so numbers stay unique across layers and persistent;
- copy-up of a non-directory with one link records the st_ino it had in the xattr
  ``trusted.overlay.bfs.origin`` (``user.overlay.bfs.origin`` with userxattr), decimal
  ASCII; lookups of an upper non-directory report that number. It is under the
  overlay-private prefix, so the kernel's overlayfs neither shows nor copies it. We do not
  write the kernel's ``overlay.origin`` (a file handle + fs UUID) and do not decode it:
  a file the kernel copied up reports its upper st_ino here (the kernel reports the
  lower's);
- a merged directory reports its top lower directory's st_ino (what the kernel reports);
- copy-up of a hard-linked lower file breaks the link (no index, as the kernel without
  index=on): the copied name gets the upper's number, the others keep the lower one.
"""
