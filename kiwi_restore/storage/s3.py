"""S3-compatible object storage backend (Ceph RGW, MinIO, AWS, OVH, Scaleway...) over botocore.

Location URL (one string, so kiwi.json `locations` stays a flat name -> URL map):

    s3://BUCKET[/PREFIX]?endpoint=https://rgw.example:443&region=eu-west-3
        &profile=NAME&credentials_file=/etc/kiwi-restore/s3.ini&ca_bundle=/etc/ssl/rgw-ca.pem
        &max_connections=16&max_attempts=8&connect_timeout=10&read_timeout=60
        &multipart_threshold=64MiB&part_size=16MiB&page_size=1000&addressing=path|virtual|auto
        &conditional=auto|if-none-match|head

Every parameter is optional. Credentials are never in the URL: they come from the
named profile of an AWS-style credentials file, or from botocore's usual chain
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials...).
TLS is always verified (against `ca_bundle` when given); plain http:// is accepted only
for a loopback endpoint (tests, a local RGW behind a TLS-terminating proxy on the host).

Integrity: every object is an AEAD-sealed blob checked by the repository on read, so the
checksums S3 servers compute or skip (Ceph 16 has no flexible checksums) change nothing
for us. We still send Content-MD5, which both Ceph and AWS verify, so a body damaged in
transit is refused at write time instead of discovered at restore time.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import botocore.session
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from ..errors import BackendError, NotFound, ObjectExists, UsageError
from .base import Backend, ObjectInfo

log = logging.getLogger("kiwi_restore.storage.s3")
T = TypeVar("T")

MiB = 1 << 20
MIN_PART = 5 * MiB  # S3 (and RGW, moto) refuse a non-final part below 5 MiB: EntityTooSmall
MAX_PARTS = 10_000
KNOWN_PARAMS = {"endpoint", "region", "profile", "credentials_file", "ca_bundle", "max_connections",
                "max_attempts", "connect_timeout", "read_timeout", "multipart_threshold", "part_size",
                "page_size", "addressing", "conditional"}
# Errors of a response body cut mid-stream: botocore's own retries do not cover the body.
_STREAM_ERRORS = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError,
                  EndpointConnectionError, Urllib3HTTPError, ConnectionError)


def _size(text: str) -> int:
    t = text.strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult != 1 else t) * mult)
    except ValueError:
        raise UsageError(f"invalid size {text!r} in an s3:// location (e.g. 64MiB)") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _md5_b64(data: bytes | memoryview) -> tuple[str, bytes]:
    digest = hashlib.md5(data, usedforsecurity=False).digest()
    return base64.b64encode(digest).decode(), digest


class S3Backend(Backend):
    """One bucket (and key prefix) on an S3-compatible server. Thread-safe, blocking."""

    remote = True

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 region: str | None = None, profile: str | None = None, credentials_file: str | None = None,
                 ca_bundle: str | None = None, max_connections: int = 16, max_attempts: int = 8,
                 connect_timeout: float = 10, read_timeout: float = 60, multipart_threshold: int = 64 * MiB,
                 part_size: int = 16 * MiB, page_size: int = 1000, addressing: str | None = None,
                 conditional: str = "auto") -> None:
        if not bucket:
            raise UsageError("an s3:// location needs a bucket: s3://BUCKET[/PREFIX]")
        if part_size < MIN_PART:
            raise UsageError(f"part_size must be at least 5MiB (S3 refuses smaller parts), not {part_size}")
        if conditional not in ("auto", "if-none-match", "head"):
            raise UsageError(f"conditional must be auto, if-none-match or head, not {conditional!r}")
        if endpoint:
            ep = urlsplit(endpoint)
            if ep.scheme not in ("http", "https") or not ep.hostname:
                raise UsageError(f"invalid S3 endpoint {endpoint!r} (expected https://HOST[:PORT])")
            if ep.scheme == "http" and not _is_loopback(ep.hostname):
                raise UsageError(f"refusing plain http:// to {ep.hostname}: data and credentials would cross the "
                                 "network unencrypted; use https:// (http:// is accepted on loopback only)")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        self.multipart_threshold = max(multipart_threshold, MIN_PART)
        self.part_size = part_size
        self.page_size = max(1, min(page_size, 1000))
        self.max_attempts = max(1, max_attempts)
        self.conditional = conditional
        # None until the first put tells us whether If-None-Match is honoured on PutObject.
        self._if_none_match: bool | None = {"auto": None, "if-none-match": True, "head": False}[conditional]
        q = {"endpoint": endpoint, "region": region, "profile": profile}
        query = "&".join(f"{k}={quote(v, safe=':/')}" for k, v in q.items() if v)
        self.url = f"s3://{bucket}/{self.prefix.rstrip('/')}" + (f"?{query}" if query else "")

        session = botocore.session.Session(profile=profile) if profile else botocore.session.Session()
        if credentials_file:
            session.set_config_variable("credentials_file", credentials_file)
        config = Config(
            region_name=region or session.get_config_variable("region") or "us-east-1",
            # Ceph 16 over HTTPS answers MissingContentLength to aws-chunked bodies with trailing
            # checksums (botocore's default since 1.36); the AEAD authenticates everything anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": self.max_attempts},  # 5xx, throttling, resets
            max_pool_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            tcp_keepalive=True,
            s3={"addressing_style": addressing or ("path" if endpoint else "auto")},
        )
        try:
            self.client = session.create_client("s3", endpoint_url=endpoint, config=config,
                                                verify=ca_bundle if ca_bundle else True)
        except BotoCoreError as exc:
            raise UsageError(f"cannot set up the S3 client for {self.url}: {exc}") from None
        # urllib3 opens extra connections (and throws them away) once the pool is exhausted;
        # bounding requests in flight keeps memory and sockets bounded under many threads.
        self._slots = threading.BoundedSemaphore(max_connections)
        self._direct = _DirectGet.create(session, self.client, endpoint, bucket, addressing, ca_bundle,
                                         max_connections, connect_timeout, read_timeout)
        self._parts_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> S3Backend:
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise UsageError(f"not an s3:// URL: {url!r}")
        params: dict[str, Any] = {}
        for k, vals in parse_qs(parts.query, keep_blank_values=True).items():
            if k not in KNOWN_PARAMS:
                raise UsageError(f"unknown parameter {k!r} in {url!r} (known: {', '.join(sorted(KNOWN_PARAMS))})")
            params[k] = vals[-1]
        for k in ("max_connections", "max_attempts", "page_size"):
            if k in params:
                params[k] = int(params[k])
        for k in ("connect_timeout", "read_timeout"):
            if k in params:
                params[k] = float(params[k])
        for k in ("multipart_threshold", "part_size"):
            if k in params:
                params[k] = _size(params[k])
        return cls(parts.netloc, parts.path, **params)

    # -- plumbing --------------------------------------------------------------
    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or "\0" in key or any(p in ("", ".", "..") for p in key.split("/")):
            raise ValueError(f"invalid storage key {key!r}")
        return self.prefix + key

    def _call(self, what: str, key: str, fn: Callable[..., T], **kw: Any) -> T:
        """One API call in a bounded slot; S3 errors become the Backend's errors."""
        with self._slots:
            try:
                return fn(Bucket=self.bucket, **kw)
            except ClientError as exc:
                raise self._translate(exc, what, key) from None
            except BotoCoreError as exc:
                raise BackendError(f"{what} {key} on {self.url} failed after {self.max_attempts} attempts: {exc}") from None

    def _translate(self, exc: ClientError, what: str, key: str) -> Exception:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound") and what != "list":
            return NotFound(f"object {key} is missing from {self.url}")
        if code == "NoSuchBucket":
            return BackendError(f"bucket {self.bucket!r} does not exist on {self.endpoint or 'S3'} "
                                f"(create it, or check the location {self.url})")
        if code in ("PreconditionFailed", "412") or status == 412:
            return ObjectExists(f"object {key} already exists in {self.url}")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or status == 403:
            return BackendError(f"{what} {key}: access denied by {self.url} ({code}); check the credentials "
                                "and the bucket policy (docs/DEPLOYMENT.md lists what each command needs)")
        return BackendError(f"{what} {key} on {self.url} failed: {code or status} {err.get('Message') or ''}".rstrip())

    def _read_body(self, what: str, key: str, **kw: Any) -> bytes:
        """GetObject and read its body, retrying a body cut mid-stream (botocore retries only
        the request, not the streaming read)."""
        if self._direct is not None:
            with self._slots:
                data = self._direct.get(kw["Key"], kw.get("Range"))
            if data is not None:
                return data
        for attempt in range(1, self.max_attempts + 1):
            with self._slots:
                try:
                    resp = self.client.get_object(Bucket=self.bucket, **kw)
                    body = resp["Body"]
                    try:
                        data = body.read()
                    finally:
                        body.close()
                    expected = resp.get("ContentLength")
                    if expected is not None and len(data) != expected:
                        raise IncompleteReadError(actual_bytes=len(data), expected_bytes=expected)
                    return data
                except ClientError as exc:
                    raise self._translate(exc, what, key) from None
                except _STREAM_ERRORS as exc:
                    if attempt == self.max_attempts:
                        raise BackendError(f"{what} {key} on {self.url} failed after {attempt} attempts: {exc}") from None
                    log.warning("%s %s on %s: %s; retrying", what, key, self.url, exc)
                except BotoCoreError as exc:
                    raise BackendError(f"{what} {key} on {self.url} failed after {self.max_attempts} attempts: {exc}") from None
            time.sleep(min(20.0, 0.2 * 2 ** attempt) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    # -- Backend -----------------------------------------------------------------
    def get(self, key: str) -> bytes:
        return self._read_body("get", key, Key=self._key(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if length == 0:
            if not self.exists(key):
                raise NotFound(f"object {key} is missing from {self.url}")
            return b""
        try:
            data = self._read_body("get", key, Key=self._key(key), Range=f"bytes={offset}-{offset + length - 1}")
        except BackendError as exc:
            if "InvalidRange" in str(exc):
                raise BackendError(f"short read of {key} at {offset}: the object ends before") from None
            raise
        if len(data) != length:
            raise BackendError(f"short read of {key} at {offset}: {len(data)} of {length} bytes")
        return data

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Key=self._key(key))
            return True
        except NotFound:
            return False

    def size(self, key: str) -> int:
        return int(self._call("head", key, self.client.head_object, Key=self._key(key))["ContentLength"])

    def put(self, key: str, data: bytes) -> None:
        skey = self._key(key)
        if len(data) > self.multipart_threshold:
            self._put_multipart(key, skey, data)
            return
        md5, _ = _md5_b64(data)
        if self._if_none_match is False:
            # HEAD-then-PUT: two writers of the SAME key between the HEAD and the PUT would both
            # succeed (last wins). Our keys are random 256-bit ids written once, except `config`
            # (written at contract creation under the registry lock), so the race needs a
            # misbehaving second writer; servers honouring If-None-Match close it.
            if self.exists(key):
                raise ObjectExists(f"object {key} already exists in {self.url}")
            self._call("put", key, self.client.put_object, Key=skey, Body=data, ContentMD5=md5)
            return
        try:
            with self._slots:
                self.client.put_object(Bucket=self.bucket, Key=skey, Body=data, ContentMD5=md5, IfNoneMatch="*")
            self._if_none_match = True
        except ClientError as exc:
            err = self._translate(exc, "put", key)
            meta = exc.response.get("ResponseMetadata", {})
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if isinstance(err, ObjectExists):
                # A retried PUT whose first attempt landed (response lost) meets its own object:
                # that is success, not a clash. Compare bytes to be sure.
                if meta.get("RetryAttempts", 0) and self._same(key, data):
                    return
                raise err from None
            if code in ("NotImplemented", "501") and self._if_none_match is None:
                log.warning("%s does not support conditional PUT (If-None-Match); falling back to "
                            "HEAD-then-PUT (see docs/DEPLOYMENT.md on the race)", self.url)
                self._if_none_match = False
                self.put(key, data)
                return
            raise err from None
        except BotoCoreError as exc:
            raise BackendError(f"put {key} on {self.url} failed after {self.max_attempts} attempts: {exc}") from None

    def _same(self, key: str, data: bytes) -> bool:
        try:
            return self.get(key) == data
        except NotFound:
            return False

    def _pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._parts_pool is None:
                self._parts_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="s3-part")
            return self._parts_pool

    def _put_multipart(self, key: str, skey: str, data: bytes) -> None:
        # CompleteMultipartUpload's If-None-Match is honoured by AWS and moto but IGNORED by
        # Ceph 16 (measured): HEAD first, send it anyway, and HEAD again just before completing.
        if self.exists(key):
            raise ObjectExists(f"object {key} already exists in {self.url}")
        part_size = max(self.part_size, -(-len(data) // MAX_PARTS))
        view = memoryview(data)
        chunks = [view[i:i + part_size] for i in range(0, len(data), part_size)]
        upload_id = self._call("put", key, self.client.create_multipart_upload, Key=skey)["UploadId"]
        try:
            def upload(n: int) -> tuple[str, bytes]:
                md5, digest = _md5_b64(chunks[n])
                r = self._call("put", key, self.client.upload_part, Key=skey, UploadId=upload_id,
                               PartNumber=n + 1, Body=bytes(chunks[n]), ContentMD5=md5)
                return r["ETag"], digest

            results = list(self._pool().map(upload, range(len(chunks))))
            if self.exists(key):
                raise ObjectExists(f"object {key} already exists in {self.url}")
            parts = [{"PartNumber": i + 1, "ETag": etag} for i, (etag, _) in enumerate(results)]
            kw: dict[str, Any] = {"IfNoneMatch": "*"} if self._if_none_match is not False else {}
            self._call("put", key, self.client.complete_multipart_upload, Key=skey, UploadId=upload_id,
                       MultipartUpload={"Parts": parts}, **kw)
        except BaseException:
            try:
                self._call("put", key, self.client.abort_multipart_upload, Key=skey, UploadId=upload_id)
            except Exception as exc:  # the bucket's lifecycle rule cleans what we cannot
                log.warning("could not abort multipart upload of %s: %s", key, exc)
            raise
        # Never trust Complete's ETag (Ceph 16 returns an empty one): HEAD and compare with the
        # multipart ETag we expect, md5(concat(part md5s))-N, and the size.
        head = self._call("head", key, self.client.head_object, Key=skey)
        expected = hashlib.md5(b"".join(d for _, d in results), usedforsecurity=False).hexdigest() + f"-{len(results)}"
        etag = str(head.get("ETag", "")).strip('"')
        if int(head["ContentLength"]) != len(data) or (etag and "-" in etag and etag != expected):
            raise BackendError(f"put {key} on {self.url}: the stored object does not match what was uploaded "
                               f"(size {head['ContentLength']} of {len(data)}, ETag {etag} vs {expected})")

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        token: str | None = None
        full = self.prefix + prefix
        while True:
            kw: dict[str, Any] = {"Prefix": full, "MaxKeys": self.page_size}
            if token:
                kw["ContinuationToken"] = token
            page = self._call("list", prefix, self.client.list_objects_v2, **kw)
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][len(self.prefix):], int(obj["Size"]))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token:
                raise BackendError(f"list {prefix} on {self.url}: truncated page without a continuation token")

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Key=self._key(key))

    def delete_many(self, keys: Iterable[str]) -> None:
        """DeleteObjects in batches of 1000 (S3's limit); any per-key error is raised."""
        batch: list[str] = []
        for key in keys:
            batch.append(self._key(key))
            if len(batch) == 1000:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, skeys: list[str]) -> None:
        objects = [{"Key": k} for k in skeys]
        # DeleteObjects requires Content-MD5 (or a flexible checksum) on AWS and Ceph.
        r = self._call("delete", skeys[0][len(self.prefix):], self.client.delete_objects,
                       Delete={"Objects": objects, "Quiet": True})
        errors = [e for e in r.get("Errors", []) if e.get("Code") != "NoSuchKey"]
        if errors:
            e = errors[0]
            raise BackendError(f"delete of {len(errors)} objects on {self.url} failed, first "
                               f"{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}")

    # -- administration ------------------------------------------------------------
    def create_bucket(self) -> bool:
        """Create the bucket if it does not exist; True if created."""
        try:
            self._call("create bucket", self.bucket, self.client.head_bucket)
            return False
        except (NotFound, BackendError):
            pass
        self._call("create bucket", self.bucket, self.client.create_bucket)
        return True

    def check_access(self) -> None:
        """One cheap listing: raises a clear BackendError when the location is unusable."""
        for _ in self.list(""):
            break

    def close(self) -> None:
        with self._pool_lock:
            pool, self._parts_pool = self._parts_pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        if self._direct is not None:
            self._direct.close()
        self.client.close()


class _DirectGet:
    """GetObject signed by botocore and sent on a botocore HTTP session, without the client's
    per-call machinery (parameter validation, endpoint rules, event hooks, response parsing).

    That machinery costs about 2 of the 3 ms of CPU a GET takes here, and a mount reading
    over S3 makes hundreds of GETs per GiB. Only a plain success is answered this way: any
    other status or a connection error returns None, and the caller asks again through the
    client, which retries, follows redirects and turns S3 errors into ours. Used for
    path-style endpoints (Ceph RGW, MinIO...), where the object's URL is known without the
    endpoint rules."""

    PAUSE = 30.0  # after a connection error, this long through the client only

    def __init__(self, base_url: str, credentials: Any, region: str, http: Any) -> None:
        self.base_url = base_url
        self.credentials = credentials
        self.region = region
        self.http = http
        self.requests = 0  # answered here (tests check the path is taken)
        self.fallbacks = 0  # handed back to the client
        # a server that is down or stalls would otherwise cost a timeout here before every
        # request the client then retries with its own backoff
        self._paused_until = 0.0

    @classmethod
    def create(cls, session: Any, client: Any, endpoint: str | None, bucket: str, addressing: str | None,
               ca_bundle: str | None, max_connections: int, connect_timeout: float,
               read_timeout: float) -> _DirectGet | None:
        if not endpoint or addressing not in (None, "path"):
            return None  # AWS itself or virtual-hosted buckets: the client knows the URL
        try:
            from botocore.httpsession import URLLib3Session
            from botocore.utils import get_environ_proxies
            from urllib3.connection import HTTPConnection

            credentials = session.get_credentials()
            if credentials is None:
                return None
            http = URLLib3Session(verify=ca_bundle if ca_bundle else True, proxies=get_environ_proxies(endpoint),
                                  timeout=(connect_timeout, read_timeout), max_pool_connections=max_connections,
                                  socket_options=[*HTTPConnection.default_socket_options,
                                                  (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)])
        except Exception as exc:  # an older or newer botocore: the client alone is slower, not wrong
            log.debug("direct GET unavailable: %s", exc)
            return None
        return cls(f"{endpoint.rstrip('/')}/{quote(bucket, safe='')}/", credentials,
                   client.meta.region_name, http)

    def get(self, skey: str, byte_range: str | None) -> bytes | None:
        if self._paused_until and time.monotonic() < self._paused_until:
            return None
        req = AWSRequest(method="GET", url=self.base_url + quote(skey, safe="/~"),
                         headers={"Range": byte_range} if byte_range else {})
        try:
            S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3", self.region).add_auth(req)
            prepared = req.prepare()
            prepared.stream_output = True
            resp = self.http.send(prepared)
        except Exception as exc:  # no answer at all: let the client and its retries handle it
            log.debug("direct GET %s: %s", skey, exc)
            self._paused_until = time.monotonic() + self.PAUSE
            self.fallbacks += 1
            return None
        raw = resp.raw
        data = None
        try:
            expected = resp.headers.get("content-length")
            if resp.status_code in (200, 206) and expected is not None:
                data = raw.read()
                if len(data) != int(expected):
                    data = None
        except Exception as exc:  # body cut mid-stream: the client retries
            log.debug("direct GET %s: %s", skey, exc)
            self._paused_until = time.monotonic() + self.PAUSE
            data = None
        if data is None:
            raw.close()  # an unread or broken body: this connection is not reused
            self.fallbacks += 1
            return None
        raw.release_conn()
        self.requests += 1
        return data

    def close(self) -> None:
        self.http.close()
