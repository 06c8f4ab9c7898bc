"""Datasets out: `mlds dataset pull | info | subset`, and the Python API that loads networks as a matrix.

Who calls it: researchers, after (or while) a campaign runs (DESIGN.md §1), and `mlds analyze`
(:mod:`mlds_data.analyze`). Registered in :data:`mlds_cli.main.COMMANDS` as ``dataset``.

A *source* is where a campaign's dataset lives, named one of three ways (:func:`open_source`):

- a folder: a pulled dataset, or the ``--store`` folder of `mlds run`;
- ``s3://bucket/prefix`` with ``--endpoint host:port`` (credentials from ``AWS_ACCESS_KEY_ID`` and
  ``AWS_SECRET_ACCESS_KEY``, as `mlds run` reads them);
- the campaign file itself (``examples/ds1-parity.yaml``), when it has ``spec.storage``.

Every read goes through :class:`~mlds_operator.storage.store.Store` (the one module that talks to object
storage, STYLE.md #2). The manifest is ``manifest.parquet``; a campaign still running has none yet, and
its verified rows are read from the manifest parts instead (first row per unit, as compaction keeps).

**pull** copies a dataset into a folder in the same layout (so the folder is itself a source). Every
object is verified: a ``model.safetensors`` against the sha256 the manifest records for it (the sha256
the server verified when the unit completed); every other object by its size in the source listing and,
on S3, by its MD5 ETag when the ETag is a plain MD5 (a single-part upload, which is how results are
written). The sha256 of every file pulled is appended to ``.mlds-pull.journal`` as it lands, and
``SHA256SUMS`` (``sha256sum -c`` format) plus ``manifest.parquet`` are written last, so a folder with a
manifest is a complete pull. Run the same pull again to resume: a file already there is kept only if
its sha256 is the expected one (declared, or journalled); anything else, a torn or damaged file, is
fetched again. A fetched object that fails verification is fetched again up to ``_FETCH_TRIES`` times,
then reported; the pull then exits non-zero without writing the manifest. Files land through a
temporary name and a rename, so an interrupted pull never leaves a partial file under a real name.

**subset** writes views of the manifest (docs/workloads.md §9): ``subsets/first-00100.parquet`` holds the rows
of the first 100 networks (by replica) of each target; the weights are not copied. :func:`load` reads a
subset file as it reads a whole dataset.

**The Python API**::

    from mlds_data.dataset import load
    nets = load("runs/reference/ds1", "runs/reference/ds2")   # folders, or subset/manifest .parquet files
    X, y = nets.weights(), nets.labels                         # (networks, 4364) float32, target names

:class:`Networks` holds the manifest rows (a pyarrow table; :meth:`Networks.frame` for pandas) and reads
weights only when asked: :meth:`Networks.weights` for the whole matrix (numpy, or torch with
``backend="torch"``; ``out=`` a ``.npy`` path to fill a memory map for a matrix larger than memory),
:meth:`Networks.iter_weights` for chunks, :meth:`Networks.state_dict` for one network. A row of the
matrix is the data section of that network's ``model.safetensors``, float32 values in file order
(tensors sorted by name); :attr:`Networks.layout` says which columns are which parameter. Reading a
file is one read and one header comparison, in a thread pool: 10,000 networks load in about 2 s
(`mlds bench load`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import click
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from mlds_contract.campaign import Storage
from mlds_contract.errors import StorageUnavailable, UserError
from mlds_contract.files import load_campaign
from mlds_contract.results import META_FILE, MODEL_FILE, UNCONVERGED_PREFIX
from mlds_operator.storage.manifest import DATA_PREFIX, MANIFEST_KEY, README_KEY, read_parts
from mlds_operator.storage.store import LocalStore, ObjectInfo, Store, open_store

__all__ = [
    "JOURNAL_FILE",
    "SUBSETS_PREFIX",
    "SUMS_FILE",
    "Networks",
    "Param",
    "PullReport",
    "dataset_group",
    "load",
    "open_source",
    "pull",
    "read_source_manifest",
    "subset_key",
    "summarize",
    "write_subsets",
]

#: Where `mlds dataset subset` writes its views, relative to the dataset root.
SUBSETS_PREFIX = "subsets/"
#: Written last by a pull: one ``<sha256>  <key>`` line per file pulled (``sha256sum -c`` reads it).
SUMS_FILE = "SHA256SUMS"
#: Appended while a pull runs, one line per file landed: what a resumed pull trusts.
JOURNAL_FILE = ".mlds-pull.journal"
#: Parquet schema metadata of a subset file: the dataset root, relative to the file's folder.
_ROOT_META = b"mlds.root"
#: Release sizes of the original project (docs/workloads.md §9).
RELEASE_SIZES = (100, 500, 1_000, 5_000, 10_000)

#: Parallel reads. Objects are ~20 kB, so a pull is latency-bound: 8 requests in flight keep a loopback or
#: LAN S3 busy without opening more connections than the store's pool holds (32).
DEFAULT_JOBS = 8
#: Tries per object, for outages and for bytes that fail verification.
_FETCH_TRIES = 3
_BACKOFF_S = 0.5
_TMP_MARK = ".mlds-tmp-"
# Folders a pull leaves out: the generator's bookkeeping, and attempts that never converged.
_SKIP_PREFIXES = ("_mlds/", UNCONVERGED_PREFIX)
_HEADER_LEN = struct.Struct("<Q")


# ------------------------------------------------------------------------------------------- sources


def _is_campaign_file(source: str) -> bool:
    return source.endswith((".yaml", ".yml")) and Path(source).is_file()


def open_source(
    source: str,
    *,
    endpoint: str | None = None,
    secure: bool = True,
    region: str | None = None,
) -> Store:
    """The store a dataset source names: a folder, ``s3://bucket/prefix`` or a campaign file (see module docs).

    Opens read-only in spirit: a missing bucket or folder is a UserError, never created.
    """
    if source.startswith("s3://"):
        bucket, _, prefix = source.removeprefix("s3://").partition("/")
        if not bucket:
            raise UserError(f"{source!r}: expected s3://BUCKET/PREFIX")
        if not endpoint:
            raise UserError(f"{source}: say which S3 server with --endpoint host:port")
        storage = Storage(endpoint=endpoint, bucket=bucket, prefix=prefix.strip("/"), secure=secure, region=region)
        return open_store(storage, create_bucket=False)
    if _is_campaign_file(source):
        campaign = load_campaign(Path(source))
        if campaign.spec.storage is None:
            raise UserError(
                f"{source} has no spec.storage: its dataset is in the folder `mlds run --store` wrote; name that folder"
            )
        return open_store(campaign.spec.storage, create_bucket=False)
    path = Path(source)
    if not path.is_dir():
        raise UserError(
            f"{source}: no such folder (a dataset source is a folder, s3://BUCKET/PREFIX or a campaign file)"
        )
    return LocalStore(path)


def _first_per_unit(table: pa.Table) -> pa.Table:
    """Rows of ``table`` with the first occurrence of each unit kept, sorted by unit (as compaction does)."""
    units = table.column("unit").to_numpy(zero_copy_only=False)
    _, first = np.unique(units, return_index=True)
    return table.take(pa.array(first))


def read_source_manifest(store: Store, columns: Sequence[str] | None = None) -> tuple[pa.Table, bool]:
    """The dataset's manifest rows and whether they are final (``manifest.parquet``) or from parts (running).

    ``columns``: read only those the manifest has (names it lacks are left out, not an error); parquet
    is columnar, so a projection decodes a fraction of a wide million-row manifest.
    """
    data = store.get_bytes(MANIFEST_KEY)
    if data is not None:
        file = pq.ParquetFile(pa.BufferReader(data))
        names = None if columns is None else [c for c in columns if c in file.schema_arrow.names]
        return file.read(columns=names), True
    parts = read_parts(store)
    if parts is None or parts.num_rows == 0:
        raise UserError(f"{store.url} holds no {MANIFEST_KEY} and no manifest parts: not an mlds dataset (yet)")
    table = _first_per_unit(parts)
    if columns is not None:
        table = table.select([c for c in columns if c in table.column_names])
    return table, False


# ------------------------------------------------------------------------------------------- the API


@dataclass(frozen=True)
class Param:
    """Where one parameter sits in a row of the weights matrix."""

    name: str
    shape: tuple[int, ...]
    start: int  # first column
    stop: int  # one past the last column


@dataclass(frozen=True)
class _Header:
    raw: bytes  # the header bytes, as stored (JSON)
    layout: tuple[Param, ...]
    width: int  # float32 values in the data section
    offsets: tuple[tuple[int, int], ...]  # byte range of each parameter in the data section, layout order


def _parse_header(blob: bytes, path: Path) -> _Header:
    if len(blob) < _HEADER_LEN.size:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (n,) = _HEADER_LEN.unpack_from(blob)
    if n > len(blob) - _HEADER_LEN.size:
        raise ValueError(f"{path}: not a safetensors file (header length {n})")
    raw = blob[_HEADER_LEN.size : _HEADER_LEN.size + n]
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable safetensors header: {exc}") from exc
    entries = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
    )
    layout, offsets, col = [], [], 0
    for name, info in entries:
        if info.get("dtype") != "F32":
            raise ValueError(f"{path}: tensor {name} is {info.get('dtype')}, expected F32 (docs/workloads.md §9)")
        shape = tuple(int(s) for s in info["shape"])
        count = int(np.prod(shape)) if shape else 1
        begin, end = (int(x) for x in info["data_offsets"])
        if end - begin != 4 * count:
            raise ValueError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape}")
        layout.append(Param(name, shape, col, col + count))
        offsets.append((begin, end))
        col += count
    return _Header(raw=raw, layout=tuple(layout), width=col, offsets=tuple(offsets))


def _read_row(path: Path, ref: _Header, out: npt.NDArray[np.float32]) -> None:
    """Fill ``out`` (one row) with the weights in ``path``, in ``ref``'s layout."""
    blob = path.read_bytes()
    (n,) = _HEADER_LEN.unpack_from(blob) if len(blob) >= _HEADER_LEN.size else (-1,)
    start = _HEADER_LEN.size + n
    if blob[_HEADER_LEN.size : start] == ref.raw and len(blob) - start == 4 * ref.width:
        out[:] = np.frombuffer(blob, dtype="<f4", count=ref.width, offset=start)
        return
    # Another header (other metadata, another writer's tensor order): place each tensor by name.
    other = _parse_header(blob, path)
    by_name = {p.name: (p, off) for p, off in zip(other.layout, other.offsets, strict=True)}
    if set(by_name) != {p.name for p in ref.layout}:
        raise ValueError(f"{path}: its parameters differ from the first network's: filter by shape first")
    data_start = _HEADER_LEN.size + len(other.raw)
    for p in ref.layout:
        q, (begin, _end) = by_name[p.name]
        if q.shape != p.shape:
            raise ValueError(
                f"{path}: {p.name} has shape {q.shape}, the first network {p.shape}: filter by shape first"
            )
        out[p.start : p.stop] = np.frombuffer(blob, dtype="<f4", count=p.stop - p.start, offset=data_start + begin)


@dataclass
class Networks:
    """Networks of one or more datasets: their manifest rows, and their weights on demand (see module docs).

    ``table`` has the manifest's columns plus ``root``, the dataset folder each row's ``key`` is under.
    """

    table: pa.Table
    _header: _Header | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def _column(self, name: str) -> npt.NDArray[Any]:
        if name not in self.table.column_names:
            raise KeyError(f"no column {name!r} in the manifest")
        return np.asarray(self.table.column(name).to_pylist(), dtype=object)

    @property
    def labels(self) -> npt.NDArray[Any]:
        """The target of every network (a machine, automaton, variant...): the label of machine identification."""
        return self._column("target").astype(str)

    @property
    def targets(self) -> list[str]:
        """Distinct targets, in order of first appearance."""
        return list(dict.fromkeys(self.labels.tolist()))

    def encode(self, column: str = "target") -> tuple[npt.NDArray[np.int64], list[str]]:
        """Integer codes of ``column`` (for torch losses) and the class names they index."""
        values = self._column(column).astype(str)
        classes = list(dict.fromkeys(values.tolist()))
        index = {c: i for i, c in enumerate(classes)}
        return np.fromiter((index[v] for v in values), dtype=np.int64, count=len(values)), classes

    def frame(self) -> Any:
        """The manifest rows as a pandas DataFrame (typed Any: pandas ships no type information)."""
        return self.table.to_pandas()

    def paths(self) -> list[Path]:
        """Each network's ``model.safetensors``."""
        roots = self.table.column("root").to_pylist()
        keys = self.table.column("key").to_pylist()
        return [Path(r, *k.split("/"), MODEL_FILE) for r, k in zip(roots, keys, strict=True)]

    def subset(
        self,
        *,
        first: int | None = None,
        targets: Iterable[str] | None = None,
        datasets: Iterable[str] | None = None,
    ) -> Networks:
        """A view: only ``targets``/``datasets``, and of each target only the ``first`` networks by replica."""
        table = self.table
        if targets is not None:
            table = table.filter(pc.is_in(table.column("target"), pa.array(list(targets), pa.string())))
        if datasets is not None:
            table = table.filter(pc.is_in(table.column("dataset"), pa.array(list(datasets), pa.string())))
        if first is not None:
            table = _first_n(table, first)
        return Networks(table, self._header)

    def header(self) -> _Header:
        if self._header is None:
            if len(self) == 0:
                raise ValueError("no networks selected")
            path = self.paths()[0]
            try:
                self._header = _parse_header(path.read_bytes(), path)
            except OSError as exc:
                raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return self._header

    @property
    def layout(self) -> tuple[Param, ...]:
        """Which columns of the weights matrix hold which parameter (file order: tensors sorted by name)."""
        return self.header().layout

    def weights(
        self,
        *,
        backend: Literal["numpy", "torch"] = "numpy",
        out: str | os.PathLike[str] | None = None,
        jobs: int = DEFAULT_JOBS,
    ) -> Any:
        """The weights matrix, one float32 row per network in table order.

        ``out``: a ``.npy`` file to create and fill as a memory map (for more networks than memory holds);
        the returned array is that map. ``backend="torch"`` returns a tensor sharing the numpy memory.
        Raises ValueError if the networks do not all have the same parameters (select one shape first).
        """
        ref = self.header()
        shape = (len(self), ref.width)
        matrix: npt.NDArray[np.float32]
        if out is None:
            matrix = np.empty(shape, dtype=np.float32)
        else:
            matrix = np.lib.format.open_memmap(os.fspath(out), mode="w+", dtype=np.float32, shape=shape)
        self._fill(matrix, self.paths(), ref, jobs)
        if backend == "torch":
            import torch  # noqa: PLC0415 - optional: only for callers who ask for tensors

            return torch.from_numpy(matrix)
        return matrix

    def iter_weights(
        self, batch: int = 4096, *, jobs: int = DEFAULT_JOBS
    ) -> Iterator[tuple[pa.Table, npt.NDArray[np.float32]]]:
        """``(rows, matrix)`` chunks of at most ``batch`` networks: the whole dataset in bounded memory."""
        ref = self.header()
        paths = self.paths()
        for start in range(0, len(self), batch):
            chunk = np.empty((min(batch, len(self) - start), ref.width), dtype=np.float32)
            self._fill(chunk, paths[start : start + batch], ref, jobs)
            yield self.table.slice(start, len(chunk)), chunk

    def state_dict(self, i: int) -> dict[str, npt.NDArray[np.float32]]:
        """Network ``i`` as name -> array (``torch.from_numpy`` each to load it into the module)."""
        row = np.empty((1, self.header().width), dtype=np.float32)
        self._fill(row, [self.paths()[i]], self.header(), 1)
        return {p.name: row[0, p.start : p.stop].reshape(p.shape).copy() for p in self.layout}

    @staticmethod
    def _fill(matrix: npt.NDArray[np.float32], paths: Sequence[Path], ref: _Header, jobs: int) -> None:
        def work(span: range) -> None:
            for i in span:
                try:
                    _read_row(paths[i], ref, matrix[i])
                except OSError as exc:
                    raise UserError(f"cannot read {paths[i]}: {exc.strerror or exc}") from exc

        # A few large spans, not one task per file: the per-file work is ~20 us of reading and copying.
        n = len(paths)
        step = max(1, -(-n // max(1, jobs * 4)))
        spans = [range(s, min(n, s + step)) for s in range(0, n, step)]
        if jobs <= 1 or len(spans) <= 1:
            for span in spans:
                work(span)
            return
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for _ in pool.map(work, spans):
                pass


def _first_n(table: pa.Table, n: int) -> pa.Table:
    """Of each target, the ``n`` rows with the lowest replica; table order otherwise kept."""
    if n < 0:
        raise ValueError(f"a subset size is non-negative, got {n}")
    targets = table.column("target").to_pylist()
    replicas = table.column("replica").to_pylist()
    order = sorted(range(len(targets)), key=lambda i: (targets[i], replicas[i]))
    keep, seen = [], dict[str, int]()
    for i in order:
        c = seen.get(targets[i], 0)
        if c < n:
            keep.append(i)
            seen[targets[i]] = c + 1
    return table.take(pa.array(sorted(keep), pa.int64()))


def _load_one(path: Path) -> pa.Table:
    if path.is_dir():
        root = path
        store = LocalStore(path)
        table, _final = read_source_manifest(store)
    elif path.suffix == ".parquet" and path.is_file():
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.metadata or {}
        root = (path.parent / meta[_ROOT_META].decode()) if _ROOT_META in meta else path.parent
        table = pf.read()
    else:
        raise UserError(f"{path}: neither a dataset folder nor a manifest/subset .parquet file")
    table = table.replace_schema_metadata(None)
    return table.append_column("root", pa.repeat(pa.scalar(str(root.resolve()), pa.string()), table.num_rows))


def load(*paths: str | os.PathLike[str], converged: bool = True) -> Networks:
    """The networks of one or more datasets (folders, or their manifest/subset ``.parquet`` files), combined.

    ``converged`` keeps only converged networks (a manifest holds only those; a mistake costs nothing).
    Datasets with different columns combine: a column one of them lacks is null in its rows.
    """
    if not paths:
        raise ValueError("load() needs at least one dataset")
    tables = [_load_one(Path(p)) for p in paths]
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UserError(f"these datasets cannot be combined: {exc}") from exc
    if converged and "converged" in table.column_names:
        table = table.filter(pc.fill_null(table.column("converged"), False))
    return Networks(table)


# ----------------------------------------------------------------------------------------------- pull


@dataclass(frozen=True)
class _Item:
    key: str
    size: int
    sha256: str | None  # declared by the manifest (model.safetensors)
    md5: str | None  # the S3 ETag, when it is a plain MD5


@dataclass
class PullReport:
    """What a pull did."""

    objects: int = 0
    bytes: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    present: int = 0  # already in the destination and verified
    refetched: int = 0  # in the destination but failing verification, fetched again
    retried: int = 0  # fetches whose bytes failed verification and were fetched again
    failed: dict[str, str] = field(default_factory=dict)  # key -> why
    final: bool = True  # the source's manifest was final (not read from the parts of a running campaign)
    seconds: float = 0.0


def _plain_md5(etag: str | None) -> str | None:
    if etag is None:
        return None
    tag = etag.strip('"').lower()
    return tag if len(tag) == 32 and all(c in "0123456789abcdef" for c in tag) else None


def _plan(store: Store, table: pa.Table) -> tuple[list[_Item], dict[str, str]]:
    """The objects of the dataset's networks (and its README, data, subsets), and what is missing."""
    listing: dict[str, ObjectInfo] = {}
    for info in store.scan(""):
        if not info.key.startswith(_SKIP_PREFIXES) and _TMP_MARK not in info.key:
            listing[info.key] = info
    declared = (
        dict(zip(table.column("key").to_pylist(), table.column("sha256").to_pylist(), strict=True))
        if ("sha256" in table.column_names)
        else dict.fromkeys(table.column("key").to_pylist())
    )
    by_folder: dict[str, list[ObjectInfo]] = {}
    top: list[ObjectInfo] = []
    for key, info in listing.items():
        folder, _, _ = key.rpartition("/")
        if key == MANIFEST_KEY:
            continue
        if key == README_KEY or key.startswith((DATA_PREFIX, SUBSETS_PREFIX)):
            top.append(info)
        else:
            by_folder.setdefault(folder, []).append(info)
    items = [_Item(i.key, i.size, None, _plain_md5(i.etag)) for i in top]
    missing: dict[str, str] = {}
    for folder, sha in declared.items():
        infos = by_folder.get(folder, [])
        names = {i.key.rpartition("/")[2] for i in infos}
        if MODEL_FILE not in names:
            missing[f"{folder}/{MODEL_FILE}"] = "listed in the manifest, missing from the source"
        for i in infos:
            is_model = i.key.endswith("/" + MODEL_FILE)
            items.append(_Item(i.key, i.size, sha if is_model else None, _plain_md5(i.etag)))
    items.sort(key=lambda it: it.key)
    return items, missing


def _read_sums(path: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return sums
    for line in text.splitlines():
        digest, sep, key = line.partition("  ")
        if sep and len(digest) == 64:
            sums[key] = digest
    return sums


def _file_sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _Progress:
    """A bar on a terminal, a line every few seconds otherwise, nothing when quiet."""

    def __init__(self, total: int, total_bytes: int, *, enabled: bool) -> None:
        self.total, self.total_bytes, self.enabled = total, total_bytes, enabled
        self.done = self.done_bytes = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        self._task: Any = None
        self._last = 0.0
        if enabled and sys.stderr.isatty():
            from rich.console import Console  # noqa: PLC0415 - only on a terminal
            from rich.progress import (  # noqa: PLC0415
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]pull"),
                BarColumn(),
                MofNCompleteColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("pull", total=total)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done += 1
            self.done_bytes += nbytes
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done)
            elif self.enabled and time.monotonic() - self._last >= 5.0:
                self._last = time.monotonic()
                click.echo(
                    f"pull: {self.done:,}/{self.total:,} objects, "
                    f"{self.done_bytes / 1e6:,.1f}/{self.total_bytes / 1e6:,.1f} MB",
                    err=True,
                )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def _check(data: bytes, item: _Item) -> str | None:
    """Why ``data`` is not ``item`` (None if it is)."""
    if len(data) != item.size:
        return f"size {len(data)}, listed {item.size}"
    if item.sha256 is not None and hashlib.sha256(data).hexdigest() != item.sha256.lower():
        return "sha256 differs from the manifest"
    if item.md5 is not None and hashlib.md5(data, usedforsecurity=False).hexdigest() != item.md5:
        return "MD5 differs from the ETag"
    return None


class _Puller:
    """One pull's state: the destination, what it already holds, the journal, the report."""

    def __init__(self, store: Store, dest: Path, report: PullReport, bar: _Progress, sleep: Any) -> None:
        self.store, self.dest, self.report, self.bar, self.sleep = store, dest, report, bar, sleep
        self.known = _read_sums(dest / SUMS_FILE) | _read_sums(dest / JOURNAL_FILE)
        self.sums: dict[str, str] = {}
        self.lock = threading.Lock()
        self.journal: IO[str] | None = None
        self.stopping = False

    def _present(self, item: _Item, path: Path) -> bool:
        """Is ``path`` already exactly ``item``? (Only a declared or journalled sha256 vouches for a file.)"""
        expected = item.sha256 or self.known.get(item.key)
        if expected is None or path.stat().st_size != item.size:
            return False
        digest = _file_sha256(path)
        if digest != expected.lower():
            return False
        with self.lock:
            self.report.present += 1
            self.sums[item.key] = digest
        return True

    def _fetch(self, item: _Item) -> bytes | str:
        """The object's verified bytes, or why they could not be had."""
        why = "not fetched"
        for attempt in range(_FETCH_TRIES):
            if attempt:
                self.sleep(_BACKOFF_S * 2 ** (attempt - 1))
            try:
                data = self.store.get_bytes(item.key)
            except StorageUnavailable as exc:
                why = str(exc)
                continue
            if data is None:
                return "deleted from the source during the pull"
            bad = _check(data, item)
            if bad is None:
                return data
            why = bad
            with self.lock:
                self.report.retried += 1
        return why

    def one(self, item: _Item) -> None:
        if self.stopping:
            return
        path = self.dest.joinpath(*item.key.split("/"))
        had_file = path.is_file()
        try:
            if had_file and self._present(item, path):
                return
            got = self._fetch(item)
            if isinstance(got, str):
                with self.lock:
                    self.report.failed[item.key] = got
                return
            _write_atomic(path, got)
            digest = hashlib.sha256(got).hexdigest()
            with self.lock:
                if self.journal is not None:
                    self.journal.write(f"{digest}  {item.key}\n")
                    self.journal.flush()
                self.sums[item.key] = digest
                self.report.fetched += 1
                self.report.fetched_bytes += len(got)
                self.report.refetched += had_file
        finally:
            self.bar.advance(item.size)

    def run(self, items: list[_Item], jobs: int) -> None:
        """Pull ``items`` with ``jobs`` threads. On an interruption (Ctrl-C), stop at once: queued items are
        dropped and the ones in flight finish their file, so what landed is journalled for the next run."""
        with open(self.dest / JOURNAL_FILE, "a", encoding="utf-8") as journal:
            self.journal = journal
            pool = ThreadPoolExecutor(jobs)
            try:
                for _ in pool.map(self.one, items):
                    pass
            except BaseException:
                self.stopping = True
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                pool.shutdown(wait=True)
                self.journal = None

    def finish(self, table: pa.Table) -> None:
        """Write SHA256SUMS, then the manifest (last: a folder with a manifest is a complete pull)."""
        _write_atomic(self.dest / SUMS_FILE, "".join(f"{self.sums[k]}  {k}\n" for k in sorted(self.sums)).encode())
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        _write_atomic(self.dest / MANIFEST_KEY, sink.getvalue().to_pybytes())
        (self.dest / JOURNAL_FILE).unlink(missing_ok=True)


def pull(
    store: Store,
    dest: Path,
    *,
    first: int | None = None,
    jobs: int = DEFAULT_JOBS,
    progress: bool = False,
    sleep: Any = time.sleep,
) -> PullReport:
    """Copy the dataset in ``store`` to ``dest`` (resumable, verified; see the module docs).

    ``first``: only the first ``first`` networks of each target. ``sleep`` is the backoff between tries
    (injected, so tests do not wait). Returns what was done; a failed object does not raise, it is listed
    in :attr:`PullReport.failed` and the manifest is not written.
    """
    started = time.monotonic()
    table, final = read_source_manifest(store)
    if first is not None:
        table = _first_n(table, first)
    items, missing = _plan(store, table)
    if first is not None:  # keep the selected networks' folders (and the top-level files)
        keep = set(table.column("key").to_pylist())
        items = [
            it
            for it in items
            if it.key.rpartition("/")[0] in keep
            or "/" not in it.key
            or it.key.startswith((DATA_PREFIX, SUBSETS_PREFIX))
        ]
    dest.mkdir(parents=True, exist_ok=True)
    report = PullReport(objects=len(items), bytes=sum(it.size for it in items), final=final, failed=dict(missing))
    bar = _Progress(len(items), report.bytes, enabled=progress)
    puller = _Puller(store, dest, report, bar, sleep)
    # A manifest from an earlier, complete pull no longer vouches for the folder while this one runs.
    (dest / MANIFEST_KEY).unlink(missing_ok=True)
    try:
        puller.run(items, max(1, jobs))
    finally:
        bar.close()
    if not report.failed:
        puller.finish(table)
    report.seconds = time.monotonic() - started
    return report


# ----------------------------------------------------------------------------------------------- info


def _sizes(store: Store) -> dict[str, int]:
    return {i.key: i.size for i in store.scan("") if _TMP_MARK not in i.key}


#: The manifest columns `mlds dataset info` reads (a million-row manifest has ~40; reading these only is
#: what keeps `info` at seconds).
_INFO_COLUMNS = (
    "target",
    "key",
    "dataset",
    "campaign",
    "shape",
    "parameters",
    "converged",
    "attempt",
    "epochs",
    "eval_loss",
    "seconds",
)


def _values(table: pa.Table, name: str) -> pa.ChunkedArray:
    """Column ``name``, or all nulls if the manifest has no such column (an older worker's rows)."""
    if name in table.column_names:
        return table.column(name)
    return pa.chunked_array([pa.nulls(table.num_rows)])


def _numbers(column: pa.ChunkedArray, fill: float) -> npt.NDArray[Any]:
    """A numeric or bool column as numpy, nulls replaced by ``fill`` (a column of nulls: all ``fill``)."""
    if pa.types.is_null(column.type):
        return np.full(len(column), fill, dtype=np.float64)
    return np.asarray(pc.fill_null(column, pa.scalar(fill).cast(column.type)).to_numpy())


def _is_number(column: pa.ChunkedArray) -> bool:
    t = column.type
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t))


def _per_row(
    column: pa.ChunkedArray,
    fill: float,
    vector: Callable[[npt.NDArray[np.float64]], npt.NDArray[Any]],
    scalar: Callable[[Any], Any],
) -> npt.NDArray[np.float64]:
    """A value per row as float64: ``vector`` over a numeric column (nulls are ``fill``), or ``scalar`` value
    by value for any other type (JSON text after mixed types), as the old loop over rows converted them."""
    if _is_number(column):
        return np.asarray(vector(_numbers(column, fill).astype(np.float64)), dtype=np.float64)
    values = column.to_pylist()
    return np.fromiter((fill if v is None else float(scalar(v)) for v in values), np.float64, count=len(values))


def _distinct_text(column: pa.ChunkedArray) -> list[str]:
    """``sorted({str(v) for v in column})``, with None as "None", computed over distinct values only."""
    return sorted({str(v) for v in pc.unique(column).to_pylist()})


def summarize(store: Store) -> dict[str, Any]:
    """What `mlds dataset info` shows, as a JSON-able dict: per target counts, convergence, epochs, sizes.

    Column-projected and vectorised (pyarrow/numpy, no Python loop over rows): a 1,000,000-row manifest
    takes seconds. Python's own semantics are kept where they matter for the figures: the per-target
    ``seconds`` are summed in row order (``np.bincount`` adds sequentially, as the row loop did), and a
    column of an unexpected type (JSON text after mixed types) falls back to per-value Python conversion.
    """
    table, final = read_source_manifest(store, columns=_INFO_COLUMNS)
    sizes = _sizes(store)
    by_folder: dict[str, int] = {}
    for key, size in sizes.items():
        folder = key.rpartition("/")[0]
        by_folder[folder] = by_folder.get(folder, 0) + size
    unconverged = sum(1 for k in sizes if k.startswith(UNCONVERGED_PREFIX) and k.endswith("/" + META_FILE))
    n = table.num_rows
    # Targets in order of first appearance (dictionary_encode keeps that order), then per-target sums with
    # np.bincount, which adds in row order: the float sums are bit-identical to a loop over the rows.
    encoded = pc.dictionary_encode(table.column("target").combine_chunks())
    codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    names = encoded.dictionary.to_pylist()
    m = len(names)

    def total(values: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        return np.bincount(codes, weights=values, minlength=m).astype(np.float64)

    networks = np.bincount(codes, minlength=m)
    converged = total(_per_row(_values(table, "converged"), 0, lambda a: a != 0, bool))
    retried = total(_per_row(_values(table, "attempt"), 0, lambda a: a > 0, lambda v: v > 0))
    seconds = total(_per_row(_values(table, "seconds"), 0.0, lambda a: a, lambda v: float(v or 0.0)))
    where = pc.index_in(table.column("key"), value_set=pa.array(list(by_folder), pa.string()))
    row_bytes = pc.fill_null(pc.take(pa.array(list(by_folder.values()), pa.int64()), where), 0)
    nbytes = total(np.asarray(row_bytes.to_numpy(), dtype=np.float64)) if n else np.zeros(m)

    epochs_col, loss_col = _values(table, "epochs"), _values(table, "eval_loss")
    epochs_ok = np.asarray(pc.is_valid(epochs_col).to_numpy(zero_copy_only=False), dtype=bool)
    loss_ok = np.asarray(pc.is_valid(loss_col).to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_integer(epochs_col.type):
        epochs = _numbers(epochs_col, 0).astype(np.int64)
    else:  # int() of a float truncates; of text, parses
        epochs = np.fromiter((0 if v is None else int(v) for v in epochs_col.to_pylist()), np.int64, count=n)
    losses = _per_row(loss_col, 0.0, lambda a: a, float)
    datasets = _values(table, "dataset")
    _, first_row = np.unique(codes, return_index=True)
    first_dataset = datasets.take(pa.array(first_row, pa.int64())).to_pylist()
    # Rows grouped by target; a stable sort keeps row order within a target.
    order = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(networks)])

    targets: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        rows = order[bounds[i] : bounds[i + 1]]
        ep = epochs[rows[epochs_ok[rows]]]
        loss = losses[rows[loss_ok[rows]]]
        targets[name] = {
            "dataset": first_dataset[i],
            "networks": int(networks[i]),
            "converged": int(converged[i]),
            "retried": int(retried[i]),
            "seconds": float(seconds[i]),
            "bytes": int(nbytes[i]),
            "epochs": {"mean": float(np.mean(ep)), "min": int(ep.min()), "max": int(ep.max())} if len(ep) else None,
            "eval_loss": {"median": float(np.median(loss)), "max": float(loss.max())} if len(loss) else None,
        }
    network_bytes = sum(t["bytes"] for t in targets.values())
    params = _values(table, "parameters").drop_null()
    parameters = sorted({int(v) for v in pc.unique(params).to_pylist()})
    return {
        "source": store.url,
        "final": final,
        "state": "complete" if final else run_state(store),
        "campaigns": _distinct_text(_values(table, "campaign")) if n else [],
        "datasets": _distinct_text(datasets) if n else [],
        "shapes": _distinct_text(_values(table, "shape")) if n else [],
        "parameters": parameters,
        "networks": n,
        "unconverged_attempts": unconverged,
        "targets": targets,
        "bytes": {
            "networks": network_bytes,
            "total": sum(v for k, v in sizes.items() if not k.startswith(_SKIP_PREFIXES)),
        },
    }


def run_state(store: Store) -> str:
    """What a dataset without a final manifest is doing, as far as can be told truthfully.

    A local store that `mlds run` wrote has its run's ``_mlds/run.json``: it says when the run was
    interrupted, and names the process serving it, which is either alive (running) or gone (stopped
    without saying so: killed, or the machine went down). An S3 dataset's runner is elsewhere.
    """
    run: Any = None
    if isinstance(store, LocalStore):
        with contextlib.suppress(OSError, ValueError):
            run = json.loads((store.root / "_mlds" / "run.json").read_text())
    if not isinstance(run, dict):
        return "not finished"
    if run.get("stopped") == "interrupted":
        return f"interrupted at {run.get('stopped_at', 'an unknown time')}; run `mlds run` again to resume"
    pid = run.get("pid")
    alive = isinstance(pid, int) and pid > 0 and _process_alive(pid)
    return "running" if alive else "stopped: the mlds run that served it is gone; run `mlds run` again to resume"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _format_info(info: dict[str, Any]) -> str:
    lines = [
        f"{info['source']}: {', '.join(info['datasets'])} ({', '.join(info['campaigns'])})"
        + ("" if info["final"] else f"  [{info['state']}: rows from the manifest parts]"),
        f"  {info['networks']:,} networks, {len(info['targets'])} targets, shape {', '.join(info['shapes'])}, "
        f"{', '.join(f'{p:,}' for p in info['parameters'])} parameters; "
        f"{info['unconverged_attempts']:,} unconverged attempts kept aside",
        f"  {info['bytes']['networks'] / 1e6:,.2f} MB of network files, {info['bytes']['total'] / 1e6:,.2f} MB in all",
        "",
        f"  {'target':<28} {'networks':>8} {'conv.':>6} {'retried':>7} {'epochs mean [min-max]':>22} "
        f"{'eval loss median':>16} {'train h':>8} {'MB':>7}",
    ]
    for name, t in info["targets"].items():
        ep = t["epochs"]
        eps = f"{ep['mean']:,.0f} [{ep['min']:,}-{ep['max']:,}]" if ep else "-"
        loss = f"{t['eval_loss']['median']:.2e}" if t["eval_loss"] else "-"
        lines.append(
            f"  {name:<28} {t['networks']:>8,} {t['converged']:>6,} {t['retried']:>7,} {eps:>22} {loss:>16} "
            f"{t['seconds'] / 3600:>8.2f} {t['bytes'] / 1e6:>7.2f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- subset


def subset_key(first: int) -> str:
    return f"{SUBSETS_PREFIX}first-{first:05d}.parquet"


def write_subsets(store: Store, sizes: Iterable[int], targets: Sequence[str] | None = None) -> dict[int, pa.Table]:
    """Write ``subsets/first-NNNNN.parquet`` views (manifest rows only) for each size; returns them."""
    table, _final = read_source_manifest(store)
    if targets:
        unknown = set(targets) - set(table.column("target").to_pylist())
        if unknown:
            raise UserError(f"no networks of target(s) {', '.join(sorted(unknown))} in {store.url}")
        table = table.filter(pc.is_in(table.column("target"), pa.array(list(targets), pa.string())))
    written = {}
    for n in sizes:
        view = _first_n(table, n).replace_schema_metadata({_ROOT_META: b".."})
        sink = pa.BufferOutputStream()
        pq.write_table(view, sink, compression="zstd")
        store.put_bytes(subset_key(n), sink.getvalue().to_pybytes(), "application/vnd.apache.parquet")
        written[n] = view
    return written


# ------------------------------------------------------------------------------------------------ CLI


def _source_options(fn: Any) -> Any:
    fn = click.option("--region", default=None, help="S3 region, if the server needs one.")(fn)
    fn = click.option("--insecure", is_flag=True, help="Plain HTTP to the S3 endpoint (storage.secure: false).")(fn)
    return click.option(
        "--endpoint", envvar="MLDS_S3_ENDPOINT", default=None, help="host:port of the S3 server, for s3:// sources."
    )(fn)


@click.group("dataset")
def dataset_group() -> None:
    """Pull, inspect and subset campaign datasets.

    SOURCE is a dataset folder, s3://BUCKET/PREFIX (with --endpoint; credentials from AWS_ACCESS_KEY_ID
    and AWS_SECRET_ACCESS_KEY) or a campaign file with spec.storage.
    """


@dataset_group.command("pull")
@click.argument("source")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@_source_options
@click.option("--first", type=click.IntRange(min=1), default=None, help="Only the first N networks of each target.")
@click.option(
    "--jobs", "-j", type=click.IntRange(1, 32), default=DEFAULT_JOBS, show_default=True, help="Parallel reads."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def pull_command(
    source: str,
    dest: Path,
    endpoint: str | None,
    insecure: bool,
    region: str | None,
    first: int | None,
    jobs: int,
    quiet: bool,
) -> None:
    """Copy a dataset into DEST, verifying every object; run it again to resume or repair."""
    store = open_source(source, endpoint=endpoint, secure=not insecure, region=region)
    try:
        if isinstance(store, LocalStore) and store.root == dest.expanduser().absolute():
            raise UserError("SOURCE and DEST are the same folder")
        report = pull(store, dest, first=first, jobs=jobs, progress=not quiet)
    finally:
        store.close()
    click.echo(
        f"pulled {store.url} -> {dest}: {report.objects:,} objects ({report.bytes / 1e6:,.2f} MB) "
        f"in {report.seconds:,.1f} s; fetched {report.fetched:,} ({report.fetched_bytes / 1e6:,.2f} MB), "
        f"{report.present:,} already present and verified, {report.refetched:,} damaged and fetched again, "
        f"{report.retried:,} fetches failed verification and were retried"
    )
    if not report.final:
        click.echo(
            f"note: the campaign is not finished ({run_state(store)}); this is the part of the dataset verified so far",
            err=True,
        )
    if report.failed:
        for key, why in sorted(report.failed.items())[:20]:
            click.echo(f"failed: {key}: {why}", err=True)
        more = len(report.failed) - 20
        raise click.ClickException(
            f"{len(report.failed):,} objects failed{f' ({more:,} more not shown)' if more > 0 else ''}; "
            "no manifest written; run the pull again to retry them"
        )


@dataset_group.command("info")
@click.argument("source")
@_source_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info_command(source: str, endpoint: str | None, insecure: bool, region: str | None, as_json: bool) -> None:
    """Targets, network counts, convergence, epochs and sizes of a dataset."""
    store = open_source(source, endpoint=endpoint, secure=not insecure, region=region)
    try:
        info = summarize(store)
    finally:
        store.close()
    click.echo(json.dumps(info, indent=2) if as_json else _format_info(info))


@dataset_group.command("subset")
@click.argument("source")
@_source_options
@click.option(
    "--first",
    "sizes",
    type=click.IntRange(min=1),
    multiple=True,
    help="Networks per target (repeatable). Default: the original releases' 100, 500, 1,000, 5,000, 10,000.",
)
@click.option("--target", "targets", multiple=True, help="Only this target (repeatable).")
def subset_command(
    source: str,
    endpoint: str | None,
    insecure: bool,
    region: str | None,
    sizes: tuple[int, ...],
    targets: tuple[str, ...],
) -> None:
    """Write subsets/first-NNNNN.parquet views: the first N networks of each target (no weights copied)."""
    store = open_source(source, endpoint=endpoint, secure=not insecure, region=region)
    try:
        written = write_subsets(store, sizes or RELEASE_SIZES, targets or None)
        url = store.url
    finally:
        store.close()
    for n, view in written.items():
        counts: dict[str, int] = {}
        for t in view.column("target").to_pylist():
            counts[t] = counts.get(t, 0) + 1
        short = [f"{t} {c:,}" for t, c in counts.items() if c < n]
        click.echo(
            f"{url}/{subset_key(n)}: {view.num_rows:,} networks ({len(counts)} targets)"
            + (f"; fewer than {n:,} in: {', '.join(short)}" if short else "")
        )
