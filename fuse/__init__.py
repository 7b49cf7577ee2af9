"""The FUSE browse view: any snapshot of a contract as a read-only file system.

Installed as ``kiwi_restore.fuse``. Modules, one responsibility each (like restic's
``internal/fuse``):

    layout   which snapshots are shown and under which names (pure)
    inodes   a compact inode table (no per-entry objects, no hashing)
    dirs     a directory's entries as flat columns, decoded straight from its tree
    blobs    decrypted-chunk cache, single-flight fetches, pack-grouped prefetch,
             pushes into the kernel's page cache
    fs       the pyfuse3 Operations (lookup, readdir, read, xattrs...), all guarded
    audit    the session's audit records, written by a thread in batches
    daemon   the mount session: mount, detach, signals, unmount
    cli      the click commands ``mount`` and ``umount``

Nothing here is imported by ``kiwi-restore --help``; pyfuse3 and trio load only when a
mount starts. User guide: docs/MOUNT.md.
"""
