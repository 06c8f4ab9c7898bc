"""The local-folder store: keys, atomic writes, listing, verification and signed upload URLs."""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from mlds_contract.campaign import Storage
from mlds_contract.errors import StorageUnavailable, UserError
from mlds_contract.lease import RejectReason
from mlds_operator.storage.store import (
    CheckedParts,
    LocalStore,
    Store,
    _read_declared,
    _read_parts,
    check_rel,
    open_store,
)

from tests.clock import FakeClock

EPOCH = FakeClock().wall()  # "now" for signed URLs until a test moves the clock, in Unix seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> LocalStore:
    s = LocalStore(tmp_path / "store", upload_base_url="http://127.0.0.1:8080", clock=clock.wall)
    s.ensure_root()
    return s


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    "rel",
    [
        pytest.param("meta.json", id="top-level"),
        pytest.param("ParityMachine/00007/model.safetensors", id="result-file"),
        pytest.param("_mlds/parts/part-000001.parquet", id="internal"),
        pytest.param("ParityMachine-h12-g4-l4/00000/meta.json", id="ds5-target"),
        pytest.param("a/.hidden", id="dot-file-is-a-name"),
        pytest.param("a/..b", id="dots-inside-a-name"),
    ],
)
def test_safe_keys_are_accepted(rel: str) -> None:
    assert check_rel(rel) == rel


@pytest.mark.parametrize(
    "rel",
    [
        pytest.param("", id="empty"),
        pytest.param("/etc/passwd", id="absolute"),
        pytest.param("../outside", id="parent-first"),
        pytest.param("a/../../outside", id="parent-inside"),
        pytest.param("a/./b", id="dot-part"),
        pytest.param("a//b", id="empty-part"),
        pytest.param("a/b/", id="trailing-slash"),
        pytest.param("a\\..\\b", id="backslash"),
        pytest.param("a/b\x00c", id="nul"),
        pytest.param("a/b\nc", id="newline"),
    ],
)
def test_unsafe_keys_are_refused_by_every_method(store: LocalStore, rel: str) -> None:
    with pytest.raises(ValueError, match="key"):
        check_rel(rel)
    for call in (
        lambda: store.put_bytes(rel, b"x"),
        lambda: store.get_bytes(rel),
        lambda: store.stat(rel),
        lambda: store.delete(rel),
        lambda: store.presign_put(rel, timedelta(minutes=1)),
    ):
        with pytest.raises(ValueError, match="key"):
            call()
    assert not (store.root.parent / "outside").exists()


# --------------------------------------------------------------------------------------------- objects


def test_put_get_stat_sha256_round_trip(store: LocalStore) -> None:
    data = b"\x00weights\xff" * 1000
    store.put_bytes("T/00000/model.safetensors", data)

    assert store.get_bytes("T/00000/model.safetensors") == data
    assert (store.root / "T" / "00000" / "model.safetensors").read_bytes() == data
    info = store.stat("T/00000/model.safetensors")
    assert info is not None
    assert (info.key, info.size, info.etag) == ("T/00000/model.safetensors", len(data), None)
    assert info.last_modified is not None
    assert info.last_modified.tzinfo is not None
    assert store.sha256("T/00000/model.safetensors") == sha(data)


def test_missing_objects_are_none_not_errors(store: LocalStore) -> None:
    store.put_bytes("T/00000/meta.json", b"{}")

    assert store.get_bytes("T/00001/meta.json") is None
    assert store.stat("T/00001/meta.json") is None
    assert store.sha256("T/00001/meta.json") is None
    # A "folder" is not an object, as in S3.
    assert store.get_bytes("T/00000") is None
    assert store.stat("T/00000") is None
    # Below a file: not an object either.
    assert store.get_bytes("T/00000/meta.json/x") is None
    assert store.stat("T/00000/meta.json/x") is None


def test_overwrite_replaces_and_delete_is_idempotent(store: LocalStore) -> None:
    store.put_bytes("k", b"old, longer content")
    store.put_bytes("k", b"new")
    assert store.get_bytes("k") == b"new"

    store.delete("k")
    store.delete("k")
    store.delete("never/was")
    assert store.get_bytes("k") is None


def test_a_failed_write_keeps_the_old_object_and_leaves_no_temporary_file(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put_bytes("_mlds/checkpoint.bin", b"old")

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(StorageUnavailable, match="No space left"):
        store.put_bytes("_mlds/checkpoint.bin", b"new")
    monkeypatch.undo()

    assert store.get_bytes("_mlds/checkpoint.bin") == b"old"
    assert files_under(store.root) == ["_mlds/checkpoint.bin"]


def test_a_crash_mid_write_leaves_a_temporary_file_that_is_never_listed(store: LocalStore) -> None:
    store.put_bytes("T/00000/meta.json", b"{}")
    # What a killed writer leaves behind (the name put_bytes uses for its temporary files).
    (store.root / "T" / "00000" / ".model.safetensors.mlds-tmp-0123abcd").write_bytes(b"partial")

    assert list(store.list("")) == ["T/00000/meta.json"]
    assert store.get_bytes("T/00000/model.safetensors") is None


def test_list_is_a_plain_string_prefix_as_in_s3(store: LocalStore) -> None:
    for key in ("a/00001/meta.json", "a/00012/meta.json", "a/00100/meta.json", "ab/00001/meta.json", "b.txt"):
        store.put_bytes(key, b"x")

    assert sorted(store.list()) == [
        "a/00001/meta.json",
        "a/00012/meta.json",
        "a/00100/meta.json",
        "ab/00001/meta.json",
        "b.txt",
    ]
    assert sorted(store.list("a")) == sorted(
        ["a/00001/meta.json", "a/00012/meta.json", "a/00100/meta.json", "ab/00001/meta.json"]
    )
    assert sorted(store.list("a/")) == ["a/00001/meta.json", "a/00012/meta.json", "a/00100/meta.json"]
    assert sorted(store.list("a/000")) == ["a/00001/meta.json", "a/00012/meta.json"]
    assert list(store.list("missing/")) == []
    assert [i.size for i in store.scan("b.txt")] == [1]


def test_a_store_on_an_empty_root_lists_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "not-created-yet")

    assert list(store.list("")) == []


OK = object()  # verify answers the stored bytes themselves


@pytest.mark.parametrize(
    ("stored", "size", "digest", "expected"),
    [
        pytest.param(b"abc", 3, sha(b"abc"), OK, id="as-declared"),
        pytest.param(None, 3, sha(b"abc"), RejectReason.missing, id="never-uploaded"),
        pytest.param(b"", 3, sha(b"abc"), RejectReason.size_mismatch, id="empty"),
        pytest.param(b"abcd", 3, sha(b"abc"), RejectReason.size_mismatch, id="longer"),
        pytest.param(b"abd", 3, sha(b"abc"), RejectReason.sha_mismatch, id="same-size-other-bytes"),
        pytest.param(b"abc", 3, sha(b"abc").upper(), OK, id="upper-case-hex"),
        pytest.param(b"", 0, sha(b""), OK, id="an-empty-file-declared-empty"),
    ],
)
def test_verify(store: LocalStore, stored: bytes | None, size: int, digest: str, expected: object) -> None:
    if stored is not None:
        store.put_bytes("T/00000/model.safetensors", stored)

    got = store.verify("T/00000/model.safetensors", size, digest)

    assert got == (stored if expected is OK else expected)


def test_verify_never_reads_past_the_declared_size() -> None:
    read: list[int] = []

    def endless() -> Iterator[bytes]:  # a worker that uploaded far more than it declared
        while True:
            read.append(1 << 16)
            yield b"x" * (1 << 16)

    assert _read_declared(endless(), 3, sha(b"xxx")) is RejectReason.size_mismatch
    assert sum(read) == 1 << 16  # one chunk, then it stopped


BUNDLE = "_mlds/staging/0-0-w~bundle"
PARTS = (b"model bytes" * 10, b"epoch,loss\n1,0.5\n", b'{"unit": 0}')


@pytest.mark.parametrize(
    ("body", "declared", "expected"),
    [
        pytest.param(b"".join(PARTS), PARTS, OK, id="as-declared"),
        pytest.param(None, PARTS, RejectReason.missing, id="never-uploaded"),
        pytest.param(b"".join(PARTS) + b"x", PARTS, RejectReason.size_mismatch, id="longer"),
        pytest.param(b"".join(PARTS)[:-1], PARTS, RejectReason.size_mismatch, id="shorter"),
        pytest.param(b"".join(reversed(PARTS)), PARTS, RejectReason.sha_mismatch, id="parts-in-another-order"),
        pytest.param(
            b"".join(PARTS), (PARTS[0][:-1], PARTS[1] + b"x", PARTS[2]), RejectReason.sha_mismatch, id="cut-elsewhere"
        ),
    ],
)
def test_check_parts(store: LocalStore, body: bytes | None, declared: tuple[bytes, ...], expected: object) -> None:
    if body is not None:
        store.put_upload(BUNDLE, body)

    got = store.check_parts(BUNDLE, [(len(p), sha(p)) for p in declared])

    if expected is OK:
        assert isinstance(got, CheckedParts)
        assert got.parts == PARTS
    else:
        assert got is expected


def test_a_checked_bundle_becomes_its_first_part_and_the_others_are_written(store: LocalStore) -> None:
    store.put_upload(BUNDLE, b"".join(PARTS))
    got = store.check_parts(BUNDLE, [(len(p), sha(p)) for p in PARTS])
    assert isinstance(got, CheckedParts)
    assert got.first is not None
    store.put_upload(BUNDLE, b"a re-upload after the check")  # never published: the claimed file is the checked one

    moves = [(BUNDLE, "T/00000/model.safetensors", got.first)]
    writes = [("T/00000/history.csv", PARTS[1]), ("T/00000/meta.json", PARTS[2])]
    assert store.publish(moves, writes) is None

    assert [store.get_bytes(f"T/00000/{n}") for n in ("model.safetensors", "history.csv", "meta.json")] == list(PARTS)
    store.delete_many([BUNDLE])
    assert files_under(store.root) == ["T/00000/history.csv", "T/00000/meta.json", "T/00000/model.safetensors"]


def test_a_bundle_is_read_no_further_than_its_declared_parts() -> None:
    read: list[int] = []

    def endless() -> Iterator[bytes]:
        while True:
            read.append(1 << 16)
            yield b"x" * (1 << 16)

    assert _read_parts(endless(), [(3, sha(b"xxx")), (4, sha(b"xxxx"))]) is RejectReason.size_mismatch
    assert sum(read) == 1 << 16


def test_publish_of_a_version_never_checked_publishes_nothing(store: LocalStore) -> None:
    store.put_upload(BUNDLE, b"".join(PARTS))
    assert store.publish([(BUNDLE, "T/00000/model.safetensors", "0" * 32)], [("T/00000/meta.json", b"{}")]) == BUNDLE
    assert list(store.list("T/")) == []


def test_local_store_is_a_store(store: LocalStore) -> None:
    assert isinstance(store, Store)
    assert store.url == store.root.as_uri()
    assert store.url.startswith("file:///")


# ------------------------------------------------------------------------------------------ signed URLs


def split(url: str) -> tuple[str, str, str]:
    """(decoded key, expires, sig) of a local upload URL, as the lease API's route sees them."""
    parsed = urllib.parse.urlsplit(url)
    assert parsed.path.startswith("/v1/objects/")
    key = urllib.parse.unquote(parsed.path.removeprefix("/v1/objects/"))
    query = dict(urllib.parse.parse_qsl(parsed.query))
    return key, query["expires"], query["sig"]


def test_upload_url_points_at_the_lease_api_route(store: LocalStore) -> None:
    url = store.presign_put("_mlds/staging/Parity Machine/00003/model.safetensors", timedelta(minutes=10))

    parsed = urllib.parse.urlsplit(url)
    assert (parsed.scheme, parsed.netloc) == ("http", "127.0.0.1:8080")
    assert parsed.path == "/v1/objects/_mlds/staging/Parity%20Machine/00003/model.safetensors"
    key, expires, _ = split(url)
    assert key == "_mlds/staging/Parity Machine/00003/model.safetensors"
    assert int(expires) == EPOCH + 600


def test_a_signed_url_authorises_its_key_until_it_expires(store: LocalStore, clock: FakeClock) -> None:
    key, expires, sig = split(store.presign_put("_mlds/staging/T/00003/meta.json", timedelta(minutes=10)))

    assert store.check_upload(key, expires, sig)
    assert store.check_upload(key, expires, sig, now=EPOCH + 600)  # the last second counts
    assert not store.check_upload(key, expires, sig, now=EPOCH + 601)
    clock.advance(601)
    assert not store.check_upload(key, expires, sig)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        pytest.param(lambda k, e, s: ("_mlds/staging/T/00004/meta.json", e, s), "another unit's key", id="other-key"),
        pytest.param(
            lambda k, e, s: ("_mlds/staging/T/00003/model.safetensors", e, s), "another file", id="other-file"
        ),
        pytest.param(lambda k, e, s: (k, str(int(e) + 3600), s), "a later expiry", id="extended-expiry"),
        pytest.param(lambda k, e, s: (k, e, s[:-1] + ("0" if s[-1] != "0" else "1")), "a flipped digit", id="tampered"),
        pytest.param(lambda k, e, s: (k, e, s.upper()), "upper-cased hex", id="case-changed"),
        pytest.param(lambda k, e, s: (k, e, ""), "no signature", id="missing-sig"),
        pytest.param(lambda k, e, s: (k, "", s), "no expiry", id="missing-expiry"),
        pytest.param(lambda k, e, s: (k, "soon", s), "garbage expiry", id="garbage-expiry"),
        pytest.param(lambda k, e, s: ("_mlds/staging/T/00003/../00004/meta.json", e, s), "a traversal", id="traversal"),
    ],
)
def test_a_changed_url_authorises_nothing(
    store: LocalStore, change: Callable[[str, str, str], tuple[str, str, str]], why: str
) -> None:
    key, expires, sig = split(store.presign_put("_mlds/staging/T/00003/meta.json", timedelta(minutes=10)))

    k, e, s = change(key, expires, sig)

    assert not store.check_upload(k, e, s), why


def test_urls_of_one_store_do_not_open_another(tmp_path: Path, store: LocalStore) -> None:
    other = LocalStore(tmp_path / "other", upload_base_url="http://127.0.0.1:8080", clock=FakeClock().wall)
    key, expires, sig = split(store.presign_put("_mlds/staging/T/00003/meta.json", timedelta(minutes=10)))

    assert not other.check_upload(key, expires, sig)


def test_a_shared_secret_survives_a_restart(tmp_path: Path) -> None:
    # `mlds run` keeps a random secret in its state folder, so URLs survive a server restart.
    before = LocalStore(tmp_path / "s", upload_base_url="http://h", secret=b"k" * 32, clock=FakeClock().wall)
    after = LocalStore(tmp_path / "s", upload_base_url="http://h", secret=b"k" * 32, clock=FakeClock().wall)

    key, expires, sig = split(before.presign_put("_mlds/staging/T/00003/meta.json", timedelta(minutes=10)))

    assert after.check_upload(key, expires, sig)


@pytest.mark.parametrize(
    "rel",
    [
        pytest.param("ParityMachine/00000/model.safetensors", id="a-published-result"),
        pytest.param("_mlds/checkpoint.bin", id="the-checkpoint"),
        pytest.param("manifest.parquet", id="the-manifest"),
        pytest.param("_mlds/parts/part-000001.parquet", id="a-manifest-part"),
        pytest.param("_mlds/staging", id="the-staging-folder-itself"),
    ],
)
def test_only_staging_keys_are_ever_signable(store: LocalStore, rel: str) -> None:
    with pytest.raises(ValueError, match="staging"):
        store.presign_put(rel, timedelta(minutes=1))
    # Nor does a signature made with the store's own secret open them (a leaked or derived secret).
    expires = str(int(EPOCH) + 60)
    assert not store.check_upload(rel, expires, store._sign(rel, int(expires), ""))


def test_a_url_is_bound_to_the_lease_it_was_granted_under(store: LocalStore) -> None:
    url = store.presign_put("_mlds/staging/3/0-w/meta.json", timedelta(minutes=10), scope="lease-one")
    key, expires, sig = split(url)
    assert "scope=lease-one" in url
    assert store.check_upload(key, expires, sig, scope="lease-one")
    assert not store.check_upload(key, expires, sig, scope="lease-two")
    assert not store.check_upload(key, expires, sig)


@pytest.mark.parametrize(
    ("expires", "sig"),
    [
        pytest.param(None, "\u00e9" * 64, id="non-ascii-signature"),
        pytest.param(None, "\udcff" * 64, id="undecodable-signature"),
        pytest.param("\u00b2", None, id="superscript-digit-expiry"),
        pytest.param("\u0663" * 10, None, id="arabic-indic-digit-expiry"),
        pytest.param("9" * 400, None, id="huge-expiry"),
    ],
)
def test_a_malformed_signature_or_expiry_is_just_refused(
    store: LocalStore, expires: str | None, sig: str | None
) -> None:
    key, good_expires, good_sig = split(store.presign_put("_mlds/staging/3/0-w/meta.json", timedelta(minutes=10)))
    assert not store.check_upload(key, expires or good_expires, sig or good_sig)


def test_presign_needs_an_upload_base_url_and_a_positive_lifetime(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(RuntimeError, match="upload_base_url"):
        store.presign_put("_mlds/staging/k", timedelta(minutes=1))
    store.upload_base_url = "http://127.0.0.1:1234/"
    with pytest.raises(ValueError, match="positive"):
        store.presign_put("_mlds/staging/k", timedelta(0))
    assert store.presign_put("_mlds/staging/k", timedelta(minutes=1)).startswith(
        "http://127.0.0.1:1234/v1/objects/_mlds/staging/k?"
    )


# ------------------------------------------------------------------------------------------------ open


def test_open_store_without_storage_opens_the_local_folder(tmp_path: Path) -> None:
    store = open_store(None, local_root=tmp_path / "runs" / "quick", upload_base_url="http://127.0.0.1:9")

    assert isinstance(store, LocalStore)
    assert (tmp_path / "runs" / "quick").is_dir()
    assert store.presign_put("_mlds/staging/k", timedelta(seconds=5)).startswith(
        "http://127.0.0.1:9/v1/objects/_mlds/staging/k?"
    )


def test_open_store_needs_a_folder_when_there_is_no_storage() -> None:
    with pytest.raises(UserError, match=r"no spec\.storage"):
        open_store(None)


def test_a_file_where_the_folder_should_be_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a folder")

    with pytest.raises(UserError, match="taken"):
        open_store(None, local_root=tmp_path / "taken")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_folder_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir(mode=0o500)

    with pytest.raises(UserError, match="not writable"):
        open_store(None, local_root=tmp_path / "ro")


def test_s3_storage_without_credentials_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)

    with pytest.raises(UserError, match="AWS_ACCESS_KEY_ID"):
        open_store(Storage(endpoint="minio:9000", bucket="mlds"))
