"""`mlds run`: a whole campaign on one machine, with the cluster's own lease server and workers.

Public names: :func:`~mlds_operator.run.runner.run_campaign`, :class:`~mlds_operator.run.runner.RunOptions`,
:class:`~mlds_operator.run.runner.RunSummary`, :data:`~mlds_operator.run.runner.run_command`.
"""
