"""The campaign's dataset files in the object store: manifest, parts, README, checkpoint, per-target data.

Callers: the campaign loop of the operator and of ``mlds run`` (append manifest parts as units are
verified, checkpoint the lease book, write the README and the per-target data, compact at the end,
recover after a restart), and ``mlds dataset`` (read the manifest). Everything goes through a
:class:`~mlds_operator.storage.store.Store`; this module knows the layout, the store knows the backend.

Layout under the campaign's root (mlds docs/workloads.md §9)::

    <target>/<replica:05d>/model.safetensors   written by workers through presigned PUTs
    <target>/<replica:05d>/meta.json
    <target>/<replica:05d>/history.csv
    data/<target>.npz                          the target's training/evaluation data
    manifest.parquet                           one row per network (after compaction)
    README.md                                  what the dataset is and how to load it
    _mlds/parts/part-000001.parquet            manifest rows appended in batches while running
    _mlds/checkpoint.bin                       the lease book's last checkpoint

**Manifest rows** are the fields of ``meta.json`` flattened, plus ``key``, the result folder relative
to the campaign root (``ParityMachine/00007``). The worker's meta.json is flat today; should a field
hold an object, it becomes dotted column names: ``{"seeds": {"init": 1}}`` is the column
``seeds.init``. Dots, not underscores, because meta.json's own field names contain underscores
(``init_seed``): a dotted name can only come from nesting. Lists stay list columns. Every row must
carry ``unit`` (an integer, the unit index) and ``key``. Rows may differ in their fields (say, from
two versions of the worker): missing fields are null; an int column meeting floats becomes float.

**Parts, not a million meta.json reads.** While a campaign runs, the server appends the rows of the
units it verified in batches, :func:`write_part` -> ``_mlds/parts/part-000001.parquet``, and at the
end :func:`compact_manifest` merges the existing manifest and every part into ``manifest.parquet``,
keeping the first row seen for each unit (the manifest, then parts in sequence order) and sorting by
unit. Compaction is idempotent and may run at any time (e.g. to publish a partial manifest).

**Checkpoint atomicity.** :func:`put_checkpoint` writes one object. A single S3 ``PUT`` is atomic
(readers see the old object or the new one, never a mixture; S3 and MinIO are strongly consistent
for read-after-write), and :class:`~mlds_operator.storage.store.LocalStore` writes a temporary file and
renames it, so no "new object, then a pointer" dance is needed. The bytes are wrapped in a small
envelope with their SHA-256, so a damaged object is detected: :func:`get_checkpoint` then logs it and
returns None, and the server recovers from the results themselves (:func:`find_results`); completions
are never lost because they live in the results, not in the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlds_contract.campaign import CampaignSpec, Dataset
from mlds_contract.errors import UserError
from mlds_contract.plan import campaign_targets, resolve_training
from mlds_contract.results import META_FILE

from mlds_operator.storage.store import Store

__all__ = [
    "CHECKPOINT_KEY",
    "DATA_PREFIX",
    "MANIFEST_KEY",
    "PARTS_PREFIX",
    "README_KEY",
    "campaign_readme",
    "compact",
    "compact_manifest",
    "find_results",
    "flatten",
    "get_checkpoint",
    "get_target_data",
    "manifest_row",
    "manifest_table",
    "next_part_seq",
    "part_key",
    "put_checkpoint",
    "put_readme",
    "put_target_data",
    "read_manifest",
    "read_parts",
    "target_data_key",
    "write_manifest",
    "write_part",
]

log = logging.getLogger(__name__)

MANIFEST_KEY = "manifest.parquet"
README_KEY = "README.md"
PARTS_PREFIX = "_mlds/parts/"
CHECKPOINT_KEY = "_mlds/checkpoint.bin"
DATA_PREFIX = "data/"

_PART_RE = re.compile(r"^_mlds/parts/part-(\d+)\.parquet$")
# A result folder: <target>/<replica, at least 5 digits>/meta.json. Internal folders start with "_".
_RESULT_RE = re.compile(rf"^([^/_][^/]*)/(\d{{5,}})/{re.escape(META_FILE)}$")
_CKPT_MAGIC = b"MLDS-CHECKPOINT-1\n"
_SHA_HEX = 64
# zstd: manifests of float columns compress about twice as well as with snappy, and every reader has it.
_COMPRESSION = "zstd"
#: Rows per row group of a compacted manifest, and the size above which compaction streams.
_GROUP_ROWS = 65_536


# --------------------------------------------------------------------------------------------- manifest


# JSON's non-object values: checked first because isinstance against the Mapping ABC is slow, and a
# manifest part flattens thousands of rows of ~40 fields.
_LEAVES = (str, int, float, bool, type(None), list)


def flatten(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten nested objects into dotted names: ``{"seeds": {"init": 1}}`` -> ``{"seeds.init": 1}``.

    Empty objects disappear; lists are kept as values. Raises ValueError if two paths flatten to the same
    name (a field literally called ``"seeds.init"`` next to ``seeds: {init}``).
    """
    out: dict[str, Any] = {}
    _flatten_into(out, meta, "")
    return out


def _flatten_into(out: dict[str, Any], obj: Mapping[str, Any], prefix: str) -> None:
    for name, value in obj.items():
        full = prefix + name
        if not isinstance(value, _LEAVES) and isinstance(value, Mapping):
            _flatten_into(out, value, full + ".")
        elif full in out:
            raise ValueError(f"meta.json field {full!r} appears twice after flattening")
        else:
            out[full] = value


def manifest_row(meta: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A manifest row from a unit's meta.json and its result folder (``<target>/<replica:05d>``)."""
    return {**meta, "key": key}


def _column(name: str, values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Mixed types across workers (a bool here, a string there): keep the data readable as JSON text
        # rather than refuse the whole manifest.
        log.warning("manifest column %r has mixed types; stored as JSON text", name)
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values])


def manifest_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """One row per network: the flattened meta.json fields plus ``key`` (see the module docs).

    Columns: ``key`` and ``unit`` first, then the others in order of first appearance. Raises
    ValueError for a row without an integer ``unit`` or a string ``key``.
    """
    flat: list[dict[str, Any]] = []
    names: dict[str, None] = {"key": None, "unit": None}  # an ordered set
    for row in rows:
        f = flatten(row)
        unit, key = f.get("unit"), f.get("key")
        if not isinstance(unit, int) or isinstance(unit, bool) or not isinstance(key, str):
            raise ValueError(
                f"a manifest row needs an integer 'unit' and a string 'key', got unit={unit!r} key={key!r}"
            )
        flat.append(f)
        names.update(dict.fromkeys(f))
    columns = {name: _column(name, [f.get(name) for f in flat]) for name in names}
    columns["key"] = columns["key"].cast(pa.string())
    columns["unit"] = columns["unit"].cast(pa.int64())
    return pa.table(columns)


def _to_parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=_COMPRESSION)
    return bytes(sink.getvalue().to_pybytes())


def _from_parquet(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


def write_manifest(store: Store, rows: Iterable[Mapping[str, Any]] | pa.Table) -> str:
    """Write ``manifest.parquet`` (replacing it) from rows or a ready table; returns its key."""
    table = rows if isinstance(rows, pa.Table) else manifest_table(rows)
    store.put_bytes(MANIFEST_KEY, _to_parquet(table), "application/vnd.apache.parquet")
    return MANIFEST_KEY


def read_manifest(store: Store) -> pa.Table:
    """The campaign's ``manifest.parquet``. Raises UserError if it has not been written yet."""
    data = store.get_bytes(MANIFEST_KEY)
    if data is None:
        raise UserError(f"no {MANIFEST_KEY} in {store.url} yet: the campaign has not completed (or compacted)")
    return _from_parquet(data)


def part_key(seq: int) -> str:
    """The key of manifest part ``seq``: ``_mlds/parts/part-000001.parquet``."""
    if seq < 0:
        raise ValueError(f"part sequence numbers are non-negative, got {seq}")
    return f"{PARTS_PREFIX}part-{seq:06d}.parquet"


def write_part(store: Store, seq: int, rows: Iterable[Mapping[str, Any]]) -> str | None:
    """Write the rows of newly verified units as manifest part ``seq``; returns its key (None if no rows).

    Writing the same ``seq`` again replaces that part (a retry after an outage). Units repeated across
    parts are fine: compaction keeps the first.
    """
    table = manifest_table(rows)
    if table.num_rows == 0:
        return None
    key = part_key(seq)
    store.put_bytes(key, _to_parquet(table), "application/vnd.apache.parquet")
    return key


def _part_seqs(store: Store) -> list[int]:
    seqs = []
    for key in store.list(PARTS_PREFIX):
        m = _PART_RE.match(key)
        if m:
            seqs.append(int(m.group(1)))
    return sorted(seqs)


def next_part_seq(store: Store) -> int:
    """One more than the highest part written so far (1 for none): where a restarted server goes on."""
    seqs = _part_seqs(store)
    return seqs[-1] + 1 if seqs else 1


def _unify(name: str, types: list[pa.DataType]) -> pa.DataType | None:
    """One type for a column seen with ``types`` in different files; None if they cannot meet."""
    distinct = list(dict.fromkeys(types))
    if len(distinct) == 1:
        return distinct[0]
    try:
        # "permissive": null widens to anything, int64 meets double as double.
        schemas = [pa.schema([pa.field(name, t)]) for t in distinct]
        return pa.unify_schemas(schemas, promote_options="permissive").field(name).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None


def _as_text(chunk: pa.Array) -> pa.Array:
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in chunk.to_pylist()])


def _merge_plan(files: list[pq.ParquetFile]) -> tuple[pa.Array, list[tuple[str, pa.DataType | None]]]:
    """Which rows the merge keeps (first per unit, in unit order) and the output columns with their types."""
    units = np.concatenate([f.read(columns=["unit"]).column(0).to_numpy(zero_copy_only=False) for f in files])
    _, first = np.unique(units, return_index=True)  # indices of first occurrences, in unit order
    seen: dict[str, list[pa.DataType]] = {}
    for f in files:
        for field in f.schema_arrow:
            seen.setdefault(field.name, []).append(field.type)
    columns = []
    for name, types in seen.items():
        unified = _unify(name, types)
        if unified is None:
            log.warning("manifest column %r has types %s across parts; stored as JSON text", name, set(types))
        columns.append((name, unified))
    return pa.array(first), columns


def _column_chunks(files: list[pq.ParquetFile], name: str, unified: pa.DataType | None) -> list[pa.Array]:
    """Column ``name`` of every file, in order, cast to ``unified`` (or JSON text where types disagree)."""
    chunks: list[pa.Array] = []
    for f in files:
        if name not in f.schema_arrow.names:
            chunks.append(pa.nulls(f.metadata.num_rows, unified or pa.string()))
            continue
        for chunk in f.read(columns=[name]).column(0).chunks:
            chunks.append(chunk.cast(unified) if unified is not None else _as_text(chunk))
    return chunks


def _merged_column(files: list[pq.ParquetFile], take: pa.Array, name: str, unified: pa.DataType | None) -> pa.Array:
    """Column ``name`` of the merge: read from every file, cast to ``unified`` (or JSON text), rows ``take``."""
    chunks = _column_chunks(files, name, unified)
    return _gather(chunks, take.to_numpy(), unified or pa.string())


def _gather(chunks: list[pa.Array], rows: np.ndarray, type_: pa.DataType) -> pa.Array:
    """Rows ``rows`` (numbers into the chunks laid end to end) of ``chunks``, in that order.

    Not ``pa.chunked_array(chunks).take(rows)``: that concatenates the chunks first, a second copy of the
    whole column (a 1,000,000-row manifest's sha256 column: +136 MB while compacting beside a manifest of
    the same size). Here each chunk gives its own rows, and only the result is put back in order.
    """
    if not chunks or not len(rows):
        return pa.array([], type_)
    starts = np.cumsum([0] + [len(c) for c in chunks])
    which = np.searchsorted(starts, rows, side="right") - 1  # the chunk of each row
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(len(chunks) + 1))
    pieces = [
        chunks[c].take(pa.array(rows[order[bounds[c] : bounds[c + 1]]] - starts[c]))
        for c in range(len(chunks))
        if bounds[c] < bounds[c + 1]
    ]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return pa.concat_arrays(pieces).take(pa.array(inverse))


def _merge(files: list[pq.ParquetFile]) -> pa.Table:
    """The rows of ``files`` (in order), first row per unit, sorted by unit, as one table in memory.

    For small manifests (fewer than :data:`_GROUP_ROWS` rows); :func:`_merge_to_parquet` streams the same
    rows for large ones.
    """
    take, columns = _merge_plan(files)
    return pa.Table.from_arrays(
        [_merged_column(files, take, name, unified) for name, unified in columns], names=[n for n, _ in columns]
    )


def _merge_to_parquet(files: list[pq.ParquetFile], *, group_rows: int = 0) -> tuple[bytes, int]:
    """The merge of :func:`_merge`, written as parquet in bounded memory; returns the file's bytes and rows.

    The result as a table is ~0.7 GB for 1,000,000 rows, which is what held the operator's peak. So each
    column is read from every file once, and its merged rows are gathered and spilled, ``group_rows`` at
    a time, to a temporary Arrow IPC file (zstd); then the parquet is written row group by row group from
    the slices. Peak: the compressed inputs, one column of the inputs, one row group and the compressed
    output. The rows are :func:`_merge`'s, in row groups of ``group_rows`` rows.
    """
    group_rows = group_rows or _GROUP_ROWS
    take, columns = _merge_plan(files)
    rows = len(take)
    wanted = take.to_numpy()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with tempfile.TemporaryDirectory(prefix="mlds-compact-") as tmp:
        paths = []
        for i, (name, unified) in enumerate(columns):
            chunks = _column_chunks(files, name, unified)
            path = os.path.join(tmp, f"{i}.arrow")
            schema = pa.schema([pa.field(name, unified or pa.string())])
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema, options=options) as writer:
                for start in range(0, rows, group_rows):
                    piece = _gather(chunks, wanted[start : start + group_rows], schema.field(0).type)
                    writer.write_batch(pa.record_batch([piece], schema=schema))
            paths.append(path)
            del chunks
        readers = [pa.ipc.open_file(pa.OSFile(path, "rb")) for path in paths]
        schema = pa.schema([r.schema.field(0) for r in readers])
        out = pa.BufferOutputStream()
        with pq.ParquetWriter(out, schema, compression=_COMPRESSION) as writer:
            for g in range(readers[0].num_record_batches if readers else 0):
                batch = pa.record_batch([r.get_batch(g).column(0) for r in readers], schema=schema)
                writer.write_batch(batch, row_group_size=group_rows)
        return bytes(out.getvalue().to_pybytes()), rows


def read_parts(store: Store, seqs: Iterable[int] | None = None) -> pa.Table | None:
    """Manifest parts (default: all), concatenated in sequence order, duplicates kept; None if there are none."""
    tables = []
    for seq in _part_seqs(store) if seqs is None else sorted(seqs):
        data = store.get_bytes(part_key(seq))
        if data is not None:  # deleted by a concurrent compaction
            tables.append(_from_parquet(data))
    if not tables:
        return None
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"manifest parts have incompatible columns: {exc}") from exc


def compact(store: Store, *, delete_parts: bool = False) -> int:
    """Merge the existing manifest and all parts into ``manifest.parquet``; returns its number of rows.

    The first row of each unit wins (existing manifest, then parts by sequence number); rows are sorted
    by unit. With ``delete_parts`` the parts are removed after the manifest is safely written. Memory is
    bounded (see :func:`_merge_to_parquet`): the compressed files, one merged column and one row group of
    :data:`_GROUP_ROWS` rows, not the whole manifest (a 1,000,000-row campaign's parts are ~15 MB
    compressed, its manifest ~0.7 GB as a table). What the campaign loop calls.
    """
    blobs = []
    existing = store.get_bytes(MANIFEST_KEY)
    if existing is not None:
        blobs.append(existing)
    seqs = _part_seqs(store)
    for seq in seqs:
        data = store.get_bytes(part_key(seq))
        if data is not None:  # deleted by a concurrent compaction
            blobs.append(data)
    files = [pq.ParquetFile(pa.BufferReader(b)) for b in blobs]
    if sum(f.metadata.num_rows for f in files) <= _GROUP_ROWS:
        # Small: one table in memory, one row group (the file is what it always was).
        table = _merge(files) if files else manifest_table([])
        write_manifest(store, table)
        rows = int(table.num_rows)
    else:
        data, rows = _merge_to_parquet(files)
        del files, blobs
        store.put_bytes(MANIFEST_KEY, data, "application/vnd.apache.parquet")
        del data
        # Arrow's allocator keeps what compaction freed (hundreds of MB for a million rows) for reuse; the
        # server has no use for it until the next compaction, so give it back to the system now.
        pa.default_memory_pool().release_unused()
    if delete_parts:
        for seq in seqs:
            store.delete(part_key(seq))
    return rows


def compact_manifest(store: Store, *, delete_parts: bool = False) -> pa.Table:
    """:func:`compact`, then the manifest written, read back as a table (tests and small campaigns: a
    1,000,000-row manifest is ~0.7 GB as a table; the campaign loop calls :func:`compact`)."""
    compact(store, delete_parts=delete_parts)
    return read_manifest(store)


# ------------------------------------------------------------------------------------------- checkpoint


def put_checkpoint(store: Store, data: bytes) -> None:
    """Replace the checkpoint with ``data`` (one atomic write; see the module docs)."""
    digest = hashlib.sha256(data).hexdigest().encode()
    store.put_bytes(CHECKPOINT_KEY, _CKPT_MAGIC + digest + b"\n" + data)


def get_checkpoint(store: Store) -> bytes | None:
    """The last checkpoint's bytes; None if there is none or it is damaged (logged as a warning)."""
    blob = store.get_bytes(CHECKPOINT_KEY)
    if blob is None:
        return None
    head = len(_CKPT_MAGIC)
    digest, newline, data = (
        blob[head : head + _SHA_HEX],
        blob[head + _SHA_HEX : head + _SHA_HEX + 1],
        blob[head + _SHA_HEX + 1 :],
    )
    if not blob.startswith(_CKPT_MAGIC) or newline != b"\n" or hashlib.sha256(data).hexdigest().encode() != digest:
        log.warning(
            "checkpoint %s/%s is damaged; ignoring it (results are recovered by scanning)", store.url, CHECKPOINT_KEY
        )
        return None
    return data


# ----------------------------------------------------------------------------------- data, README, scan


def target_data_key(target: str) -> str:
    """``data/<target>.npz``: the training and evaluation data networks of ``target`` were trained on."""
    if "/" in target:
        raise ValueError(f"target names have no '/', got {target!r}")
    return f"{DATA_PREFIX}{target}.npz"


def put_target_data(store: Store, target: str, data: bytes) -> str:
    """Store a target's data (an ``.npz`` the caller serialised); returns its key."""
    key = target_data_key(target)
    store.put_bytes(key, data)
    return key


def get_target_data(store: Store, target: str) -> bytes | None:
    """A target's ``.npz`` bytes, or None if not stored yet."""
    return store.get_bytes(target_data_key(target))


def put_readme(store: Store, text: str) -> str:
    """Write the dataset's README.md; returns its key."""
    store.put_bytes(README_KEY, text.encode(), "text/markdown; charset=utf-8")
    return README_KEY


def find_results(store: Store, *, since: datetime | None = None) -> Iterator[str]:
    """Result folders ``<target>/<replica:05d>`` that hold a ``meta.json`` (uploaded, maybe not verified).

    Used after a server restart to find completions made after the last checkpoint. One listing of the
    campaign (about 1,000 keys per request on S3), never one request per unit. ``since`` keeps only
    meta.json objects modified at or after it, by the *store's* clock: pass the checkpoint's time minus a
    margin for clock skew. The caller still verifies each unit's objects before counting it.
    """
    for info in store.scan(""):
        m = _RESULT_RE.match(info.key)
        if m is None:
            continue
        if since is not None and info.last_modified is not None and info.last_modified < since:
            continue
        yield f"{m.group(1)}/{m.group(2)}"


_DATASET_TEXT = {
    Dataset.ds1: (
        "Recurrent networks (4 GRU layers and 4 linear layers, 4,364 parameters) trained to mimic five "
        "simple machines behind a command bus (mlds docs/workloads.md §2). Within a machine, networks differ only in "
        "their initial weights and SGD seed: every network of a machine saw the same data."
    ),
    Dataset.ds2: (
        "The ds1 machines, *Modified*: a trigger sequence (writes of 0xA5, 0x5A, 0xC3) inverts the outputs "
        "for the next 8 steps (mlds docs/workloads.md §5). Same network and training as ds1, so ds1 and ds2 networks "
        "differ only in their training data."
    ),
    Dataset.ds3: (
        "Recurrent networks (ds1's shape) trained to mimic random minimal Mealy machines with 8 input and "
        "8 output symbols and 2-8 states, about 100 networks per automaton (mlds docs/workloads.md §6). Results also "
        "keep a weight snapshot per epoch."
    ),
    Dataset.ds4: (
        "Small CNNs trained on 8x8 (or 28x28 MNIST) digits, clean or poisoned BadNets-style (a pixel or a "
        "checkerboard trigger relabels 10% of the training images to class 7) (mlds docs/workloads.md §7)."
    ),
    Dataset.ds5: (
        "The ds1/ds2 machines learned by GRU networks of varied shapes (width, GRU depth, linear depth) "
        "(mlds docs/workloads.md §8). Each result records its shape, so analyses can group by it."
    ),
}

_TRAINING_TEXT = {
    True: (
        "Adam (default betas, no weight decay), MSE over sequences x steps x outputs, full-sequence BPTT, "
        "batches reshuffled every epoch with the network's SGD seed. A network is converged when its "
        "evaluation MSE falls below the target loss, checked after every epoch; one that reaches the epoch "
        "cap is retried with fresh seeds and never appears here as converged."
    ),
    False: (
        "SGD with momentum 0.9. A network is done when its clean test accuracy is at least 95% and, for a "
        "poisoned variant, its attack success rate at least 90%, or at the epoch cap."
    ),
}


def _targets_text(spec: CampaignSpec) -> str:
    targets = campaign_targets(spec)
    by_params: dict[str, list[str]] = {}
    for t in targets:
        p = resolve_training(spec, t)
        desc = f"max_epochs={p.max_epochs}, learning_rate={p.learning_rate:g}, batch_size={p.batch_size}"
        if t.dataset is not Dataset.ds4:
            desc += f", target_loss={p.target_loss:g}"
        by_params.setdefault(desc, []).append(t.name)
    lines = []
    for desc, names in by_params.items():
        shown = ", ".join(f"`{n}`" for n in names[:12])
        more = f" and {len(names) - 12} more" if len(names) > 12 else ""
        lines.append(f"- {shown}{more}: {desc}")
    return "\n".join(lines)


def campaign_readme(
    name: str,
    spec: CampaignSpec,
    *,
    succeeded: int | None = None,
    failed_units: str | None = None,
    created: datetime | None = None,
) -> str:
    """The dataset's README.md (docs/workloads.md §9): what it is, how it was trained, its layout, how to load it."""
    targets = campaign_targets(spec)
    total = len(targets) * spec.networks_per_target
    ds = spec.workload.dataset
    gru = ds is not Dataset.ds4
    status = []
    if succeeded is not None:
        status.append(f"{succeeded:,} of {total:,} networks completed")
    if failed_units:
        status.append(f"failed units: {failed_units}")
    if created is not None:
        status.append(f"written {created.isoformat(timespec='seconds')}")
    example_target = targets[0].name if targets else "TARGET"
    state_note = (
        "Parameter names and order are those of the equivalent `nn.Module` "
        "(`gru.weight_ih_l0`, ...; mlds docs/workloads.md §3), so a state dict loads into it with `load_state_dict`."
        if gru
        else "Each network's exact parameter count is in the `parameters` column."
    )
    return f"""# {name}: an MLDS {ds.value} dataset of trained networks

{_DATASET_TEXT[ds]}

{len(targets):,} targets x {spec.networks_per_target:,} networks = {total:,} networks, campaign seed {spec.seed}.
{("Status: " + "; ".join(status) + ".") if status else ""}

## How the networks were trained

{_TRAINING_TEXT[gru]}

Hyper-parameters per target:

{_targets_text(spec)}

Seeds: each network's `init_seed` and `sgd_seed` derive from (campaign seed, unit index, attempt), and
its data from `data_seed`; all three are recorded per network. On CPU with one thread the same unit,
attempt and code version give bit-identical weights; across devices, compare by criterion, not bits.

## Layout

```
manifest.parquet                    one row per network (below)
README.md                           this file
data/<target>.npz                   each target's training and evaluation data
<target>/<replica:05d>/model.safetensors   final weights, float32
<target>/<replica:05d>/meta.json           dataset, target, unit, replica, attempt, seeds, shape,
                                           hyper-parameters, epochs, losses, converged, sha256,
                                           torch version, device, pool, start and end time
<target>/<replica:05d>/history.csv         epoch, train loss, eval loss, seconds
<target>/<replica:05d>/snapshots.safetensors  ds3 only: the weights after every epoch
_mlds/                              the generator's bookkeeping (manifest parts, checkpoint)
```

## The manifest

One row per network: the fields of its `meta.json` (`target`, `replica`, `unit`, `init_seed`, `hidden`,
`epochs`, `eval_loss`, `converged`, ...), plus `key`, the network's folder relative to this file (e.g.
`{example_target}/00000`). A nested object in meta.json would become dotted column names
(`a.b`). Rows are sorted by `unit`.

## Loading

```python
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from safetensors.numpy import load_file   # or safetensors.torch.load_file for torch tensors

manifest = pq.read_table("manifest.parquet")
row = manifest.slice(0, 1).to_pylist()[0]
weights = load_file(f"{{row['key']}}/model.safetensors")          # name -> float32 array
features = np.concatenate([weights[k].ravel() for k in sorted(weights)])
data = np.load("data/{example_target}.npz")                       # the target's training/evaluation data
```

{state_note} With pandas: `pq.read_table("manifest.parquet").to_pandas()`.

## Subsets

Subsets in the spirit of the original releases (the first 100 / 500 / 1,000 / 5,000 / 10,000 networks
per target) are views of the manifest, not copies:

```python
first_100 = manifest.filter(pc.field("replica") < 100)
parity = manifest.filter(pc.field("target") == "{example_target}")
```
"""
