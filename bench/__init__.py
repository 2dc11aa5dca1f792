"""Benchmark of pytest-celery-dispatch against plain pytest and pytest-xdist (``make bench``).

Run from the repository root: ``python -m bench`` (``--quick``, ``--rounds N``,
``--only W1,W2``; ``--help`` for the rest). See :mod:`bench.main`.
"""
