"""`mlds dataset pull` from a real S3 protocol server (moto) through the MinIO SDK, as a real process.

A synthetic dataset in the real layout (:func:`mlds_operator.bench.load.synthesize`) is uploaded under a
campaign prefix; the CLI pulls it, is killed half-way and resumes, meets an object damaged in the
bucket (detected by sha256 against the manifest, not written, the pull fails) and, once the object is
repaired, fetches just that one again; a file damaged on disk after a complete pull is fetched again.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from minio import Minio
from mlds_data.dataset import JOURNAL_FILE, SUMS_FILE, load
from mlds_operator.bench.load import synthesize
from mlds_operator.storage.manifest import MANIFEST_KEY

from tests.s3_fixtures import S3Server
from tests.waiting import HANG_GUARD_SECONDS, file_sizes, wait_until

pytestmark = pytest.mark.e2e
pytest_plugins = ["tests.s3_fixtures"]

OCTET = "application/octet-stream"


def upload(client: Minio, bucket: str, prefix: str, folder: Path) -> int:
    n = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.fput_object(bucket, key, str(path), content_type=OCTET)
            n += 1
    return n


def mlds(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlds_cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_GUARD_SECONDS,
        check=False,
    )


@pytest.fixture
def env(s3_server: S3Server) -> dict[str, str]:
    return {**os.environ, "MLDS_S3_ENDPOINT": s3_server.endpoint}


def test_pull_from_s3_resumes_after_a_kill_and_refetches_damaged_objects(
    s3_server: S3Server, s3_bucket: str, minio_client: Minio, env: dict[str, str], tmp_path: Path
) -> None:
    src = synthesize(tmp_path / "src", per_target=24, seed=5)  # 120 networks, 361 objects
    objects = upload(minio_client, s3_bucket, "campaign", src)
    url = f"s3://{s3_bucket}/campaign"
    dest = tmp_path / "pulled"

    # 1. Start a pull with one reader and kill it (SIGKILL: no cleanup at all) once some files landed.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlds_cli", "dataset", "pull", url, str(dest), "--insecure", "-j", "1", "-q"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    journal = dest / JOURNAL_FILE
    wait_until(
        lambda: proc.poll() is not None or (journal.is_file() and journal.read_text().count("\n") >= 30),
        what="30 objects in the pull's journal",
        progress=lambda: file_sizes(dest) if dest.is_dir() else {},
        interval=0.01,
    )
    assert proc.poll() is None, "the pull finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    assert not (dest / MANIFEST_KEY).exists()
    landed = journal.read_text().count("\n")
    assert 30 <= landed < objects - 1

    # 2. Damage one object in the bucket behind the store's back: the resumed pull detects it.
    victim = "ParityMachine/00023/model.safetensors"
    good = (src / victim).read_bytes()
    bad = bytearray(good)
    bad[100] ^= 0x10
    minio_client.put_object(s3_bucket, f"campaign/{victim}", io.BytesIO(bytes(bad)), len(bad), content_type=OCTET)
    out = mlds("dataset", "pull", url, str(dest), "--insecure", "-q", env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"failed: {victim}: sha256 differs from the manifest" in out.stderr
    assert "already present and verified" in out.stdout
    present = int(out.stdout.split(" already present")[0].rsplit(", ", 1)[1])
    assert present >= landed - 1  # the file being written when killed may be missing
    assert not (dest / victim).exists()
    assert not (dest / MANIFEST_KEY).exists()

    # 3. Repair the object: the next pull fetches it and nothing else, and completes.
    minio_client.put_object(s3_bucket, f"campaign/{victim}", io.BytesIO(good), len(good), content_type=OCTET)
    out = mlds("dataset", "pull", url, str(dest), "--insecure", "-q", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fetched 1 " in out.stdout
    assert (dest / MANIFEST_KEY).is_file()
    for line in (dest / SUMS_FILE).read_text().splitlines():
        digest, key = line.split("  ", 1)
        assert hashlib.sha256((dest / key).read_bytes()).hexdigest() == digest, key
    assert len((dest / SUMS_FILE).read_text().splitlines()) == objects - 1  # all but the manifest
    np.testing.assert_array_equal(load(dest).weights(), load(src).weights())

    # 4. A file damaged on disk after a complete pull: fetched again.
    local = dest / "EightBitMachine" / "00003" / "meta.json"
    local.write_text(local.read_text().replace("EightBitMachine", "EightBitMachinX"))
    out = mlds("dataset", "pull", url, str(dest), "--insecure", "-q", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 damaged and fetched again" in out.stdout
    assert local.read_bytes() == (src / "EightBitMachine" / "00003" / "meta.json").read_bytes()

    # info reads the bucket directly.
    out = mlds("dataset", "info", url, "--insecure", env=env)
    assert out.returncode == 0, out.stderr
    assert "120 networks, 5 targets" in out.stdout
