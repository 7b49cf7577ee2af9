#!/usr/bin/env python3
"""Minimal read-only pyfuse3 passthrough filesystem.

Purpose: measure the FUSE + Python (pyfuse3/trio) overhead ceiling. Every read
is served by os.pread() on the underlying file, so anything a real restore
service adds (decryption, decompression, chunk lookup) comes on top of this.

Usage: ptfs.py SOURCE_DIR MOUNTPOINT [--timeout 300] [--no-keep-cache]
Runs in the foreground until unmounted (fusermount3 -u MOUNTPOINT).
"""
import argparse
import errno
import itertools
import os

import pyfuse3
import trio

FUSEError = pyfuse3.FUSEError


class Passthrough(pyfuse3.Operations):
    def __init__(self, root: bytes, timeout: float, keep_cache: bool):
        super().__init__()
        self.root = root
        self.timeout = timeout
        self.keep_cache = keep_cache
        self.paths = {pyfuse3.ROOT_INODE: root}   # inode -> path (bytes)
        self.root_ino = os.lstat(root).st_ino
        self.dirs = {}                             # dir handle -> [(name, stat)]
        self.dh = itertools.count(1)

    # -- helpers ---------------------------------------------------------
    def _path(self, ino):
        try:
            return self.paths[ino]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def _ino(self, st, path):
        ino = st.st_ino
        if ino == self.root_ino:
            return pyfuse3.ROOT_INODE
        if ino == pyfuse3.ROOT_INODE:  # extremely unlikely on ext4; remap
            ino = 1 << 62
        self.paths[ino] = path
        return ino

    def _attr(self, st, ino):
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    @staticmethod
    def _lstat(path):
        try:
            return os.lstat(path)
        except OSError as exc:
            raise FUSEError(exc.errno) from None

    # -- metadata --------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx=None):
        path = os.path.join(self._path(parent_inode), name)
        st = self._lstat(path)
        return self._attr(st, self._ino(st, path))

    async def getattr(self, inode, ctx=None):
        return self._attr(self._lstat(self._path(inode)), inode)

    async def readlink(self, inode, ctx):
        try:
            return os.readlink(self._path(inode))
        except OSError as exc:
            raise FUSEError(exc.errno) from None

    async def forget(self, inode_list):
        pass  # keep the inode->path map; the snapshot is immutable

    async def statfs(self, ctx):
        sv = os.statvfs(self.root)
        s = pyfuse3.StatvfsData()
        for a in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                  "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(s, a, getattr(sv, a))
        return s

    # -- directories -----------------------------------------------------
    async def opendir(self, inode, ctx):
        path = self._path(inode)
        entries = []
        try:
            with os.scandir(path) as it:
                for de in it:
                    entries.append((de.name, de.stat(follow_symlinks=False)))
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        entries.sort()
        fh = next(self.dh)
        self.dirs[fh] = (path, entries)
        return fh

    async def readdir(self, fh, start_id, token):
        path, entries = self.dirs[fh]
        for i in range(start_id, len(entries)):
            name, st = entries[i]
            ino = self._ino(st, os.path.join(path, name))
            if not pyfuse3.readdir_reply(token, name, self._attr(st, ino), i + 1):
                break

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    # -- files -----------------------------------------------------------
    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
            raise FUSEError(errno.EROFS)
        try:
            fd = os.open(self._path(inode), os.O_RDONLY)
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        return pyfuse3.FileInfo(fh=fd, keep_cache=self.keep_cache)

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def release(self, fh):
        os.close(fh)

    async def access(self, inode, mode, ctx):
        if mode & os.W_OK:
            raise FUSEError(errno.EROFS)
        return True


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("source")
    ap.add_argument("mountpoint")
    ap.add_argument("--timeout", type=float, default=300.0, help="entry/attr timeout (s)")
    ap.add_argument("--no-keep-cache", action="store_true")
    a = ap.parse_args()
    ops = Passthrough(os.fsencode(os.path.abspath(a.source)), a.timeout, not a.no_keep_cache)
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=ptfs", "ro"}
    pyfuse3.init(ops, a.mountpoint, opts)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
