"""The experiments and benchmarks behind the figures of ``docs/results.md``.

Each module is run from the repository root as ``python -m experiments.<name>`` (the
benchmarks as ``python -m experiments.bench.<name>``); ``--help`` lists its settings.
It is not installed with :mod:`flowattn`: it lives in the checkout, beside the tests.
"""
