"""The S3 store and the dataset files against a real S3 protocol server (moto) through the MinIO SDK."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pyarrow.parquet as pq
import pytest
import yarl
from minio import Minio
from mlds_contract.campaign import Storage
from mlds_contract.errors import StorageUnavailable, UserError
from mlds_contract.lease import RejectReason
from mlds_operator.storage.manifest import (
    compact_manifest,
    find_results,
    get_checkpoint,
    manifest_row,
    put_checkpoint,
    read_manifest,
    write_part,
)
from mlds_operator.storage.store import Checked, CheckedParts, S3Store, open_store

from tests.s3_fixtures import S3Server, moto_server, stop_moto_server

pytestmark = pytest.mark.e2e
pytest_plugins = ["tests.s3_fixtures"]

OCTET = {"Content-Type": "application/octet-stream"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def http_put(url: str, data: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=data, method="PUT", headers=headers)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return int(resp.status)


def test_objects_round_trip_under_the_prefix(s3_store: S3Store, minio_client: Minio, s3_bucket: str) -> None:
    s3_store.put_bytes("ParityMachine/00000/meta.json", b'{"unit": 0}', "application/json")
    s3_store.put_bytes("ParityMachine/00001/meta.json", b'{"unit": 1}')

    assert s3_store.get_bytes("ParityMachine/00000/meta.json") == b'{"unit": 0}'
    assert s3_store.get_bytes("ParityMachine/00002/meta.json") is None
    info = s3_store.stat("ParityMachine/00001/meta.json")
    assert info is not None
    assert (info.key, info.size) == ("ParityMachine/00001/meta.json", 11)
    assert info.last_modified is not None
    assert s3_store.stat("nothing/here") is None
    assert s3_store.sha256("ParityMachine/00001/meta.json") == sha(b'{"unit": 1}')
    assert s3_store.sha256("nothing/here") is None
    # The objects really are under the campaign prefix in the bucket.
    names = sorted(o.object_name for o in minio_client.list_objects(s3_bucket, recursive=True))
    assert names == ["campaign/ParityMachine/00000/meta.json", "campaign/ParityMachine/00001/meta.json"]
    assert s3_store.url == f"s3://{s3_bucket}/campaign"


def test_list_is_a_string_prefix_and_delete_is_idempotent(s3_store: S3Store) -> None:
    for key in ("a/00001/meta.json", "a/00012/meta.json", "a/00100/meta.json", "ab/00001/meta.json", "b.txt"):
        s3_store.put_bytes(key, b"x")

    assert sorted(s3_store.list("")) == [
        "a/00001/meta.json",
        "a/00012/meta.json",
        "a/00100/meta.json",
        "ab/00001/meta.json",
        "b.txt",
    ]
    assert sorted(s3_store.list("a/")) == ["a/00001/meta.json", "a/00012/meta.json", "a/00100/meta.json"]
    assert sorted(s3_store.list("a/000")) == ["a/00001/meta.json", "a/00012/meta.json"]
    assert list(s3_store.list("zzz/")) == []

    s3_store.delete("a/00012/meta.json")
    s3_store.delete("a/00012/meta.json")  # again: no error
    assert "a/00012/meta.json" not in set(s3_store.list("a/"))


def test_two_campaigns_in_one_bucket_do_not_see_each_other(s3_server: S3Server, s3_bucket: str) -> None:
    one, two = s3_server.open(s3_bucket, "one"), s3_server.open(s3_bucket, "two")
    one.put_bytes("t/00000/meta.json", b"1")
    two.put_bytes("t/00000/meta.json", b"2")

    assert one.get_bytes("t/00000/meta.json") == b"1"
    assert list(two.list("")) == ["t/00000/meta.json"]
    assert two.get_bytes("t/00000/meta.json") == b"2"


def test_presigned_put_with_octet_stream_is_verified(s3_store: S3Store) -> None:
    body = b"\x00safetensors bytes\xff" * 100
    url = s3_store.presign_put("_mlds/staging/3/0-w/model.safetensors", timedelta(minutes=10))

    assert http_put(url, body, OCTET) == 200

    assert s3_store.get_bytes("_mlds/staging/3/0-w/model.safetensors") == body
    assert s3_store.verify("_mlds/staging/3/0-w/model.safetensors", len(body), sha(body)) == body


def test_a_form_encoded_presigned_put_is_caught_by_verification(s3_store: S3Store) -> None:
    # urllib's default content type for a body is a form; the test server then stores nothing. The worker
    # must send application/octet-stream, and the server must not trust the upload either way.
    body = b"weights" * 50
    url = s3_store.presign_put("_mlds/staging/4/0-w/model.safetensors", timedelta(minutes=10))

    assert http_put(url, body, {}) == 200

    assert s3_store.verify("_mlds/staging/4/0-w/model.safetensors", len(body), sha(body)) is RejectReason.size_mismatch


async def test_presigned_put_from_aiohttp(s3_store: S3Store) -> None:
    body = json.dumps({"unit": 9}).encode()
    url = s3_store.presign_put("_mlds/staging/9/0-w/meta.json", timedelta(minutes=5))

    # encoded=True: send the signed query exactly as signed (no re-quoting of %2F in the credential).
    async with (
        aiohttp.ClientSession() as session,
        session.put(yarl.URL(url, encoded=True), data=body, headers=OCTET) as resp,
    ):
        assert resp.status == 200

    assert s3_store.verify("_mlds/staging/9/0-w/meta.json", len(body), sha(body)) == body


@pytest.mark.parametrize(
    ("stored", "declared_size", "declared_sha", "expected"),
    [
        pytest.param(b"abc", 3, sha(b"abc"), b"abc", id="exactly-as-declared"),
        pytest.param(None, 3, sha(b"abc"), RejectReason.missing, id="never-uploaded"),
        pytest.param(b"abcd", 3, sha(b"abc"), RejectReason.size_mismatch, id="longer-than-declared"),
        pytest.param(b"", 3, sha(b"abc"), RejectReason.size_mismatch, id="empty-object"),
        pytest.param(b"abd", 3, sha(b"abc"), RejectReason.sha_mismatch, id="same-size-other-bytes"),
        pytest.param(b"abc", 3, sha(b"abc").upper(), b"abc", id="upper-case-hex-declared"),
    ],
)
def test_verify(
    s3_store: S3Store, stored: bytes | None, declared_size: int, declared_sha: str, expected: bytes | RejectReason
) -> None:
    if stored is not None:
        s3_store.put_bytes("t/00000/model.safetensors", stored)

    # The stored bytes when they are as declared (the very bytes hashed), else why not.
    assert s3_store.verify("t/00000/model.safetensors", declared_size, declared_sha) == expected


def test_verify_does_not_read_a_huge_object_to_the_end(s3_store: S3Store) -> None:
    s3_store.put_bytes("t/00000/model.safetensors", b"x" * (4 << 20))

    assert s3_store.verify("t/00000/model.safetensors", 10, sha(b"x" * 10)) is RejectReason.size_mismatch


def test_manifest_parts_compact_on_s3(s3_store: S3Store) -> None:
    def rows(units: range, attempt: int) -> list[dict[str, object]]:
        return [
            manifest_row({"unit": u, "target": "T", "replica": u, "attempt": attempt, "eval_loss": 1e-5}, f"T/{u:05d}")
            for u in units
        ]

    write_part(s3_store, 1, rows(range(0, 3), attempt=0))
    write_part(s3_store, 2, rows(range(2, 5), attempt=1))  # unit 2 again: the first row wins

    table = compact_manifest(s3_store)

    assert table.column("unit").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("attempt").to_pylist() == [0, 0, 0, 1, 1]
    stored = read_manifest(s3_store)
    assert stored.equals(table)
    # A user reading the object straight from the bucket gets the same thing.
    data = s3_store.get_bytes("manifest.parquet")
    assert data is not None
    assert pq.read_table(io.BytesIO(data)).column("key").to_pylist()[:2] == ["T/00000", "T/00001"]


def test_checkpoint_round_trip_on_s3(s3_store: S3Store) -> None:
    assert get_checkpoint(s3_store) is None
    put_checkpoint(s3_store, b"state 1")
    put_checkpoint(s3_store, b"state 2")

    assert get_checkpoint(s3_store) == b"state 2"


def test_find_results_lists_uploaded_units(s3_store: S3Store) -> None:
    s3_store.put_bytes("T/00000/meta.json", b"{}")
    s3_store.put_bytes("T/00000/model.safetensors", b"w")
    s3_store.put_bytes("T/00001/model.safetensors", b"w")  # no meta.json yet: not a result
    s3_store.put_bytes("U/00007/meta.json", b"{}")
    write_part(s3_store, 1, [manifest_row({"unit": 0}, "T/00000")])
    put_checkpoint(s3_store, b"c")

    assert sorted(find_results(s3_store)) == ["T/00000", "U/00007"]
    assert list(find_results(s3_store, since=datetime.now(UTC) + timedelta(hours=1))) == []


def test_a_missing_bucket_is_created(s3_server: S3Server) -> None:
    bucket = "mlds-created-by-the-store"
    store = s3_server.open(bucket)
    store.put_bytes("x", b"1")

    assert s3_server.client().bucket_exists(bucket)
    # Opening again (another replica, a restart) is fine.
    assert s3_server.open(bucket).get_bytes("x") == b"1"


def test_a_missing_bucket_that_may_not_be_created_is_a_user_error(s3_server: S3Server) -> None:
    with pytest.raises(UserError, match="does not exist"):
        s3_server.open("mlds-never-created", create_bucket=False)


def test_credentials_come_from_the_environment_when_not_given(s3_server: S3Server, s3_storage: Storage) -> None:
    # The s3_server fixture put the test credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, as a
    # user of `mlds run` would.
    store = open_store(s3_storage, connect_timeout=1, read_timeout=1, retries=0)
    store.put_bytes("x", b"1")

    assert store.get_bytes("x") == b"1"


@pytest.fixture
def dead_server_store(s3_server: S3Server) -> Iterator[S3Store]:
    """A store whose server answered at open time and then died (socket closed: connections refused)."""
    with moto_server() as (info, server):
        store = info.open("mlds-outage", retries=1)
        store.put_bytes("x", b"1")
        stop_moto_server(server)
        yield store


def test_a_dead_server_is_storage_unavailable_quickly(dead_server_store: S3Store) -> None:
    # "Quickly" against the SDK's defaults (minutes of retries), with room for a machine 20 times slower.
    for call in (
        lambda: dead_server_store.get_bytes("x"),
        lambda: dead_server_store.put_bytes("y", b"2"),
        lambda: dead_server_store.verify("x", 1, sha(b"1")),
        lambda: list(dead_server_store.list("")),
    ):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="unreachable"):
            call()
        assert time.monotonic() - started < 60


def test_a_hung_server_is_storage_unavailable_after_the_timeouts() -> None:
    # A listening socket that never answers: connections succeed, responses never come.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        endpoint = f"127.0.0.1:{sock.getsockname()[1]}"
        store = S3Store(
            endpoint=endpoint,
            bucket="mlds-hung",
            access_key="k",
            secret_key="s",
            secure=False,
            region="us-east-1",
            connect_timeout=0.3,
            read_timeout=0.3,
            retries=1,
        )
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="timed out"):
            store.get_bytes("x")
        elapsed = time.monotonic() - started

    # Two attempts of 0.3 s plus backoff; the SDK's own defaults would wait 5 minutes per attempt. The
    # upper bound leaves room for a machine 20 times slower: it tells our timeouts from the SDK's, no more.
    assert 0.5 < elapsed < 60


class NotS3Handler(http.server.BaseHTTPRequestHandler):
    """A web server that is not S3: every request gets an HTML 404 page."""

    def _answer(self) -> None:
        body = b"<html><body>Not Found</body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = _answer  # noqa: N815 - the names http.server dispatches to

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_an_endpoint_that_is_not_s3_is_a_user_error() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotS3Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = S3Store(
            endpoint=f"127.0.0.1:{server.server_address[1]}",
            bucket="mlds-nope",
            access_key="k",
            secret_key="s",
            secure=False,
            region="us-east-1",
            retries=0,
        )
        with pytest.raises(UserError, match="does not answer like an S3 server"):
            store.put_bytes("x", b"1")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_publish_copies_the_checked_version_server_side_on_that_version_only(s3_store: S3Store) -> None:
    staged, final = "_mlds/staging/0/0-w/model.safetensors", "Parity/00000/model.safetensors"
    body = b"checked weights" * 100
    s3_store.put_bytes(staged, body)
    checked = s3_store.check(staged, len(body), sha(body))
    assert isinstance(checked, Checked)
    assert checked.data == body
    assert s3_store.publish([(staged, final, checked.version)]) is None
    assert s3_store.get_bytes(final) == body  # copied by the server, byte for byte
    assert s3_store.client.stat_object(s3_store.bucket, s3_store.key(final)).content_type == "application/octet-stream"

    # A re-upload after the check must not be published: the copy is conditional on the checked ETag. moto
    # ignores x-amz-copy-source-if-match (real S3 and MinIO answer 412, which publish reports), so check the
    # request itself: one PUT per file (no HEAD first) carrying the condition.
    sent: list[tuple[str, dict[str, str]]] = []
    http = s3_store.client._http
    urlopen = http.urlopen

    def recording(method: str, url: str, *args: object, **kwargs: Any) -> Any:
        sent.append((method, dict(kwargs.get("headers") or {})))
        return urlopen(method, url, *args, **kwargs)

    http.urlopen = recording  # type: ignore[method-assign]
    try:
        assert s3_store.publish([(staged, "Parity/00001/model.safetensors", checked.version)]) is None
    finally:
        http.urlopen = urlopen  # type: ignore[method-assign]
    assert [method for method, _ in sent] == ["PUT"]
    assert sent[0][1]["x-amz-copy-source-if-match"] == checked.version

    s3_store.delete_many([staged, "_mlds/staging/0/0-w/missing.json"])  # missing keys are not an error
    assert list(s3_store.list("_mlds/staging/")) == []


def test_a_checked_bundle_is_published_by_writing_each_part(s3_store: S3Store) -> None:
    bundle = "_mlds/staging/0-0-w~bundle"
    parts = (b"model bytes" * 10, b"epoch,loss\n1,0.5\n", b'{"unit": 0}')
    declared = [(len(p), sha(p)) for p in parts]
    assert s3_store.check_parts(bundle, declared) is RejectReason.missing
    s3_store.put_bytes(bundle, b"".join(parts) + b"x")
    assert s3_store.check_parts(bundle, declared) is RejectReason.size_mismatch
    s3_store.put_bytes(bundle, b"".join(reversed(parts)))
    assert s3_store.check_parts(bundle, declared) is RejectReason.sha_mismatch
    s3_store.put_bytes(bundle, b"".join(parts))

    got = s3_store.check_parts(bundle, declared)

    assert isinstance(got, CheckedParts)
    assert (got.parts, got.first) == (parts, None)  # a copy cannot cut an object: every part is written
    names = ("model.safetensors", "history.csv", "meta.json")
    assert s3_store.publish([], [(f"Parity/00000/{n}", p) for n, p in zip(names, parts, strict=True)]) is None
    assert [s3_store.get_bytes(f"Parity/00000/{n}") for n in names] == list(parts)
    assert s3_store.client.stat_object(s3_store.bucket, s3_store.key("Parity/00000/meta.json")).content_type == (
        "application/json"
    )
