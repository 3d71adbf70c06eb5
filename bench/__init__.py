"""Benchmarks of fastipirm: ``python -m bench <name> [options]`` from the repository root
(:mod:`bench.cli`); recorded figures in ``bench/results/``, targets in :mod:`bench.targets`."""
