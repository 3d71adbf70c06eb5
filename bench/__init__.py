"""Benchmarks of fastipirm (``python -m bench.<name>``); recorded figures in ``bench/results/``."""
