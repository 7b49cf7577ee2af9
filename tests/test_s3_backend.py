"""S3Backend conformance against both Ceph RGW and moto (real servers): the Backend contract
(get, ranged get, put never overwrites, list with paging, delete, multipart) and its edges."""

from __future__ import annotations

import os
import threading
import time

import pytest
from test_s3_support import bucket_name, destroy_bucket, s3_url, use_credentials, write_credentials

from kiwi_restore.errors import BackendError, NotFound, ObjectExists, UsageError
from kiwi_restore.storage import open_backend
from kiwi_restore.storage.s3 import S3Backend


@pytest.fixture
def backend(s3_server, monkeypatch):
    use_credentials(monkeypatch, s3_server)
    b = S3Backend.from_url(s3_url(s3_server, bucket_name(s3_server["KIND"]), "repo/x",
                                  multipart_threshold="6MiB", part_size="5MiB"))
    assert b.create_bucket()
    yield b
    destroy_bucket(b)


def test_get_put_range_exists_delete(backend):
    data = os.urandom(100_000)
    backend.put("contracts/c/data/ab/abcd", data)
    assert backend.get("contracts/c/data/ab/abcd") == data
    assert backend.get_range("contracts/c/data/ab/abcd", 1000, 5000) == data[1000:6000]
    assert backend.get_range("contracts/c/data/ab/abcd", 99_996, 4) == data[-4:]
    assert backend.get_range("contracts/c/data/ab/abcd", 0, 0) == b""
    assert backend.exists("contracts/c/data/ab/abcd")
    assert backend.size("contracts/c/data/ab/abcd") == len(data)
    with pytest.raises(BackendError, match="short read"):
        backend.get_range("contracts/c/data/ab/abcd", 99_990, 20)
    with pytest.raises(BackendError, match="short read"):
        backend.get_range("contracts/c/data/ab/abcd", 200_000, 10)
    with pytest.raises(NotFound):
        backend.get("contracts/c/nothing")
    with pytest.raises(NotFound):
        backend.get_range("contracts/c/nothing", 0, 10)
    with pytest.raises(NotFound):
        backend.get_range("contracts/c/nothing", 0, 0)
    assert not backend.exists("contracts/c/nothing")
    backend.delete("contracts/c/data/ab/abcd")
    backend.delete("contracts/c/data/ab/abcd")  # idempotent
    assert not backend.exists("contracts/c/data/ab/abcd")
    with pytest.raises(ValueError):
        backend.get("../escape")


def test_reads_take_the_direct_path_and_errors_go_through_the_client(backend):
    """GETs are signed and sent without the client's per-call machinery; anything but a plain
    success is asked again through the client, which names the error (and the connection
    that carried the error's body is not reused for the next read)."""
    data = os.urandom(300_000)
    backend.put("d/obj", data)
    direct = backend._direct
    assert direct is not None  # a path-style endpoint, as Ceph RGW and moto are here
    before = direct.requests
    assert backend.get_range("d/obj", 12_345, 100_000) == data[12_345:112_345]
    assert backend.get("d/obj") == data
    assert direct.requests == before + 2 and direct.fallbacks == 0
    with pytest.raises(NotFound):
        backend.get_range("d/missing", 0, 10)
    with pytest.raises(BackendError, match="short read"):
        backend.get_range("d/obj", 400_000, 10)
    assert direct.fallbacks == 2
    for _ in range(3):  # the pool still answers correctly after the refused reads
        assert backend.get_range("d/obj", 0, 1000) == data[:1000]
    assert direct.requests == before + 5


def test_no_direct_path_where_the_client_must_find_the_url(s3_server, monkeypatch):
    use_credentials(monkeypatch, s3_server)
    assert open_backend(s3_url(s3_server, "b", "p", addressing="virtual"))._direct is None
    assert open_backend("s3://b/p?region=eu-west-3")._direct is None  # AWS itself


def test_put_never_overwrites(backend, s3_server):
    backend.put("k/config", b"first")
    with pytest.raises(ObjectExists):
        backend.put("k/config", b"second")
    with pytest.raises(ObjectExists):
        backend.put("k/config", b"first")  # same bytes: still refused, like the local store
    assert backend.get("k/config") == b"first"
    # Both servers honour If-None-Match: * on PutObject (Ceph 16.2.15 and moto 5.2.5, measured)
    assert backend._if_none_match is True


def test_put_head_then_put_mode(s3_server, monkeypatch):
    use_credentials(monkeypatch, s3_server)
    b = S3Backend.from_url(s3_url(s3_server, bucket_name("head"), "", conditional="head"))
    b.create_bucket()
    try:
        b.put("a", b"1")
        with pytest.raises(ObjectExists):
            b.put("a", b"2")
        assert b.get("a") == b"1"
    finally:
        destroy_bucket(b)


def test_concurrent_puts_of_one_key_one_wins(backend):
    results: list[str] = []

    def put(i: int) -> None:
        try:
            backend.put("race/key", f"writer {i}".encode())
            results.append("ok")
        except ObjectExists:
            results.append("exists")

    threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1, results
    assert backend.get("race/key").startswith(b"writer ")


def test_multipart_upload_and_no_overwrite(backend):
    data = os.urandom(13 << 20)  # 3 parts of 5 MiB, 5 MiB, 3 MiB
    backend.put("big/object", data)
    assert backend.size("big/object") == len(data)
    assert backend.get("big/object") == data
    # a range across the first part boundary
    assert backend.get_range("big/object", (5 << 20) - 100, 200) == data[(5 << 20) - 100:(5 << 20) + 100]
    with pytest.raises(ObjectExists):
        backend.put("big/object", os.urandom(7 << 20))
    assert backend.get_range("big/object", 0, 64) == data[:64]
    # no upload left behind by the refused one
    assert not backend.client.list_multipart_uploads(Bucket=backend.bucket).get("Uploads")


def test_list_pages_and_prefixes(backend, s3_server):
    small = S3Backend.from_url(s3_url(s3_server, backend.bucket, "repo/x", page_size="7"))
    keys = [f"p/{i:03d}" for i in range(30)]
    for k in keys:
        backend.put(k, k.encode())
    backend.put("q/other", b"x")
    listed = list(small.list("p/"))
    assert [i.key for i in listed] == keys
    assert all(i.size == 5 for i in listed)
    assert [i.key for i in backend.list("")] == [*keys, "q/other"]
    assert list(backend.list("nothing/")) == []
    small.delete_many(keys[:25])
    assert [i.key for i in backend.list("p/")] == keys[25:]
    small.delete_many(["p/999", *keys[25:]])  # missing keys are fine
    assert [i.key for i in backend.list("")] == ["q/other"]
    small.close()


def test_list_beyond_1000_keys(s3_server, monkeypatch):
    """ListObjectsV2 pages at 1000 keys and DeleteObjects takes 1000 at most: 1203 keys."""
    if s3_server["KIND"] != "moto":
        pytest.skip("one server is enough for the 1000-key page (moto is faster at many small PUTs)")
    use_credentials(monkeypatch, s3_server)
    b = S3Backend.from_url(s3_url(s3_server, bucket_name("many"), "deep/prefix", max_connections="32"))
    b.create_bucket()
    try:
        keys = sorted(f"data/{i:05x}" for i in range(1203))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda k: b.put(k, b"."), keys))
        assert [i.key for i in b.list("data/")] == keys
        b.delete_many(keys)
        assert list(b.list("")) == []
    finally:
        destroy_bucket(b)


def test_profile_credentials_and_wrong_secret(s3_server, tmp_path, monkeypatch):
    use_credentials(monkeypatch, {"AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "wrong",
                                  "AWS_DEFAULT_REGION": "us-east-1"})
    creds = write_credentials(tmp_path / "creds", {"site": s3_server})
    url = s3_url(s3_server, bucket_name("prof"), "p", profile="site", credentials_file=str(creds))
    b = open_backend(url)
    assert b.create_bucket()
    b.put("x", b"y")
    assert b.get("x") == b"y"
    assert "credentials_file" not in b.url and "secret" not in b.url.lower()
    bad = open_backend(url.replace("profile=site&", "").replace(f"&credentials_file={creds}", ""))
    with pytest.raises(BackendError, match="access denied|InvalidAccessKeyId|SignatureDoesNotMatch"):
        bad.get("x")
    destroy_bucket(b)


def test_missing_bucket_is_a_clear_error(s3_server, monkeypatch):
    use_credentials(monkeypatch, s3_server)
    b = open_backend(s3_url(s3_server, bucket_name("none"), ""))
    with pytest.raises(BackendError, match="does not exist"):
        b.get("x")
    with pytest.raises(BackendError, match="does not exist"):
        list(b.list(""))


def test_url_validation():
    with pytest.raises(UsageError, match="loopback"):
        open_backend("s3://b/p?endpoint=http://rgw.example.net:7480")
    with pytest.raises(UsageError, match="unknown parameter"):
        open_backend("s3://b/p?endpoint=https://rgw.example.net&secret_key=oops")
    with pytest.raises(UsageError, match="bucket"):
        open_backend("s3:///p")
    with pytest.raises(UsageError, match="part_size"):
        open_backend("s3://b/p?part_size=1MiB")
    b = open_backend("s3://b/some/prefix/?endpoint=https://rgw.example.net:8443&region=fr-par")
    assert b.prefix == "some/prefix/"
    assert b.url == "s3://b/some/prefix?endpoint=https://rgw.example.net:8443&region=fr-par"
    open_backend("s3://b/p?endpoint=http://localhost:7480")
    open_backend("s3://b/p?endpoint=http://[::1]:7480")


def test_unreachable_endpoint_fails_clearly(monkeypatch):
    use_credentials(monkeypatch, {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"})
    b = open_backend(f"s3://b/p?endpoint=http://127.0.0.1:{_closed_port()}&max_attempts=2&connect_timeout=1")
    with pytest.raises(BackendError, match="failed after 2 attempts"):
        b.get("x")
    # the direct path tried once, then stands aside: the client's retries alone meet the outage
    assert b._direct.fallbacks == 1 and b._direct._paused_until > time.monotonic()
    with pytest.raises(BackendError, match="failed after 2 attempts"):
        b.get_range("x", 0, 10)
    assert b._direct.fallbacks == 1


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
