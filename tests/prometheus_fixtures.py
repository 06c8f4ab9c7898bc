"""A real Prometheus server for tests: Debian's ``prometheus`` binary on a loopback port.

Who uses it: tests/e2e/test_observability.py. :func:`prometheus_server` writes a config that scrapes
the given targets every second and evaluates the given rules file every second, starts
``prometheus`` with its TSDB in the test's folder, waits until it is ready and stops it at the end.
Tests skip (with the reason) when the binary is not installed; ``make test`` installs it.
The HTTP API calls are synchronous urllib requests: the servers answer in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.waiting import file_sizes, wait_until

__all__ = ["PROMETHEUS", "PrometheusServer", "prometheus_server", "requires_prometheus"]

PROMETHEUS = shutil.which("prometheus")
requires_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="Debian's prometheus package is not installed (make test installs it as root)"
)


@dataclass
class PrometheusServer:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, **params: str | float) -> Any:
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query_range", query=expr, start=start, end=end, step=step)["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def targets_up(self) -> bool:
        return any(t.get("health") == "up" for t in self.api("targets")["activeTargets"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _free_port() -> int:
    import socket  # noqa: PLC0415 - only here

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def prometheus_server(
    folder: Path, *, job: str, targets: list[str], rules: str | None = None
) -> Iterator[PrometheusServer]:
    """Prometheus scraping ``targets`` (host:port, /metrics) as ``job`` every second, with ``rules`` (YAML text)."""
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus package is not installed (make test installs it as root)")
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
    }
    if rules is not None:
        (folder / "rules.yaml").write_text(rules)
        config["rule_files"] = [str(folder / "rules.yaml")]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log_path = folder / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = PrometheusServer(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)
    try:

        def ready() -> bool:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
            return False

        def ended() -> str | None:
            return None if proc.poll() is None else f"prometheus exited:\n{server.log()}"

        # Progress: its log (warnings and up) and its data folder, which it writes while it starts.
        wait_until(ready, what="prometheus to be ready", progress=lambda: file_sizes(folder), alive=ended, interval=0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
