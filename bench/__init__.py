"""Benchmarks for precisebn: speed, exactness, memory and scaling against its peers.

Run ``python bench/run.py --quick`` (or the full mode without ``--quick``); see
``docs/benchmarks.md`` for the latest report.
"""
