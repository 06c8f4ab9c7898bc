"""The mlds worker: the networks, the trainer, results, and the lease loop of a worker pod.

Trains on the data of :mod:`mlds_workloads`; never imports the operator's internals and talks to it only
through the lease protocol (mlds_contract).
"""

__version__ = "0.1.0"
