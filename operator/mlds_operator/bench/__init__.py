"""`mlds bench`: benchmarks that print figures (never timed assertions; see bench/README.md).

- :mod:`~mlds_operator.bench.command`: the `mlds bench` group, loading one benchmark per subcommand.
- :mod:`~mlds_operator.bench.train`: training throughput, one network at a time against stacks.
- :mod:`~mlds_operator.bench.leases`: lease grants over HTTP, and a big campaign's memory.
- :mod:`~mlds_operator.bench.campaign_run`: a whole campaign end to end (`mlds bench run`).
- :mod:`~mlds_operator.bench.load`: loading a dataset into a weights matrix.
- :mod:`~mlds_operator.bench.leasebook`: the pure lease book at a million units (a script).

Benchmarks may import the worker and torch; nothing else in :mod:`mlds_operator` does.
"""
