"""S3Store without a server: the scope of presigned upload URLs, key joining, and the error mapping.

The S3 test server (moto) accepts any signature, so what a presigned URL authorises is checked here by
verifying its AWS Signature V4 independently of the SDK that made it: valid for a PUT of exactly one
key until its expiry, and for nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import urllib3
from minio.error import S3Error, ServerError
from mlds_contract.errors import StorageUnavailable, UserError
from mlds_operator.storage.store import S3Store, Store

ACCESS, SECRET, REGION = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "eu-central-1"
# Port 9 (discard) on loopback: nothing listens, so any network I/O would fail the test loudly.
ENDPOINT = "127.0.0.1:9"


def make_store(prefix: str = "ds1-parity", **kwargs: object) -> S3Store:
    options: dict[str, object] = {
        "endpoint": ENDPOINT,
        "bucket": "mlds",
        "prefix": prefix,
        "access_key": ACCESS,
        "secret_key": SECRET,
        "secure": False,
        "region": REGION,
        "retries": 0,
        "connect_timeout": 0.2,
        **kwargs,
    }
    return S3Store(**options)  # type: ignore[arg-type]


def _quote(text: str, safe: str = "") -> str:
    return urllib.parse.quote(text, safe="-_.~" + safe)


def sigv4_allows(url: str, method: str, *, secret: str = SECRET, now: datetime | None = None) -> bool:
    """Would an S3 server accept ``method`` on ``url`` at ``now``? (AWS SigV4 query authentication.)"""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    params = dict(query)
    signature = params.pop("X-Amz-Signature")
    if params["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256" or params["X-Amz-SignedHeaders"] != "host":
        return False
    access, date, region, service, terminator = params["X-Amz-Credential"].split("/")
    scope = f"{date}/{region}/{service}/{terminator}"
    canonical_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(params.items()))
    canonical = "\n".join(
        [
            method,
            _quote(urllib.parse.unquote(parts.path), safe="/"),
            canonical_query,
            f"host:{parts.netloc}\n",
            "host",
            "UNSIGNED-PAYLOAD",
        ]
    )
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", params["X-Amz-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, terminator):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature) or access != ACCESS:
        return False
    signed_at = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    moment = now or datetime.now(UTC)
    return signed_at <= moment + timedelta(minutes=5) and moment <= signed_at + timedelta(
        seconds=int(params["X-Amz-Expires"])
    )


def with_path(url: str, path: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=path))


def with_param(url: str, name: str, value: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = [(k, value if k == name else v) for k, v in urllib.parse.parse_qsl(parts.query)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


@pytest.fixture
def url() -> str:
    return make_store().presign_put("_mlds/staging/7/0-w/model.safetensors", timedelta(minutes=10))


def test_the_url_is_a_put_of_exactly_the_units_key(url: str) -> None:
    assert urllib.parse.urlsplit(url).path == "/mlds/ds1-parity/_mlds/staging/7/0-w/model.safetensors"
    assert sigv4_allows(url, "PUT")


def test_the_url_does_not_read_or_delete(url: str) -> None:
    assert not sigv4_allows(url, "GET")
    assert not sigv4_allows(url, "DELETE")
    assert not sigv4_allows(url, "HEAD")


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/mlds/ds1-parity/_mlds/staging/8/0-w/model.safetensors", id="next-unit"),
        pytest.param("/mlds/ds1-parity/_mlds/staging/7/0-w/meta.json", id="other-file-of-the-unit"),
        pytest.param("/mlds/ds1-parity/ParityMachine/00007/model.safetensors", id="the-published-result"),
        pytest.param("/mlds/other-campaign/_mlds/staging/7/0-w/model.safetensors", id="other-campaign"),
        pytest.param("/other-bucket/ds1-parity/_mlds/staging/7/0-w/model.safetensors", id="other-bucket"),
        pytest.param("/mlds/ds1-parity/_mlds/checkpoint.bin", id="the-checkpoint"),
    ],
)
def test_the_url_authorises_no_other_key(url: str, path: str) -> None:
    assert not sigv4_allows(with_path(url, path), "PUT")


@pytest.mark.parametrize("rel", ["ParityMachine/00007/model.safetensors", "_mlds/checkpoint.bin", "manifest.parquet"])
def test_only_staging_keys_are_signed(rel: str) -> None:
    with pytest.raises(ValueError, match="staging"):
        make_store().presign_put(rel, timedelta(minutes=10))


def test_the_url_expires(url: str) -> None:
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    signed_at = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)

    assert params["X-Amz-Expires"] == "600"
    assert abs(signed_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert sigv4_allows(url, "PUT", now=signed_at + timedelta(seconds=600))
    assert not sigv4_allows(url, "PUT", now=signed_at + timedelta(seconds=601))
    # Stretching the lifetime breaks the signature.
    assert not sigv4_allows(with_param(url, "X-Amz-Expires", "604800"), "PUT")


def test_the_url_carries_no_secret_and_signs_only_the_host(url: str) -> None:
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))

    assert SECRET not in urllib.parse.unquote(url)
    assert params["X-Amz-Credential"].startswith(f"{ACCESS}/")
    assert params["X-Amz-Credential"].endswith(f"/{REGION}/s3/aws4_request")
    # Only the host is signed: the worker is free to send Content-Type: application/octet-stream.
    assert params["X-Amz-SignedHeaders"] == "host"
    assert not sigv4_allows(url, "PUT", secret="another-secret")


@pytest.mark.parametrize(
    "expires",
    [
        pytest.param(timedelta(0), id="zero"),
        pytest.param(timedelta(milliseconds=500), id="under-a-second"),
        pytest.param(timedelta(days=7, seconds=1), id="over-seven-days"),
    ],
)
def test_lifetimes_s3_cannot_sign_are_refused(expires: timedelta) -> None:
    with pytest.raises(ValueError, match="lifetime"):
        make_store().presign_put("_mlds/staging/k", expires)


@pytest.mark.parametrize(
    ("prefix", "url", "key"),
    [
        pytest.param("", "s3://mlds", "T/00000/meta.json", id="no-prefix"),
        pytest.param("ds1-parity", "s3://mlds/ds1-parity", "ds1-parity/T/00000/meta.json", id="prefix"),
        pytest.param("/team/ds1/", "s3://mlds/team/ds1", "team/ds1/T/00000/meta.json", id="slashes-trimmed"),
    ],
)
def test_keys_join_the_prefix(prefix: str, url: str, key: str) -> None:
    store = make_store(prefix)

    assert isinstance(store, Store)
    assert store.url == url
    assert store.key("T/00000/meta.json") == key
    with pytest.raises(ValueError, match="key"):
        store.key("../other-campaign/T/00000/meta.json")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"endpoint": "http://minio:9000"}, "without a scheme", id="scheme-in-endpoint"),
        pytest.param({"bucket": "my bucket"}, "invalid storage settings", id="space-in-bucket-name"),
        pytest.param({"endpoint": "minio:9000/path"}, "invalid storage settings", id="path-in-endpoint"),
        pytest.param({"prefix": "a/../b"}, "key", id="traversal-in-prefix"),
    ],
)
def test_bad_settings_are_refused_at_construction(settings: dict[str, object], message: str) -> None:
    with pytest.raises((UserError, ValueError), match=message):
        make_store(**settings)


# ----------------------------------------------------------------------------------------- error mapping


def s3_error(code: str, status: int) -> S3Error:
    return S3Error(SimpleNamespace(status=status), code, f"{code} message", "/mlds/k", "req", "host")  # type: ignore[arg-type]


def connection_error(reason: Exception) -> urllib3.exceptions.MaxRetryError:
    return urllib3.exceptions.MaxRetryError(None, "/mlds/k", reason)  # type: ignore[arg-type]


def raising(exc: Exception) -> Callable[..., object]:
    def fail(*args: object, **kwargs: object) -> object:
        raise exc

    return fail


@pytest.mark.parametrize(
    ("exc", "expected", "message"),
    [
        pytest.param(s3_error("AccessDenied", 403), UserError, "check the credentials", id="access-denied"),
        pytest.param(s3_error("InvalidAccessKeyId", 403), UserError, "credentialsSecret", id="unknown-key"),
        pytest.param(s3_error("SignatureDoesNotMatch", 403), UserError, "credentials", id="wrong-secret"),
        pytest.param(s3_error("NoSuchBucket", 404), UserError, "'mlds' does not exist", id="bucket-gone"),
        pytest.param(s3_error("InvalidArgument", 400), UserError, "rejected", id="other-client-error"),
        pytest.param(s3_error("SlowDown", 503), StorageUnavailable, "unavailable", id="throttled"),
        pytest.param(s3_error("InternalError", 500), StorageUnavailable, "unavailable", id="server-error"),
        pytest.param(s3_error("SomethingNew", 502), StorageUnavailable, "unavailable", id="unknown-5xx"),
        pytest.param(ServerError("bad gateway", 502), StorageUnavailable, "HTTP 502", id="5xx-no-body"),
        pytest.param(
            connection_error(urllib3.exceptions.NewConnectionError(None, "Connection refused")),  # type: ignore[arg-type]
            StorageUnavailable,
            "unreachable",
            id="connection-refused",
        ),
        pytest.param(
            connection_error(urllib3.exceptions.SSLError("wrong version number")),
            UserError,
            "secure: false",
            id="tls-to-a-plain-http-endpoint",
        ),
        pytest.param(
            urllib3.exceptions.ProtocolError("Connection aborted"), StorageUnavailable, "unreachable", id="reset"
        ),
    ],
)
@pytest.mark.parametrize("method", ["get_bytes", "put_bytes", "stat", "verify", "list", "delete"])
def test_errors_say_what_happens_next(
    monkeypatch: pytest.MonkeyPatch, exc: Exception, expected: type[Exception], message: str, method: str
) -> None:
    store = make_store()
    for name in ("get_object", "put_object", "stat_object", "list_objects", "remove_object"):
        monkeypatch.setattr(store.client, name, raising(exc))
    calls: dict[str, Callable[[], object]] = {
        "get_bytes": lambda: store.get_bytes("T/00000/meta.json"),
        "put_bytes": lambda: store.put_bytes("T/00000/meta.json", b"{}"),
        "stat": lambda: store.stat("T/00000/meta.json"),
        "verify": lambda: store.verify("T/00000/meta.json", 2, "0" * 64),
        "list": lambda: list(store.list("T/")),
        "delete": lambda: store.delete("T/00000/meta.json"),
    }

    with pytest.raises(expected, match=message) as info:
        calls[method]()

    assert "s3://mlds/ds1-parity" in str(info.value)
    assert info.value.__cause__ is exc


def test_a_missing_object_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store()
    monkeypatch.setattr(store.client, "get_object", raising(s3_error("NoSuchKey", 404)))
    monkeypatch.setattr(store.client, "stat_object", raising(s3_error("NoSuchKey", 404)))

    assert store.get_bytes("T/00000/meta.json") is None
    assert store.sha256("T/00000/meta.json") is None
    assert store.stat("T/00000/meta.json") is None
    assert store.verify("T/00000/meta.json", 2, "0" * 64) == "missing"
