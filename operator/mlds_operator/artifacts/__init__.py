"""Files generated from code and checked in, and the generator that writes or checks them.

- :mod:`~mlds_operator.artifacts.crd`: the TrainingCampaign CRD (from the pydantic contract); `mlds crd`.
- :mod:`~mlds_operator.artifacts.dashboard`: the Grafana dashboard (grafana-foundation-sdk).
- :mod:`~mlds_operator.artifacts.alerts`: the Prometheus alert rules.
- :mod:`~mlds_operator.artifacts.chart_readme`: the Helm chart's README (its values table).
- :mod:`~mlds_operator.artifacts.generate`: ``python -m mlds_operator.artifacts.generate [--check]``
  (``make generate`` / ``make check-generated``); it also writes the lease API's OpenAPI document.
"""
