"""The lease server: what workers talk to, in the operator and in `mlds run` alike.

- :mod:`~mlds_operator.leases.book`: the pure lease book (who trains which unit until when).
- :mod:`~mlds_operator.leases.service`: one campaign's lease service (book + store + verification,
  checkpoints and the dataset files).
- :mod:`~mlds_operator.leases.registry`: the campaigns a server serves, and opening one.
- :mod:`~mlds_operator.leases.http`: the lease HTTP server (aiohttp) and its OpenAPI document.
- :mod:`~mlds_operator.leases.metrics`: its Prometheus metrics.
- :mod:`~mlds_operator.leases.ranges`: compressed unit ranges ("12,40-42").

Public names: :class:`~mlds_operator.leases.book.LeaseBook`,
:class:`~mlds_operator.leases.service.CampaignService`,
:class:`~mlds_operator.leases.service.ServiceSettings`,
:class:`~mlds_operator.leases.registry.Campaigns`, :func:`~mlds_operator.leases.registry.open_campaign`,
:func:`~mlds_operator.leases.http.create_app`.
"""
