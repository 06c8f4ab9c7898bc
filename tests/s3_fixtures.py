"""pytest plugin: a real S3 protocol server on loopback (moto's ThreadedMotoServer), and stores on it.

Production code talks to it through the real MinIO SDK over real HTTP; only the server is a stand-in
(DESIGN.md §6). Load it from a test module (or the root conftest) with::

    pytest_plugins = ["tests.s3_fixtures"]

which needs the repository root on ``sys.path`` (``python -m pytest`` from the root does that).

Fixtures:

- ``s3_server`` (session): the running server, an :class:`S3Server` (endpoint, credentials, region,
  helpers to build clients, Storage specs and stores). Starting it isolates the environment for the
  session: fake ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (so ``mlds run``'s env fallback finds
  them and nothing can reach real AWS), no AWS profile or config files, no proxy for loopback.
- ``s3_bucket`` (function): the name of a fresh, empty bucket.
- ``s3_storage`` (function): a campaign ``Storage`` spec for that bucket, prefix ``campaign``.
- ``s3_store`` (function): an :class:`~mlds_operator.storage.store.S3Store` opened on it through ``open_store``.
- ``minio_client`` (function): a raw ``minio.Minio`` client for the server (to inspect or tamper
  behind the store's back).

Every client made here has short timeouts (2 s to connect, 5 s to read) and one retry, so an outage
fails a test in seconds instead of hanging it for minutes. :func:`moto_server` starts a private server, for tests that
stop or break it. Remember moto's two differences from MinIO: it checks neither presigned signatures
nor expiry, and stores a presigned PUT sent with a form content type as an empty object.

PYTEST_DONT_REWRITE: test modules may both list this plugin and import its helpers (S3Server,
moto_server); pytest would otherwise warn that it was imported before it could rewrite its asserts
(it has none).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import urllib3
from minio import Minio
from mlds_contract.campaign import Storage
from mlds_operator.storage.store import S3Store, open_store
from moto.server import ThreadedMotoServer

__all__ = [
    "S3Server",
    "minio_client",
    "moto_server",
    "s3_bucket",
    "s3_server",
    "s3_storage",
    "s3_store",
]

ACCESS_KEY = "mlds-test-access"
SECRET_KEY = "mlds-test-secret"  # fake, for a loopback test server; never a real credential
REGION = "us-east-1"
#: Seconds. A loopback server answers in milliseconds, but this machine is shared and moto loads its S3
#: backend lazily: generous enough not to flake, short enough that an outage fails a test in seconds.
TEST_CONNECT_TIMEOUT = 2.0
TEST_READ_TIMEOUT = 5.0
TEST_RETRIES = 1

# Variables that could point the SDKs at real AWS accounts or proxies.
_AWS_VARS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
)


@dataclass(frozen=True)
class S3Server:
    """A running S3 test server and how to reach it."""

    endpoint: str  # host:port, as storage.endpoint takes it
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def client(self) -> Minio:
        """A MinIO client with test timeouts (1 s, one retry)."""
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=self.region,
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=TEST_CONNECT_TIMEOUT, read=TEST_READ_TIMEOUT),
                retries=urllib3.Retry(total=TEST_RETRIES, backoff_factor=0.05),
            ),
        )

    def storage(self, bucket: str, prefix: str = "campaign") -> Storage:
        """A campaign ``spec.storage`` for this server."""
        return Storage(endpoint=self.endpoint, bucket=bucket, prefix=prefix, secure=False, region=self.region)

    def open(self, bucket: str, prefix: str = "campaign", **kwargs: Any) -> S3Store:
        """``open_store`` on this server with test timeouts; keyword arguments override."""
        options: dict[str, Any] = {
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "connect_timeout": TEST_CONNECT_TIMEOUT,
            "read_timeout": TEST_READ_TIMEOUT,
            "retries": TEST_RETRIES,
            **kwargs,
        }
        store = open_store(self.storage(bucket, prefix), **options)
        if not isinstance(store, S3Store):
            raise TypeError(f"open_store gave {store!r} for an S3 storage spec")
        return store


@contextmanager
def moto_server() -> Iterator[tuple[S3Server, ThreadedMotoServer]]:
    """A private moto S3 server on a free loopback port; stopped (and its socket closed) on exit."""
    # Werkzeug logs every request at INFO; keep test reports readable.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    info = S3Server(endpoint=f"{host}:{port}")
    try:
        # Warm up: moto imports its S3 backend on the first request, which can take seconds on a busy box.
        Minio(info.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False, region=REGION).list_buckets()
        yield info, server
    finally:
        stop_moto_server(server)


def stop_moto_server(server: ThreadedMotoServer) -> None:
    """Stop serving and close the listening socket, so new connections are refused (a dead server).

    ``ThreadedMotoServer.stop`` alone leaves the socket listening: connections would be accepted by the
    kernel and then hang. Idempotent.
    """
    wsgi = server._server
    if wsgi is None:
        return
    if server._server_ready_event.is_set():
        server.stop()
    wsgi.server_close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with pytest.MonkeyPatch.context() as mp:
        for name in _AWS_VARS:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        with moto_server() as (info, _):
            yield info


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket (unique name: buckets are never shared between tests)."""
    name = f"mlds-test-{uuid.uuid4().hex[:16]}"
    s3_server.client().make_bucket(name)
    return name


@pytest.fixture
def s3_storage(s3_server: S3Server, s3_bucket: str) -> Storage:
    return s3_server.storage(s3_bucket)


@pytest.fixture
def s3_store(s3_server: S3Server, s3_bucket: str) -> Iterator[S3Store]:
    store = s3_server.open(s3_bucket)
    yield store
    store.close()


@pytest.fixture
def minio_client(s3_server: S3Server) -> Minio:
    return s3_server.client()
