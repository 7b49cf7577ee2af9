"""Where an export goes: a local directory, S3-compatible object storage, an SFTP server.

All three write an object atomically (temporary name or multipart upload, then rename or
complete) so a reader never sees half an object under its final key, and all three can
read back and list what is there (verification). Keys are checked by names.check_key
before any write: nothing lands outside the destination root.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import os
import posixpath
import stat
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ..errors import BackendError, NotFound, PolicyError, UsageError
from .names import check_key

CHUNK = 1 << 20
PART_SIZE = 8 << 20
MAX_PARTS = 9000
PARTS_IN_FLIGHT = 3

# EU member states (ISO 3166-1 alpha-2) and cloud regions known to be inside the EU.
# Ambiguous names (AWS eu-west-2 is London, Outscale eu-west-2 is France) count as outside:
# declare the country with --region FR in that case.
EU_COUNTRIES = {"AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT",
                "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE"}
EU_REGIONS = {"eu-west-1", "eu-west-3", "eu-central-1", "eu-north-1", "eu-south-1", "eu-south-2",
              "fr-par", "nl-ams", "pl-waw", "gra", "sbg", "rbx", "de", "waw", "eu-west-par",
              "eu-west-gra", "eu-west-rbx", "eu-west-sbg", "eu-central-waw", "eu-fr-1", "fr-1"}


def region_in_eu(region: str | None) -> bool:
    if region == "local":  # the provider's own site, in France
        return True
    if not region:
        return False
    return region.upper() in EU_COUNTRIES or region.lower() in EU_REGIONS


@dataclass
class DestOptions:
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    profile_file: str | None = None
    ssh_key: str | None = None
    known_hosts: str | None = None
    jobs: int = 4


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Destination:
    kind = "?"
    max_key = 1024
    region: str | None = None

    @property
    def display(self) -> str:
        raise NotImplementedError

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def sync_writer(self, key: str):  # noqa: ANN201 (a LocalWriter or None)
        """A writer usable from a worker thread (local only), else None: use put()."""
        return None

    async def put(self, key: str, chunks: AsyncIterator[bytes], state: UploadState | None = None,
                  size_hint: int = 0) -> None:
        raise NotImplementedError

    async def put_bytes(self, key: str, data: bytes) -> None:
        async def one() -> AsyncIterator[bytes]:
            yield data
        await self.put(key, one())

    def read(self, key: str) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def list(self) -> dict[str, int]:
        raise NotImplementedError

    async def remove_partials(self) -> int:
        """Delete the temporary files a killed run left; the count. (S3 has none: an upload in
        flight is a multipart upload, resumed or aborted from the journal.)"""
        return 0


PARTIAL_PREFIX = ".kiwi-partial-"


class UploadState:
    """Resume state of one multipart upload, saved in the journal (S3 only)."""

    def __init__(self, load, save) -> None:  # noqa: ANN001
        self.load = load
        self.save = save


def parse_destination(url: str, opts: DestOptions) -> Destination:
    if url.startswith("s3://"):
        u = urlsplit(url)
        if not u.netloc:
            raise UsageError("s3:// destination needs a bucket: s3://bucket/prefix")
        return S3Destination(u.netloc, u.path.strip("/"), opts)
    if url.startswith("sftp://"):
        u = urlsplit(url)
        if not u.hostname:
            raise UsageError("sftp:// destination needs a host: sftp://user@host:port/path")
        path = unquote(u.path) or "/"
        if path.startswith("/~/"):
            path = path[3:] or "."
        return SFTPDestination(u.hostname, u.port or 22, u.username, path, opts)
    if "://" in url:
        raise UsageError(f"unsupported destination {url!r} (a directory, s3://bucket/prefix or sftp://user@host/path)")
    return LocalDestination(url)


# -- local directory ---------------------------------------------------------------------------------
def _tmp_name(name: str) -> str:
    return PARTIAL_PREFIX + hashlib.sha256(name.encode()).hexdigest()[:16]


class LocalWriter:
    """One object written from a worker thread: temporary file, then rename. Directories are
    opened one component at a time with O_NOFOLLOW, so a symlink planted in the destination
    cannot redirect a write outside it."""

    def __init__(self, root: str, key: str, dirs: _DirCache | None = None) -> None:
        parts = check_key(key, 4000).split("/")
        self.dfd = dirs.open(parts[:-1]) if dirs is not None else _open_dirs(root, parts[:-1])
        self.name = parts[-1]
        self.tmp = _tmp_name(self.name)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o644, dir_fd=self.dfd)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def commit(self) -> None:
        os.close(self.fd)
        self.fd = -1
        os.rename(self.tmp, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
        os.close(self.dfd)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            try:
                os.unlink(self.tmp, dir_fd=self.dfd)
            except FileNotFoundError:
                pass
            os.close(self.dfd)


def _open_dirs(root: str, parts: list[str]) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for p in parts:
            try:
                os.mkdir(p, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


class _DirCache:
    """Directories of a local destination already opened (component by component, O_NOFOLLOW):
    a writer gets a duplicate of its directory's descriptor instead of walking the path again
    (an export writes its files directory after directory)."""

    MAX = 256

    def __init__(self, root: str) -> None:
        self.root = root
        self.fds: dict[tuple[str, ...], int] = {}
        self.lock = threading.Lock()

    def open(self, parts: list[str]) -> int:
        key = tuple(parts)
        with self.lock:
            fd = self.fds.get(key)
            if fd is not None:
                return os.dup(fd)
        fd = _open_dirs(self.root, parts)
        with self.lock:
            if key not in self.fds:
                if len(self.fds) >= self.MAX:
                    os.close(self.fds.pop(next(iter(self.fds))))
                self.fds[key] = os.dup(fd)
        return fd

    def close(self) -> None:
        with self.lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()


class LocalDestination(Destination):
    kind = "local"
    region = "local"  # the provider's own site (in France, Art. 12)

    def __init__(self, path: str) -> None:
        self.root = os.path.abspath(path)
        self.max_key = 3800
        self._dirs = _DirCache(self.root)

    @property
    def display(self) -> str:
        return self.root

    async def start(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    def sync_writer(self, key: str) -> LocalWriter:
        return LocalWriter(self.root, key, self._dirs)

    async def close(self) -> None:
        self._dirs.close()

    async def put(self, key: str, chunks: AsyncIterator[bytes], state: UploadState | None = None,
                  size_hint: int = 0) -> None:
        w = await asyncio.to_thread(LocalWriter, self.root, key)
        try:
            async for c in chunks:
                await asyncio.to_thread(w.write, c)
            await asyncio.to_thread(w.commit)
        except BaseException:
            w.abort()
            raise

    async def read(self, key: str) -> AsyncIterator[bytes]:
        parts = check_key(key, 4000).split("/")
        try:
            dfd = _open_dirs_ro(self.root, parts[:-1])
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            finally:
                os.close(dfd)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None
        try:
            while True:
                data = await asyncio.to_thread(os.read, fd, CHUNK)
                if not data:
                    return
                yield data
        finally:
            os.close(fd)

    async def list(self) -> dict[str, int]:
        return await asyncio.to_thread(self._list)

    async def remove_partials(self) -> int:
        """Delete temporary files a killed run left (only ours: named .kiwi-partial-*)."""
        return await asyncio.to_thread(self._remove_partials)

    def _remove_partials(self) -> int:
        removed = 0
        for dirpath, _dirs, filenames in os.walk(os.fsencode(self.root)):  # never follows symlinks
            for name in filenames:
                if name.startswith(PARTIAL_PREFIX.encode()):
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
        return removed

    def _list(self) -> dict[str, int]:
        out: dict[str, int] = {}
        root = os.fsencode(self.root)
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                p = name if rel == b"." else rel + b"/" + name
                st = os.lstat(os.path.join(dirpath, name))
                out[p.decode("utf-8", "surrogateescape")] = st.st_size if stat.S_ISREG(st.st_mode) else -1
        return out


def _open_dirs_ro(root: str, parts: list[str]) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for p in parts:
            nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- S3-compatible --------------------------------------------------------------------------------------
def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _retryable_s3(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable")
    return True


class S3Destination(Destination):
    kind = "s3"

    def __init__(self, bucket: str, prefix: str, opts: DestOptions) -> None:
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.opts = opts
        self.region = opts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.max_key = 1024 - len(self.prefix.encode())
        endpoint = opts.endpoint_url or os.environ.get("S3_ENDPOINT_URL")
        if endpoint:
            u = urlsplit(endpoint)
            if u.scheme == "http" and not _is_loopback(u.hostname):
                raise PolicyError("plain http:// endpoints are refused (health data never crosses a network "
                                  "in clear); use https://, or http:// on loopback only")
            if u.scheme not in ("http", "https"):
                raise UsageError(f"invalid endpoint URL {endpoint!r}")
        self.endpoint = endpoint
        self._client = None
        self._ctx = None

    @property
    def display(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix.rstrip('/')}{where}"

    async def start(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import AioSession
        from botocore.exceptions import BotoCoreError, ClientError

        session = AioSession(profile=self.opts.profile)
        if self.opts.profile_file:
            session.set_config_variable("credentials_file", self.opts.profile_file)
            session.set_config_variable("config_file", self.opts.profile_file)
        # botocore >= 1.36 sends CRC checksums by default, which several S3-compatible stores
        # (Ceph over HTTPS) reject: only when an operation requires one. Parts carry Content-MD5.
        config = AioConfig(request_checksum_calculation="when_required",
                           response_checksum_validation="when_required",
                           retries={"max_attempts": 3, "mode": "standard"},
                           max_pool_connections=max(10, self.opts.jobs * (PARTS_IN_FLIGHT + 1)),
                           s3={"addressing_style": "path"}, connect_timeout=10, read_timeout=120)
        self._ctx = session.create_client("s3", endpoint_url=self.endpoint, region_name=self.region or "us-east-1",
                                          config=config)
        self._client = await self._ctx.__aenter__()
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            await self.close()
            raise NotFound(f"bucket {self.bucket!r}: {exc.response.get('Error', {}).get('Code', exc)}") from None
        except BotoCoreError as exc:
            await self.close()
            raise BackendError(f"{self.display}: {exc}") from None

    async def close(self) -> None:
        if self._ctx is not None:
            await self._ctx.__aexit__(None, None, None)
            self._ctx = self._client = None

    def _part_size(self, size_hint: int) -> int:
        size = PART_SIZE
        while size_hint and size_hint / size > MAX_PARTS:
            size *= 2
        return size

    async def put(self, key: str, chunks: AsyncIterator[bytes], state: UploadState | None = None,
                  size_hint: int = 0) -> None:
        from botocore.exceptions import ClientError

        k = self.prefix + check_key(key, self.max_key)
        saved = state.load() if state else None
        part_size = saved["part_size"] if saved else self._part_size(size_hint)
        buf = bytearray()
        upload: dict | None = None
        tasks: set[asyncio.Task] = set()
        try:
            async for c in chunks:
                buf += c
                while len(buf) >= part_size:
                    data = bytes(buf[:part_size])
                    del buf[:part_size]
                    if upload is None:
                        upload = await self._begin(k, saved, part_size, state)
                    n = upload["next"]
                    upload["next"] += 1
                    while len(tasks) >= PARTS_IN_FLIGHT:
                        done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                        for t in done:
                            t.result()
                    tasks.add(asyncio.create_task(self._part(k, upload, n, data, state)))
            if upload is None:
                await _retry(lambda: self._client.put_object(Bucket=self.bucket, Key=k, Body=bytes(buf),
                                                             ContentMD5=_md5_b64(bytes(buf))), _retryable_s3)
                return
            if buf:
                n = upload["next"]
                upload["next"] += 1
                tasks.add(asyncio.create_task(self._part(k, upload, n, bytes(buf), state)))
            if tasks:
                await asyncio.gather(*tasks)
                tasks = set()
            parts = [{"PartNumber": int(n), "ETag": p[0]} for n, p in sorted(upload["parts"].items(), key=lambda x: int(x[0]))
                     if int(n) < upload["next"]]
            try:
                # Ceph 16 answers with an empty ETag here: never relied upon (verify re-reads).
                await _retry(lambda: self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=k, UploadId=upload["id"], MultipartUpload={"Parts": parts}), _retryable_s3)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchUpload", "InvalidPart", "InvalidPartOrder"):
                    if state:
                        state.save(None)  # start over next attempt
                    raise BackendError(f"{key}: multipart upload lost ({exc}); retrying from the start") from None
                raise
            if state:
                state.save(None)
        finally:
            for t in tasks:
                t.cancel()

    async def _begin(self, k: str, saved: dict | None, part_size: int, state: UploadState | None) -> dict:
        if saved and saved.get("key_sha") == hashlib.sha256(k.encode()).hexdigest():
            return {"id": saved["upload_id"], "parts": dict(saved["parts"]), "next": 1, "part_size": part_size}
        r = await _retry(lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=k), _retryable_s3)
        up = {"id": r["UploadId"], "parts": {}, "next": 1, "part_size": part_size}
        if state:
            state.save({"upload_id": up["id"], "part_size": part_size, "parts": {},
                        "key_sha": hashlib.sha256(k.encode()).hexdigest()})
        return up

    async def _part(self, k: str, upload: dict, n: int, data: bytes, state: UploadState | None) -> None:
        md5 = _md5_b64(data)
        have = upload["parts"].get(str(n))
        if have and have[1] == md5 and have[2] == len(data):
            return  # sent by an earlier run: not sent again
        from botocore.exceptions import ClientError

        try:
            r = await _retry(lambda: self._client.upload_part(Bucket=self.bucket, Key=k, UploadId=upload["id"],
                                                              PartNumber=n, Body=data, ContentMD5=md5), _retryable_s3)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchUpload" and state:
                state.save(None)  # the server dropped it: the next attempt starts a new upload
            raise
        upload["parts"][str(n)] = [r["ETag"], md5, len(data)]
        if state:
            state.save({"upload_id": upload["id"], "part_size": upload["part_size"], "parts": upload["parts"],
                        "key_sha": hashlib.sha256(k.encode()).hexdigest()})

    async def read(self, key: str) -> AsyncIterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            r = await self._client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise NotFound(key) from None
            raise
        async with r["Body"] as body:
            while True:
                data = await body.read(CHUNK)
                if not data:
                    return
                yield data

    async def list(self) -> dict[str, int]:
        out: dict[str, int] = {}
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        async for page in pages:
            for obj in page.get("Contents", []):
                out[obj["Key"][len(self.prefix):]] = obj["Size"]
        return out


# -- SFTP ---------------------------------------------------------------------------------------------------
class SFTPDestination(Destination):
    kind = "sftp"
    max_key = 3800

    def __init__(self, host: str, port: int, user: str | None, path: str, opts: DestOptions) -> None:
        self.host, self.port, self.user, self.root, self.opts = host, port, user, path.rstrip("/") or "/", opts
        self.region = opts.region
        self._conn = None
        self._sftp = None
        self._dirs: set[str] = set()

    @property
    def display(self) -> str:
        who = f"{self.user}@" if self.user else ""
        return f"sftp://{who}{self.host}:{self.port}{self.root if self.root.startswith('/') else '/~/' + self.root}"

    async def start(self) -> None:
        import asyncssh

        kw: dict = {"port": self.port, "username": self.user}
        if self.opts.ssh_key:
            kw["client_keys"] = [self.opts.ssh_key]
        if self.opts.known_hosts:
            kw["known_hosts"] = self.opts.known_hosts  # host key always checked (default ~/.ssh/known_hosts)
        try:
            self._conn = await asyncssh.connect(self.host, **kw)
            self._sftp = await self._conn.start_sftp_client()
            await self._sftp.makedirs(self.root, exist_ok=True)
        except (OSError, asyncssh.Error) as exc:
            await self.close()
            raise BackendError(f"{self.display}: {exc}") from None

    async def close(self) -> None:
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = None

    def _path(self, key: str) -> str:
        return posixpath.join(self.root, check_key(key, self.max_key))

    async def _mkdirs(self, d: str) -> None:
        if d not in self._dirs:
            await self._sftp.makedirs(d, exist_ok=True)
            self._dirs.add(d)

    async def put(self, key: str, chunks: AsyncIterator[bytes], state: UploadState | None = None,
                  size_hint: int = 0) -> None:
        path = self._path(key)
        d, name = posixpath.split(path)
        await self._mkdirs(d)
        tmp = posixpath.join(d, _tmp_name(name))
        try:
            async with self._sftp.open(tmp, "wb") as f:
                async for c in chunks:
                    await f.write(c)
            await self._sftp.posix_rename(tmp, path)
        except BaseException:
            try:  # best effort: a connection that broke cannot remove it (the resume does)
                await asyncio.shield(self._sftp.remove(tmp))
            except BaseException:  # noqa: BLE001 (the write's error is the one reported)
                pass
            raise

    async def remove_partials(self) -> int:
        removed = 0
        for key in await self.list():
            if posixpath.basename(key).startswith(PARTIAL_PREFIX):
                await self._sftp.remove(posixpath.join(self.root, key))
                removed += 1
        return removed

    async def read(self, key: str) -> AsyncIterator[bytes]:
        import asyncssh

        try:
            f = await self._sftp.open(self._path(key), "rb")
        except asyncssh.SFTPNoSuchFile:
            raise NotFound(key) from None
        async with f:
            while True:
                data = await f.read(CHUNK)
                if not data:
                    return
                yield data

    async def list(self) -> dict[str, int]:
        import asyncssh

        out: dict[str, int] = {}

        async def walk(d: str, rel: str) -> None:
            for e in await self._sftp.readdir(d):
                if e.filename in (".", ".."):
                    continue
                r = f"{rel}/{e.filename}" if rel else e.filename
                if e.attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                    await walk(posixpath.join(d, e.filename), r)
                else:
                    out[r] = e.attrs.size if e.attrs.type == asyncssh.FILEXFER_TYPE_REGULAR else -1
        await walk(self.root, "")
        return out


# -- retries ----------------------------------------------------------------------------------------------
RETRY_DELAYS = (0.5, 1, 2, 4, 8, 15, 15, 15)


async def _retry(call, retryable) -> object:  # noqa: ANN001
    """CALL (a coroutine factory) with exponential backoff on transient failures."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if delay is None or not retryable(exc):
                raise
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
