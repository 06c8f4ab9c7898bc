"""The files of one trained network, as the worker writes them and the server checks and publishes them.

One list shared by every side (docs/workloads.md §9): the worker builds these files
(:func:`mlds_worker.results.result_files`) and uploads exactly the names the server presigned; the lease
service (:mod:`mlds_operator.leases.service`) signs uploads for :func:`result_files_for` and refuses a
completion that declares any other set; the manifest and the researchers' API (:mod:`mlds_data`) read
them back from ``<target>/<replica:05d>/``.
"""

from __future__ import annotations

from typing import Final

from .campaign import Dataset

__all__ = [
    "HISTORY_FILE",
    "MAX_RESULT_FILE_BYTES",
    "META_FILE",
    "MODEL_FILE",
    "SNAPSHOTS_FILE",
    "result_files_for",
]

#: The final weights (float32 safetensors); meta.json records its sha256.
MODEL_FILE: Final = "model.safetensors"
#: One flat JSON object per network: a row of the campaign's manifest. Written last, so a result folder
#: holding it is whole.
META_FILE: Final = "meta.json"
#: One line per epoch: ``epoch,train_loss,eval_loss,seconds`` (ds4 adds accuracy columns).
HISTORY_FILE: Final = "history.csv"
#: ds3 only: the flattened weights after every epoch.
SNAPSHOTS_FILE: Final = "snapshots.safetensors"

#: Largest result file the server accepts, uploaded or declared (ds3 snapshots of 4,096 epochs are ~70 MB).
#: The server holds a file in memory while it verifies and publishes it, so this bounds that memory.
MAX_RESULT_FILE_BYTES: Final = 256 << 20


def result_files_for(dataset: Dataset) -> tuple[str, ...]:
    """The files a worker uploads per unit (meta.json last: its presence marks a whole result)."""
    if dataset is Dataset.ds3:
        return (MODEL_FILE, HISTORY_FILE, SNAPSHOTS_FILE, META_FILE)
    return (MODEL_FILE, HISTORY_FILE, META_FILE)
