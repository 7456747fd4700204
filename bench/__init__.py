"""Benchmarks and chaos runs of deviceapi at node scale (issue 7).

- ``python -m bench.run`` (``make bench``): the server in its own process on a Unix socket,
  simulated providers, 256 informers and an update storm in other processes, measured side by
  side with plain-asyncio grpclib floors; prints a table, writes ``bench/results/*.json`` and
  PNG plots (when matplotlib is installed). ``--quick`` is a small version for development.
- ``python -m bench.chaos`` (``make chaos``): the server in-process with a FaultInjector, faults
  at seeded random moments under load, invariants asserted after the run; the short version runs
  in the test suite (``tests/chaos/test_chaos_short.py``).

See docs/BENCHMARKS.md for the setup, the numbers and what limits each of them.
"""
