"""The object store: the one module that talks to object storage (STYLE.md #2).

Two backends behind one small synchronous interface, :class:`Store`:

- :class:`S3Store`: a bucket (MinIO or any S3) through the MinIO SDK. The operator opens it with the
  credentials it read from the campaign's Secret; ``mlds run --store s3://...`` with
  ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``.
- :class:`LocalStore`: a folder, for ``mlds run`` (the default).

Callers: the lease API (presigned upload URLs, verification of completed units), the campaign loop
(manifest parts, checkpoints, the README, per-target data; see :mod:`mlds_operator.storage.manifest`) and the
``mlds dataset`` commands. The API is synchronous; the asyncio server calls it through
``asyncio.to_thread`` (objects are small: a result is ~20 kB, a checkpoint or manifest part a few MB).

Workers hold no storage credentials (DESIGN.md §2). They upload each result file with a plain HTTP
``PUT`` to a URL the server signs for exactly that key, that method and a short lifetime:

- S3: an AWS SigV4 presigned URL (``X-Amz-Expires``, signed headers ``host``). The upload must send
  ``Content-Type: application/octet-stream``: some servers (moto, the S3 test server) store a body sent
  with a form content type as an *empty* object.
- Local: ``{upload_base_url}/v1/objects/{key}?expires=<unix seconds>&scope=<lease>&sig=<hex>``, an
  HMAC-SHA256 over method, key, expiry and scope (the lease the URL was granted under) with a secret
  that never leaves the server (random per store unless the caller keeps one). The lease API hosts that
  route and calls :meth:`LocalStore.check_upload`, then asks the campaign whether the scope's lease
  still holds the key's unit, then :meth:`LocalStore.put_bytes`.

Only staging keys (:data:`STAGING_PREFIX`) are ever signable, by either backend: a result folder, the
checkpoint or the manifest cannot be reached by any URL a worker holds (DESIGN.md §2).

Nothing a worker declares is trusted: the lease service reads every staged result object through
:meth:`Store.verify`, which checks its size and SHA-256 while it streams it (reading no more than the
declared size) and hands back exactly the bytes it checked, before a unit counts as done.

Keys: every method takes a key *relative to the campaign's root* (``ParityMachine/00007/meta.json``).
:meth:`Store.key` validates it (no ``..``, ``.``, empty parts, absolute paths, backslashes or control
characters) and joins the store's prefix.

Errors (mlds_contract.errors): an outage (network, timeout, HTTP 5xx, throttling, a full disk) raises
:class:`StorageUnavailable`, which callers retry with backoff; a configuration mistake (bad credentials,
access denied, a missing bucket that may not be created, a TLS mismatch, an unwritable folder) raises
:class:`UserError` with a message saying what to fix. A missing object is not an error: ``None``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import io
import logging
import os
import re
import secrets
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import check_bucket_name
from mlds_contract.campaign import Storage
from mlds_contract.errors import MldsError, StorageUnavailable, UserError
from mlds_contract.lease import RejectReason
from mlds_contract.routes import UPLOAD

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_RETRIES",
    "STAGING_PREFIX",
    "Checked",
    "CheckedParts",
    "LocalStore",
    "ObjectInfo",
    "S3Store",
    "Store",
    "check_rel",
    "check_signable",
    "open_store",
]

log = logging.getLogger(__name__)

#: Seconds to open a TCP connection to S3. Short: a refused or unroutable endpoint is an outage the
#: caller retries with its own backoff, and the lease API must not stall behind it.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Seconds to wait for the next response bytes (not for the whole body). Objects are small (a result
#: ~20 kB, a manifest part a few MB); a server silent this long is unwell.
DEFAULT_READ_TIMEOUT = 15.0
#: Retries of one request inside the HTTP client (connection errors, read timeouts, HTTP 500/502/503/504),
#: with exponential backoff from 0.2 s. A refused connection surfaces as StorageUnavailable in under a
#: second, a server that accepts and never answers after (1 + retries) * read timeout = 45 s; the caller
#: (the lease API, the campaign loop) then retries on its own schedule.
DEFAULT_RETRIES = 2

#: Where workers' uploads land until the server has verified them; the only keys a URL is ever signed for.
STAGING_PREFIX = "_mlds/staging/"

_CHUNK = 1 << 16
# One key part: printable, no slash or backslash. Control characters would corrupt logs and XML listings.
_BAD_PART = re.compile(r"[\x00-\x1f\x7f\\]")
# Characters urllib.parse.quote(key, safe="/") leaves as they are: a key made of them needs no quoting.
_URL_SAFE_KEY = re.compile(r"[A-Za-z0-9_.~/-]*\Z")
_TMP_MARK = ".mlds-tmp-"
# Where the lease API takes local uploads (its route table's), up to the key: "/v1/objects/".
_UPLOAD_PATH = UPLOAD.path.removesuffix("{key}")

# S3 error codes that mean "the credentials or permissions are wrong": retrying will not help.
_CREDENTIAL_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "AccountProblem",
    }
)
# S3 error codes of a server that is overloaded or briefly unable to serve: retry later.
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "OperationAborted",
        "RequestTimeout",
        "ServiceUnavailable",
        "SlowDown",
        "XMinioServerNotInitialized",
    }
)


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows of one object without reading it."""

    key: str  # relative to the store's root (what the methods take), never prefixed
    size: int
    etag: str | None = None  # S3's ETag (MD5 of a single-part upload); None for local files
    last_modified: datetime | None = None  # timezone-aware UTC, by the store's clock


@dataclass(frozen=True)
class Checked:
    """An object's bytes that matched the declared size and SHA-256, and which version of the object they are."""

    data: bytes
    #: Names exactly the object that was read: S3's ETag (a re-upload after the check makes a new one, which
    #: :meth:`Store.publish` refuses); locally the private link the check made of the file it read.
    version: str


@dataclass(frozen=True)
class CheckedParts:
    """An object's bytes split into parts that matched their declared sizes and SHA-256 (a bundle of files)."""

    parts: tuple[bytes, ...]
    #: Where the store can publish the first part without writing it again: the :attr:`Checked.version` of the
    #: object cut down to its first part (the local store truncates its private link of the file it read), or
    #: None when it cannot (S3: every part is written by :meth:`Store.publish`).
    first: str | None


@runtime_checkable
class Store(Protocol):
    """The object-store interface both backends implement. All keys are relative (see module docs)."""

    @property
    def url(self) -> str:
        """Where the campaign's objects live: ``s3://bucket/prefix`` or ``file:///abs/path``."""
        ...

    def key(self, rel: str) -> str:
        """The backend's name for ``rel`` (prefix-joined). Raises ValueError for an unsafe key."""
        ...

    def put_bytes(self, rel: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store ``data`` at ``rel``, atomically: readers see the old object or the new one, never a part."""
        ...

    def get_bytes(self, rel: str) -> bytes | None:
        """The object's bytes, or None if it does not exist."""
        ...

    def stat(self, rel: str) -> ObjectInfo | None:
        """Size (and ETag, modification time) of an object, or None if it does not exist."""
        ...

    def sha256(self, rel: str) -> str | None:
        """Hex SHA-256 of the object's bytes (streamed), or None if it does not exist."""
        ...

    def list(self, rel_prefix: str = "") -> Iterator[str]:
        """Relative keys starting with ``rel_prefix`` (a plain string prefix, as in S3). Order unspecified."""
        ...

    def scan(self, rel_prefix: str = "") -> Iterator[ObjectInfo]:
        """Like :meth:`list`, with each object's size and modification time."""
        ...

    def delete(self, rel: str) -> None:
        """Remove an object; removing a missing object is not an error."""
        ...

    def presign_put(self, rel: str, expires: timedelta, *, scope: str = "") -> str:
        """A URL that lets its holder ``PUT`` exactly this staging key, until ``expires`` from now.

        ``scope`` names the lease the URL is granted under (the local store signs it and its upload route
        checks the lease is live; an S3 URL is bound to its key and expiry only). Raises ValueError for a
        key outside :data:`STAGING_PREFIX`.
        """
        ...

    def verify(self, rel: str, size: int, sha256: str) -> bytes | RejectReason:
        """The object's bytes when it is exactly ``size`` bytes with this SHA-256 (hex); otherwise why not.

        ``missing``, ``size_mismatch`` or ``sha_mismatch``. Streams and hashes the object in one read and
        stops as soon as it is longer than declared, so a worker that uploaded far more than it declared
        costs at most ``size`` bytes of memory; the bytes returned are the bytes hashed (no second read
        that a late upload could change).
        """
        ...

    def check(self, rel: str, size: int, sha256: str) -> Checked | RejectReason:
        """Like :meth:`verify`, with the :attr:`Checked.version` of exactly the object read (for :meth:`publish`).

        The local store also makes the bytes it checked durable here (an upload is written without a sync:
        it is worth nothing until checked) and keeps them under a private name until they are published.
        """
        ...

    def check_parts(self, rel: str, parts: Sequence[tuple[int, str]]) -> CheckedParts | RejectReason:
        """An object made of ``parts`` (each ``(size, sha256)``, in order), split into their bytes; otherwise why not.

        A bundle: a unit's result files uploaded as one body. ``missing``; ``size_mismatch`` when the object
        is not exactly the parts' total size; ``sha_mismatch`` when a part's bytes do not hash to its
        SHA-256. Read once, bounded by the total, like :meth:`verify`. See :attr:`CheckedParts.first`.
        """
        ...

    def publish(self, moves: Sequence[tuple[str, str, str]], writes: Sequence[tuple[str, bytes]] = ()) -> str | None:
        """Give each ``(src, dst, version)``'s destination the object checked at ``src``, then store ``writes``.

        A move passes no bytes: S3 does a server-side CopyObject conditional on the ETag; locally the private
        link :meth:`check` made of the checked file is renamed. Either way the source key stays (delete it
        later) and the destination gets exactly the checked bytes. Then each ``(dst, data)`` of ``writes`` is
        written atomically, in order. When this returns every destination is durable, and the last one
        (a result's meta.json) became visible only after all the others were durable. Returns the first
        ``src`` that vanished or changed since it was checked (nothing from it on is published, nothing is
        written), or None when every destination was written.
        """
        ...

    def release(self, claims: Sequence[tuple[str, str]]) -> None:
        """Forget ``(src, version)`` pairs :meth:`check` or :meth:`check_parts` gave that will not be published.

        For a refused result: the local store deletes its private links (which no listing shows, so nothing
        else would); S3 keeps nothing per check.
        """
        ...

    def delete_many(self, rels: Sequence[str]) -> None:
        """Remove several objects (S3: one request per 1,000 keys); missing objects are not an error."""
        ...

    def close(self) -> None:
        """Release connections. The store must not be used afterwards."""
        ...


def check_rel(rel: str) -> str:
    """Validate a relative key and return it. Raises ValueError for anything that could escape the root.

    Refused: empty keys, absolute paths, empty parts (``a//b``, a trailing slash), ``.`` and ``..``
    parts, backslashes and control characters. Keys come from target names and replica numbers (and, in
    local mode, from the path of an upload request), so a refusal is a bug or an attack, never a typo.
    """
    # Every key of every request passes here (~20 a result): one scan of the whole key answers for the
    # common case; the part-by-part loop below only runs to say what is wrong.
    wrapped = f"/{rel}/"
    if rel and "//" not in wrapped and "/./" not in wrapped and "/../" not in wrapped and not _BAD_PART.search(rel):
        return rel
    if not rel:
        raise ValueError("empty object key")
    if rel.startswith("/"):
        raise ValueError(f"object key must be relative, got {rel!r}")
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"object key has an empty, '.' or '..' part: {rel!r}")
        if _BAD_PART.search(part):
            raise ValueError(f"object key has a backslash or control character: {rel!r}")
    return rel


def check_signable(rel: str) -> str:
    """``rel`` when an upload URL may name it (a key under :data:`STAGING_PREFIX`); ValueError otherwise."""
    check_rel(rel)
    if not rel.startswith(STAGING_PREFIX):
        raise ValueError(f"only staging keys ({STAGING_PREFIX}...) are signable for upload, not {rel!r}")
    return rel


def _check_prefix(rel_prefix: str) -> str:
    """A listing prefix: empty (everything), or a key prefix that may end in ``/`` or mid-part."""
    if rel_prefix:
        check_rel(rel_prefix.removesuffix("/"))
    return rel_prefix


def _hash_stream(chunks: Iterator[bytes], limit: int | None = None) -> tuple[int, str]:
    """Size and hex SHA-256 of a byte stream; stops reading once past ``limit`` bytes (size then exceeds it)."""
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
        if limit is not None and size > limit:
            break
    return size, digest.hexdigest()


def _read_declared(chunks: Iterator[bytes], size: int, sha256: str) -> bytes | RejectReason:
    """A stream's bytes when they are exactly ``size`` bytes with this SHA-256; else why not.

    Stops reading at the first chunk past ``size``: an object larger than declared is never read to its end.
    """
    digest = hashlib.sha256()
    parts: list[bytes] = []
    got = 0
    for chunk in chunks:
        got += len(chunk)
        if got > size:
            return RejectReason.size_mismatch
        digest.update(chunk)
        parts.append(chunk)
    if got != size:
        return RejectReason.size_mismatch
    if not hmac.compare_digest(digest.hexdigest(), sha256.lower()):
        return RejectReason.sha_mismatch
    return b"".join(parts)


def _read_parts(chunks: Iterator[bytes], parts: Sequence[tuple[int, str]]) -> tuple[bytes, ...] | RejectReason:
    """A stream split into ``parts`` (``(size, sha256)`` each) when its size is their total and each hashes right."""
    total = sum(size for size, _ in parts)
    data = bytearray()
    for chunk in chunks:
        data += chunk
        if len(data) > total:
            return RejectReason.size_mismatch
    if len(data) != total:
        return RejectReason.size_mismatch
    out: list[bytes] = []
    view = memoryview(data)
    start = 0
    for size, sha256 in parts:
        piece = bytes(view[start : start + size])
        start += size
        if not hmac.compare_digest(hashlib.sha256(piece).hexdigest(), sha256.lower()):
            return RejectReason.sha_mismatch
        out.append(piece)
    return tuple(out)


# --------------------------------------------------------------------------------------------------- S3


def _http_client(connect_timeout: float, read_timeout: float, retries: int, cert_check: bool) -> urllib3.PoolManager:
    """The MinIO SDK's default pool, with bounded timeouts and retries.

    The SDK's own default waits 5 minutes per read and retries 5 times: an outage would hang the lease
    API (and a test) for half an hour. Here one call gives up after about
    ``(retries + 1) * (connect or read timeout) + backoff`` and raises StorageUnavailable.
    """
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        # The server calls the store from a thread pool; one connection per thread avoids churn.
        maxsize=32,
        cert_reqs="CERT_REQUIRED" if cert_check else "CERT_NONE",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=retries,
            backoff_factor=0.2,
            status_forcelist=[500, 502, 503, 504],
            # A retried PUT is safe (it overwrites with the same bytes).
            allowed_methods=frozenset({"GET", "HEAD", "PUT", "DELETE"}),
        ),
    )


class S3Store:
    """A campaign's objects under ``prefix`` in an S3 bucket, through one MinIO client made at construction.

    Construction does no network I/O; :meth:`ensure_bucket` (called by :func:`open_store`) checks the
    bucket and creates it when allowed.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        prefix: str = "",
        access_key: str | None,
        secret_key: str | None,
        session_token: str | None = None,
        secure: bool = True,
        region: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        cert_check: bool = True,
    ) -> None:
        if "://" in endpoint:
            raise UserError(
                f"storage.endpoint must be host:port without a scheme, got {endpoint!r} "
                "(use secure: false for plain HTTP)"
            )
        self.endpoint = endpoint
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            try:
                check_rel(self.prefix)
            except ValueError as exc:
                raise UserError(f"invalid storage.prefix {prefix!r}: {exc}") from exc
        self.secure = secure
        self.region = region
        try:
            self._client = Minio(
                endpoint,
                access_key=access_key,
                secret_key=secret_key,
                session_token=session_token,
                secure=secure,
                region=region,
                http_client=_http_client(connect_timeout, read_timeout, retries, cert_check),
            )
            check_bucket_name(bucket)
        except ValueError as exc:  # the SDK validates the endpoint and the bucket name
            raise UserError(f"invalid storage settings (endpoint {endpoint!r}, bucket {bucket!r}): {exc}") from exc

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def client(self) -> Minio:
        """The underlying MinIO client (for tests and tools; production code goes through the methods)."""
        return self._client

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint!r})"

    def key(self, rel: str) -> str:
        check_rel(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def _error(self, exc: Exception, doing: str) -> MldsError:
        """Map an SDK or transport exception onto the mlds tree (see the module docs)."""
        where = f"{doing} in {self.url} (endpoint {self.endpoint})"
        if isinstance(exc, S3Error):
            return self._s3_error(exc, where)
        status: int | None = None
        if isinstance(exc, ServerError):
            status = exc.status_code
        elif isinstance(exc, InvalidResponseError):  # not S3 XML: a proxy's error page, or not S3 at all
            status = int(getattr(exc, "_code", 0) or 0)
        if status is not None:
            if status >= 500 or status in (408, 429):
                return StorageUnavailable(f"object store unavailable while {where}: HTTP {status}")
            return UserError(f"{self.endpoint} does not answer like an S3 server while {where}: {exc}")
        reason = getattr(exc, "reason", None)  # urllib3's MaxRetryError wraps the last connection error
        if isinstance(reason, urllib3.exceptions.SSLError):
            return UserError(
                f"TLS failed while {where}: {reason}; if the endpoint speaks plain HTTP, set storage.secure: false"
            )
        return StorageUnavailable(f"object store unreachable while {where}: {reason or exc}")

    def _s3_error(self, exc: S3Error, where: str) -> MldsError:
        code = exc.code or ""
        status = exc.response.status if exc.response is not None else 0
        if code in _CREDENTIAL_CODES:
            return UserError(
                f"object store refused {where}: {code} ({exc.message}); check the credentials "
                "(the campaign's credentialsSecret, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) "
                "and the bucket policy"
            )
        if code == "NoSuchBucket":
            return UserError(f"bucket {self.bucket!r} does not exist while {where}")
        if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
            return StorageUnavailable(f"object store unavailable while {where}: {code} ({exc.message})")
        return UserError(f"object store rejected {where}: {code} ({exc.message})")

    def _call(self, doing: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(exc, doing) from exc

    def ensure_bucket(self, *, create: bool = True) -> None:
        """Check the bucket exists; create it if allowed. Raises UserError or StorageUnavailable."""
        if self._call("checking bucket", lambda: self._client.bucket_exists(self.bucket)):
            return
        if not create:
            raise UserError(f"bucket {self.bucket!r} does not exist at {self.endpoint} and may not be created")
        try:
            self._client.make_bucket(self.bucket, location=self.region)
            log.info("created bucket=%s endpoint=%s", self.bucket, self.endpoint)
        except S3Error as exc:
            # Created concurrently by another operator replica or `mlds run`: fine.
            if exc.code != "BucketAlreadyOwnedByYou":
                raise self._error(exc, "creating bucket") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(exc, "creating bucket") from exc

    def put_bytes(self, rel: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        # A single PUT is atomic in S3 (and MinIO): a reader sees the old object or the new one.
        key = self.key(rel)
        self._call(
            f"writing {rel}",
            # BytesIO over bytes shares the buffer (no copy) until written to.
            lambda: self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type),
        )

    def _open(self, rel: str) -> Any | None:
        """A streaming GET response, or None for a missing object."""
        key = self.key(rel)
        try:
            return self._client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                return None
            raise self._error(exc, f"reading {rel}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(exc, f"reading {rel}") from exc

    def _consume(self, rel: str, response: Any, fn: Callable[[Any], Any]) -> Any:
        try:
            return fn(response)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(exc, f"reading {rel}") from exc
        finally:
            response.close()
            response.release_conn()

    def get_bytes(self, rel: str) -> bytes | None:
        response = self._open(rel)
        if response is None:
            return None
        data: bytes = self._consume(rel, response, lambda r: r.read())
        return data

    def stat(self, rel: str) -> ObjectInfo | None:
        key = self.key(rel)
        try:
            obj = self._client.stat_object(self.bucket, key)
        except S3Error as exc:
            # A HEAD has no body: a missing bucket also reads as NoSuchKey here.
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                return None
            raise self._error(exc, f"reading {rel}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(exc, f"reading {rel}") from exc
        return ObjectInfo(key=rel, size=int(obj.size or 0), etag=obj.etag, last_modified=obj.last_modified)

    def sha256(self, rel: str) -> str | None:
        response = self._open(rel)
        if response is None:
            return None
        _, digest = self._consume(rel, response, lambda r: _hash_stream(r.stream(_CHUNK)))
        return str(digest)

    def scan(self, rel_prefix: str = "") -> Iterator[ObjectInfo]:
        _check_prefix(rel_prefix)
        prefix = f"{self.prefix}/{rel_prefix}" if self.prefix else rel_prefix
        doing = f"listing {rel_prefix or '/'}"
        try:
            for obj in self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True):
                if obj.is_dir or obj.object_name is None:
                    continue
                yield ObjectInfo(
                    key=self._rel(obj.object_name),
                    size=int(obj.size or 0),
                    etag=obj.etag,
                    last_modified=obj.last_modified,
                )
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(exc, doing) from exc

    def list(self, rel_prefix: str = "") -> Iterator[str]:
        return (info.key for info in self.scan(rel_prefix))

    def delete(self, rel: str) -> None:
        key = self.key(rel)
        self._call(f"deleting {rel}", lambda: self._client.remove_object(self.bucket, key))

    def presign_put(self, rel: str, expires: timedelta, *, scope: str = "") -> str:
        """A SigV4 presigned PUT for exactly this staging key. No network I/O when the store has a region.

        Without a region the SDK asks the server for the bucket's location once (then caches it).
        ``scope`` is not part of an S3 URL: S3 knows nothing of leases (the completion checks the rest).
        """
        del scope
        key = self.key(check_signable(rel))
        if not timedelta(seconds=1) <= expires <= timedelta(days=7):
            raise ValueError(f"presigned URL lifetime must be between 1 second and 7 days, got {expires}")
        url: str = self._call(f"signing {rel}", lambda: self._client.presigned_put_object(self.bucket, key, expires))
        return url

    def verify(self, rel: str, size: int, sha256: str) -> bytes | RejectReason:
        got = self.check(rel, size, sha256)
        return got.data if isinstance(got, Checked) else got

    def check(self, rel: str, size: int, sha256: str) -> Checked | RejectReason:
        # One GET, not HEAD + GET: the Content-Length answers the size, the body the hash. A body larger
        # than declared is not read to the end (a misbehaving worker could have uploaded gigabytes).
        response = self._open(rel)
        if response is None:
            return RejectReason.missing

        def read(r: Any) -> Checked | RejectReason:
            length = r.headers.get("Content-Length")
            if length is not None and int(length) != size:
                return RejectReason.size_mismatch
            data = _read_declared(r.stream(_CHUNK), size, sha256)
            if isinstance(data, RejectReason):
                return data
            return Checked(data=data, version=str(r.headers.get("ETag") or ""))

        result: Checked | RejectReason = self._consume(rel, response, read)
        return result

    def check_parts(self, rel: str, parts: Sequence[tuple[int, str]]) -> CheckedParts | RejectReason:
        response = self._open(rel)
        if response is None:
            return RejectReason.missing

        def read(r: Any) -> CheckedParts | RejectReason:
            length = r.headers.get("Content-Length")
            if length is not None and int(length) != sum(size for size, _ in parts):
                return RejectReason.size_mismatch
            got = _read_parts(r.stream(_CHUNK), parts)
            # A copy cannot cut an object down to its first part: publish() writes every part.
            return got if isinstance(got, RejectReason) else CheckedParts(parts=got, first=None)

        result: CheckedParts | RejectReason = self._consume(rel, response, read)
        return result

    def publish(self, moves: Sequence[tuple[str, str, str]], writes: Sequence[tuple[str, bytes]] = ()) -> str | None:
        # CopyObject: the server copies; nothing is downloaded or uploaded again. x-amz-copy-source-if-match
        # makes the copy fail (412) if a worker replaced the staged object after it was checked. An
        # acknowledged PUT is durable in S3, and they are sent one after the other: the last is stored last.
        changed = self._copy(moves)
        if changed is not None:
            return changed
        for dst, data in writes:
            self.put_bytes(dst, data, content_type_of(dst))
        return None

    def release(self, claims: Sequence[tuple[str, str]]) -> None:
        del claims  # a version is an ETag: nothing was kept

    def _copy(self, moves: Sequence[tuple[str, str, str]]) -> str | None:
        for src, dst, version in moves:
            source = CopySource(self.bucket, self.key(src), match_etag=version or None)
            key = self.key(dst)
            headers: dict[str, str | list[str] | tuple[str]] = {
                "Content-Type": content_type_of(dst),
                "x-amz-metadata-directive": REPLACE,
                **source.gen_copy_headers(),
            }
            try:
                # The SDK's copy_object first HEADs the source to choose between CopyObject and a multipart
                # copy (objects over 5 GiB): one more request per file. Result files are bounded far below
                # that (MAX_RESULT_FILE_BYTES), so send the CopyObject request itself.
                response = self._client._execute("PUT", self.bucket, object_name=key, headers=headers)
                if b"<Error>" in response.data[:512]:  # S3 may fail a copy inside a 200 answer
                    raise StorageUnavailable(f"object store failed copying {src} to {dst} in {self.url}")
            except S3Error as exc:
                if exc.code in ("PreconditionFailed", "NoSuchKey"):
                    return src
                raise self._error(exc, f"copying {src} to {dst}") from exc
            except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise self._error(exc, f"copying {src} to {dst}") from exc
        return None

    def delete_many(self, rels: Sequence[str]) -> None:
        for start in range(0, len(rels), 1000):  # S3's DeleteObjects takes at most 1,000 keys
            batch = [DeleteObject(self.key(rel)) for rel in rels[start : start + 1000]]
            doing = f"deleting {len(batch)} objects"
            try:
                errors = list(self._client.remove_objects(self.bucket, batch))
            except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise self._error(exc, doing) from exc
            failed = [e for e in errors if e.code != "NoSuchKey"]
            if failed:
                raise StorageUnavailable(
                    f"object store refused {doing} in {self.url}: {failed[0].code} {failed[0].message}"
                )

    def close(self) -> None:
        self._client._http.clear()


# ------------------------------------------------------------------------------------------------ local


def content_type_of(name: str) -> str:
    """The Content-Type a result file is stored with (S3 serves it back; a folder has none)."""
    if name.endswith(".json"):
        return "application/json"
    if name.endswith(".csv"):
        return "text/csv"
    return "application/octet-stream"


def _fsync_dir(path: Path | str) -> None:
    """Make a rename in ``path`` durable. Directories cannot be opened for fsync on every OS; skip there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the file itself was synced
    finally:
        os.close(fd)


class LocalStore:
    """A campaign's objects as files under ``root`` (``mlds run``'s default store).

    Writes are atomic and durable: a temporary file in the same folder, fsync, ``os.replace``, then an
    fsync of the folder, so a crash leaves the old object or the new one, never a torn file. Temporary
    files (``.<name>.mlds-tmp-<id>``) are never listed.

    Uploads from worker processes go through the lease API's ``PUT /v1/objects/{key}`` route:
    :meth:`presign_put` signs ``(PUT, key, expiry, scope)`` with HMAC-SHA256 and a per-store secret, and the
    route calls :meth:`check_upload` before :meth:`put_bytes`. The secret is random per store object
    unless given (``mlds run`` keeps a random one in its state folder so URLs survive its restart); it is
    never derived from anything a worker knows.
    """

    def __init__(
        self,
        root: Path,
        *,
        upload_base_url: str | None = None,
        secret: bytes | None = None,
        clock: Callable[[], float] = time.time,
        durable: bool = True,
    ) -> None:
        self.root = Path(root).expanduser().absolute()
        #: Base URL of the server hosting the upload route, e.g. ``http://127.0.0.1:8080``. Settable after
        #: construction: `mlds run` knows its port only once the lease API is listening.
        self.upload_base_url = upload_base_url
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._clock = clock
        self._durable = durable
        self._root_str = str(self.root)

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def ensure_root(self) -> None:
        """Create the folder if needed and check it is writable. Raises UserError."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the store folder {self.root}: {exc.strerror or exc}") from exc
        if not self.root.is_dir():
            raise UserError(f"store path {self.root} exists and is not a folder")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise UserError(f"store folder {self.root} is not writable")

    def key(self, rel: str) -> str:
        return check_rel(rel)

    def path(self, rel: str) -> Path:
        """The file that holds ``rel``."""
        return self.root.joinpath(*self.key(rel).split("/"))

    def _file(self, rel: str) -> str:
        """:meth:`path` as a string, without pathlib (the hot paths call it several times per result)."""
        key = self.key(rel)
        return self._root_str + os.sep + (key if os.sep == "/" else key.replace("/", os.sep))

    def _error(self, exc: OSError, doing: str) -> Exception:
        if exc.errno in (errno.ENOTDIR, errno.EISDIR):
            return UserError(f"{doing} in {self.root}: a file and a folder share a name ({exc})")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return UserError(f"{doing} in {self.root}: permission denied ({exc})")
        return StorageUnavailable(f"{doing} in {self.root} failed: {exc.strerror or exc}")

    def put_bytes(self, rel: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        del content_type  # files have no content type; kept for the common interface
        path = self._file(rel)
        try:
            self._write(path, data, sync=self._durable)
            if self._durable:
                _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise self._error(exc, f"writing {rel}") from exc

    @staticmethod
    def _write(path: str, data: bytes, *, sync: bool) -> None:
        """Write ``path`` atomically (a temporary file renamed over it), its folders made on the first write.

        ``sync``: the bytes are on disk before the name is (otherwise a power loss can leave a renamed,
        empty file); making the name itself durable is the caller's folder sync.
        """
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}{_TMP_MARK}{uuid.uuid4().hex}")
        try:
            try:
                fh = open(tmp, "wb")  # noqa: SIM115 - closed below; mkdir only on the first file of a folder
            except FileNotFoundError:
                os.makedirs(folder, exist_ok=True)
                fh = open(tmp, "wb")  # noqa: SIM115
            with fh:
                fh.write(data)
                if sync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _read(self, rel: str, fn: Callable[[IO[bytes]], Any]) -> Any | None:
        path = self._file(rel)
        try:
            with open(path, "rb") as fh:
                return fn(fh)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None  # missing, or a "folder" key prefix, or below a file: no such object (as in S3)
        except OSError as exc:
            raise self._error(exc, f"reading {rel}") from exc

    def get_bytes(self, rel: str) -> bytes | None:
        data: bytes | None = self._read(rel, lambda fh: fh.read())
        return data

    def stat(self, rel: str) -> ObjectInfo | None:
        path = self.path(rel)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._error(exc, f"reading {rel}") from exc
        if not path.is_file():
            return None
        return ObjectInfo(key=rel, size=st.st_size, last_modified=datetime.fromtimestamp(st.st_mtime, UTC))

    def sha256(self, rel: str) -> str | None:
        result: tuple[int, str] | None = self._read(rel, lambda fh: _hash_stream(iter(lambda: fh.read(_CHUNK), b"")))
        return None if result is None else result[1]

    def scan(self, rel_prefix: str = "") -> Iterator[ObjectInfo]:
        _check_prefix(rel_prefix)
        # S3 prefixes are plain strings ("Parity/0" matches "Parity/00012/meta.json"): walk the deepest
        # folder the prefix names completely, then filter by the full prefix.
        folder, _, _ = rel_prefix.rpartition("/")
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        if not start.is_dir():
            return
        try:
            for dirpath, dirnames, filenames in os.walk(start):
                base = Path(dirpath).relative_to(self.root).as_posix()
                # Descend only into folders that can hold a match ("_mlds/staging/12-" walks the attempt
                # folders of unit 12, not all of staging).
                below = "" if base == "." else f"{base}/"
                dirnames[:] = sorted(
                    d
                    for d in dirnames
                    if f"{below}{d}/".startswith(rel_prefix) or rel_prefix.startswith(f"{below}{d}/")
                )
                for name in sorted(filenames):
                    if _TMP_MARK in name:
                        continue
                    rel = name if base == "." else f"{base}/{name}"
                    if not rel.startswith(rel_prefix):
                        continue
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue  # deleted while listing
                    yield ObjectInfo(key=rel, size=st.st_size, last_modified=datetime.fromtimestamp(st.st_mtime, UTC))
        except OSError as exc:
            raise self._error(exc, f"listing {rel_prefix or '/'}") from exc

    def list(self, rel_prefix: str = "") -> Iterator[str]:
        return (info.key for info in self.scan(rel_prefix))

    def delete(self, rel: str) -> None:
        try:
            self.path(rel).unlink(missing_ok=True)
        except IsADirectoryError:
            return
        except OSError as exc:
            raise self._error(exc, f"deleting {rel}") from exc

    def _sign(self, key: str, expires: int, scope: str) -> str:
        message = f"PUT\n{key}\n{expires}\n{scope}".encode("utf-8", "surrogateescape")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def presign_put(self, rel: str, expires: timedelta, *, scope: str = "") -> str:
        """``{upload_base_url}/v1/objects/{key}?expires=<unix seconds>&scope=<scope>&sig=<hex>`` for this key."""
        key = self.key(check_signable(rel))
        if not _URL_SAFE_KEY.match(scope) or "/" in scope:
            raise ValueError(f"an upload scope is a URL-safe token, got {scope!r}")
        if self.upload_base_url is None:
            raise RuntimeError("LocalStore.upload_base_url is not set: no server hosts the upload route")
        if expires <= timedelta(0):
            raise ValueError(f"presigned URL lifetime must be positive, got {expires}")
        deadline = int(self._clock() + expires.total_seconds())
        # A lease presigns a URL per result file, on the lease server's event loop: build it by hand. The
        # expiry is an integer and the signature hex, so nothing needs escaping; urlencode and quote cost
        # more than the HMAC (`mlds bench leases`).
        path = key if _URL_SAFE_KEY.match(key) else urllib.parse.quote(key, safe="/")
        sig = self._sign(key, deadline, scope)
        return f"{self.upload_base_url.rstrip('/')}{_UPLOAD_PATH}{path}?expires={deadline}&scope={scope}&sig={sig}"

    def check_upload(
        self, key: str, expires: int | str, sig: str, now: float | None = None, *, scope: str = ""
    ) -> bool:
        """Does ``sig`` authorise a PUT of ``key`` (the URL-decoded path after ``/v1/objects/``) at ``now``?

        False for another key or scope, a tampered or malformed signature or expiry (any text: a
        non-ASCII signature is just a wrong one), a key that is not a staging key, or a URL past its
        expiry. ``now`` is Unix seconds; default: the store's clock.
        """
        text = str(expires)
        if not (text.isascii() and text.isdigit() and len(text) <= 12):
            return False
        try:
            check_signable(key)
        except ValueError:
            return False
        deadline = int(text)
        # Bytes, not str: compare_digest refuses non-ASCII strings with a TypeError (which was a 500).
        given = str(sig).encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(self._sign(key, deadline, scope).encode(), given):
            return False
        return (self._clock() if now is None else now) <= deadline

    def put_upload(self, rel: str, data: bytes) -> None:
        """Store a worker's upload: atomic like :meth:`put_bytes`, but not synced to disk.

        An upload is worth nothing until it is verified: :meth:`check` syncs the bytes it verified, and
        what :meth:`check_parts` cuts down or :meth:`verify` returns is synced where it is kept, so syncing
        here too would only double the cost.
        """
        try:
            self._write(self._file(rel), data, sync=False)
        except OSError as exc:
            raise self._error(exc, f"writing {rel}") from exc

    def verify(self, rel: str, size: int, sha256: str) -> bytes | RejectReason:
        # Only read: nothing publishes these bytes by name (no sync, no private link, unlike check()).
        def read(fh: IO[bytes]) -> bytes | RejectReason:
            if os.fstat(fh.fileno()).st_size != size:
                return RejectReason.size_mismatch
            return _read_declared(iter(lambda: fh.read(_CHUNK), b""), size, sha256)

        result: bytes | RejectReason | None = self._read(rel, read)
        return RejectReason.missing if result is None else result

    def check_parts(self, rel: str, parts: Sequence[tuple[int, str]]) -> CheckedParts | RejectReason:
        """See :meth:`Store.check_parts`. The file read becomes the first part's: one new file less per result.

        Creating a file is the costliest thing a result does to a local store (a ds1 result: a folder and
        three files). So the checked bundle is claimed like :meth:`check` claims a file, then cut down to
        its first part in place and synced: :meth:`publish` moves it into the result folder by a rename,
        and only the other parts are written as new files.
        """
        path = self._file(rel)

        def read(fh: IO[bytes]) -> CheckedParts | RejectReason:
            st = os.fstat(fh.fileno())
            if st.st_size != sum(size for size, _ in parts):
                return RejectReason.size_mismatch
            got = _read_parts(iter(lambda: fh.read(_CHUNK), b""), parts)
            if isinstance(got, RejectReason):
                return got
            token = self._claim(path, st.st_ino)
            if token is None:
                return RejectReason.sha_mismatch  # replaced while being checked
            claimed = f"{path}{_TMP_MARK}{token}"
            # The claimed link is private and every upload is a new file (put_upload renames one into place),
            # so nothing but this truncation changes the file it names.
            with open(claimed, "r+b") as out:
                out.truncate(parts[0][0])
                if self._durable:
                    os.fsync(out.fileno())
            return CheckedParts(parts=got, first=token)

        result: CheckedParts | RejectReason | None = self._read(rel, read)
        return RejectReason.missing if result is None else result

    @staticmethod
    def _claim(path: str, inode: int) -> str | None:
        """A private hard link to ``path`` when it still names ``inode`` (a file held open): its version, or None.

        The open descriptor keeps the checked inode alive, so an equal inode number means the link is that
        file, not a newer upload renamed over the staged name meanwhile.
        """
        token = uuid.uuid4().hex
        claimed = f"{path}{_TMP_MARK}{token}"
        os.link(path, claimed)
        if os.lstat(claimed).st_ino != inode:
            os.unlink(claimed)
            return None
        return token

    def check(self, rel: str, size: int, sha256: str) -> Checked | RejectReason:
        path = self._file(rel)

        def read(fh: IO[bytes]) -> Checked | RejectReason:
            st = os.fstat(fh.fileno())
            if st.st_size != size:  # the open file's size: no read, no race with a rename
                return RejectReason.size_mismatch
            data = _read_declared(iter(lambda: fh.read(_CHUNK), b""), size, sha256)
            if isinstance(data, RejectReason):
                return data
            if self._durable:
                os.fsync(fh.fileno())  # uploads are written unsynced (put_upload); what is published is synced
            # Claim the checked file under a private name (a hard link) that no upload URL can reach.
            token = self._claim(path, st.st_ino)
            if token is None:
                return RejectReason.sha_mismatch  # replaced while being checked
            return Checked(data=data, version=token)

        result: Checked | RejectReason | None = self._read(rel, read)
        return RejectReason.missing if result is None else result

    def publish(self, moves: Sequence[tuple[str, str, str]], writes: Sequence[tuple[str, bytes]] = ()) -> str | None:
        """See :meth:`Store.publish`. Two folder syncs for a result, whatever its number of files.

        Every file's bytes are synced before it is named (by :meth:`check` for a moved file, here for a
        written one). The folders are synced once before the last file is named (so a folder with a
        meta.json holds every other file after a crash) and the last file's folder once after (so a
        result is durable when the completion is acknowledged).
        """
        steps = len(moves) + len(writes)
        touched: set[str] = set()  # folders that got a file, synced before the last one is named
        for i, (src, dst, version) in enumerate(moves):
            # check() left each verified file under a private name (staged name + version): renaming it moves
            # exactly the bytes that were checked, whatever was uploaded to the staged name since.
            if not version.isalnum():
                raise ValueError(f"not a version this store gave: {version!r}")
            claimed = self._file(src) + _TMP_MARK + version
            target = self._file(dst)
            try:
                self._before(i == steps - 1, touched)
                try:
                    os.replace(claimed, target)
                except FileNotFoundError:
                    if not os.path.exists(claimed):
                        return src
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    os.replace(claimed, target)
                self._after(i == steps - 1, target, touched)
            except OSError as exc:
                raise self._error(exc, f"publishing {src} as {dst}") from exc
        for i, (dst, data) in enumerate(writes, start=len(moves)):
            target = self._file(dst)
            try:
                self._before(i == steps - 1, touched)
                self._write(target, data, sync=self._durable)
                self._after(i == steps - 1, target, touched)
            except OSError as exc:
                raise self._error(exc, f"writing {dst}") from exc
        return None

    def release(self, claims: Sequence[tuple[str, str]]) -> None:
        for src, version in claims:
            if not version.isalnum():
                raise ValueError(f"not a version this store gave: {version!r}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(src) + _TMP_MARK + version)

    def _before(self, last: bool, touched: set[str]) -> None:
        if self._durable and last:
            for folder in touched:
                _fsync_dir(folder)

    def _after(self, last: bool, target: str, touched: set[str]) -> None:
        folder = os.path.dirname(target)
        if self._durable and last:
            _fsync_dir(folder)
        touched.add(folder)

    def _prune(self, folder: str) -> None:
        """Remove ``folder`` and its parents while they are empty (S3 has no folders; staging leaves many)."""
        while folder.startswith(self._root_str + os.sep):
            try:
                os.rmdir(folder)
            except OSError:
                return  # not empty (or gone): stop
            folder = os.path.dirname(folder)

    def delete_many(self, rels: Sequence[str]) -> None:
        folders = set()
        for rel in rels:
            path = os.path.join(self._root_str, *self.key(rel).split("/"))
            try:
                os.unlink(path)
                folders.add(os.path.dirname(path))
            except FileNotFoundError:
                continue
            except IsADirectoryError:
                continue
            except OSError as exc:
                raise self._error(exc, f"deleting {rel}") from exc
        for folder in folders:
            self._prune(folder)

    def close(self) -> None:
        """Nothing to release; for the common interface."""


# ------------------------------------------------------------------------------------------------- open


def open_store(
    storage: Storage | None,
    *,
    local_root: Path | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    session_token: str | None = None,
    upload_base_url: str | None = None,
    upload_secret: bytes | None = None,
    create_bucket: bool = True,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
) -> Store:
    """Open a campaign's store and check it is usable (bucket present or created; folder writable).

        ``storage`` is the campaign's ``spec.storage``: None means a folder at ``local_root``. S3 credentials
        come from the arguments (the operator reads them from the campaign's Secret) or, when those are
        absent, from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``), as `mlds run`
        uses. ``upload_base_url`` is the lease API's base URL for local presigned uploads (may be set later
        on the returned LocalStore); ``upload_secret`` signs those URLs (default: random, so they die with the
    store object). Raises UserError (configuration) or StorageUnavailable (outage).
    """
    if storage is None:
        if local_root is None:
            raise UserError("the campaign has no spec.storage and no local folder was given (--store)")
        local = LocalStore(local_root, upload_base_url=upload_base_url, secret=upload_secret)
        local.ensure_root()
        return local
    if access_key is None and secret_key is None:
        access_key = os.environ.get("AWS_ACCESS_KEY_ID")
        secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY")
        session_token = session_token or os.environ.get("AWS_SESSION_TOKEN")
    if not access_key or not secret_key:
        raise UserError(
            f"no credentials for s3://{storage.bucket} at {storage.endpoint}: set storage.credentialsSecret "
            "(operator) or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (mlds run)"
        )
    s3 = S3Store(
        endpoint=storage.endpoint,
        bucket=storage.bucket,
        prefix=storage.prefix,
        access_key=access_key,
        secret_key=secret_key,
        session_token=session_token,
        secure=storage.secure,
        region=storage.region,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries=retries,
    )
    s3.ensure_bucket(create=create_bucket)
    return s3
