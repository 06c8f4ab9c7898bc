"""The mlds worker: MLDS workloads, the networks, the trainer, results, and the lease loop of a worker pod.

Never imports the operator's internals; talks to it only through the lease protocol (mlds_contract).
"""

__version__ = "0.1.0"
