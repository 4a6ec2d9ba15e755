"""Benchmarks of the data path against compute-only training, the naive loop and the machine's limits.

``python -m bench.pipeline`` (``make bench``), ``bench.freshness``, ``bench.snapshot``,
``bench.memory``; results and how to read them are in ``docs/BENCHMARKS.md``.
"""
