"""The mlds server side, one sub-package per role.

- :mod:`mlds_operator.controller`: the kopf operator (`mlds operator`): handlers, the reconcile pass,
  conditions, the pod and Job builders, and the one module that talks to the Kubernetes API.
- :mod:`mlds_operator.leases`: the lease server that workers talk to: the pure lease book, one
  campaign's lease service, the registry of served campaigns, the lease HTTP server and its metrics.
  Both the operator and `mlds run` serve leases through it.
- :mod:`mlds_operator.storage`: the object store (local folder or S3) and every object of a campaign's
  layout (results, manifest, checkpoint, per-target data).
- :mod:`mlds_operator.run`: `mlds run`, a whole campaign on one machine.
- :mod:`mlds_operator.artifacts`: everything generated from code and checked in (CRD, OpenAPI document,
  chart README, Grafana dashboard, alert rules) and the generator that writes or checks them.
- :mod:`mlds_operator.bench`: `mlds bench`, the benchmarks.

The researchers' side (loading datasets, `mlds dataset`, `mlds analyze`) is the separate package
:mod:`mlds_data`; the wire and resource types both sides share are :mod:`mlds_contract`.
"""
