"""The kopf operator: `mlds operator`, which turns TrainingCampaigns into Jobs, Secrets and status.

Modules, from the outside in:

- :mod:`~mlds_operator.controller.command`: the `mlds operator` command and :func:`run_operator`.
- :mod:`~mlds_operator.controller.handlers`: the kopf handlers (thin: parse, call, patch).
- :mod:`~mlds_operator.controller.sync`: :class:`Controller`, one reconcile pass of a campaign with its I/O.
- :mod:`~mlds_operator.controller.reconcile`: the pure ``reconcile(campaign, observed)``.
- :mod:`~mlds_operator.controller.conditions`: condition types, reasons and when they flip (pure).
- :mod:`~mlds_operator.controller.pods`: the token Secret and worker Job builders (pure).
- :mod:`~mlds_operator.controller.kube`: the one module that talks to the Kubernetes API.

Public names: :class:`~mlds_operator.controller.sync.Controller`,
:class:`~mlds_operator.controller.sync.OperatorSettings`,
:class:`~mlds_operator.controller.command.OperatorConfig`,
:func:`~mlds_operator.controller.command.run_operator`.
"""
