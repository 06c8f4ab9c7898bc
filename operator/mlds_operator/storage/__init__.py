"""Object storage: the one place that talks to it, and the layout of a campaign's objects.

- :mod:`~mlds_operator.storage.store`: :class:`Store` with its two backends, :class:`LocalStore` (a
  folder, `mlds run`'s default) and :class:`S3Store` (MinIO or any S3), and :func:`open_store`.
- :mod:`~mlds_operator.storage.manifest`: the dataset files of a campaign (manifest, parts, README,
  checkpoint, per-target data) and their object keys.

Public names: :class:`~mlds_operator.storage.store.Store`,
:class:`~mlds_operator.storage.store.LocalStore`, :class:`~mlds_operator.storage.store.S3Store`,
:func:`~mlds_operator.storage.store.open_store`.
"""
