"""Runs: the run directory that ``aiba eval`` writes and ``report`` and the figures read.

In: a run's settings and, per sample, its record and arrays. Out: ``manifest.json``,
``records.jsonl`` (and per-rank shards, merged), ``maps/{id}.npz``, and the lock that keeps
one writer at a time. Nothing here loads a model.
"""
