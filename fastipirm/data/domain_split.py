"""The stratified 90/10 train/test split of the DCoDR data sets, in one place.

DCoDR's preprocessing scripts (Kahana & Hoshen, ECCV 2022) split every data set with
scikit-learn's ``train_test_split(np.arange(N), stratify=domain, test_size=0.1)`` without a
``random_state``, so the draw comes from NumPy's global generator; ``prepare_cars3d.py`` and
``prepare_celeba_x64.py`` seed it with ``np.random.seed(2)`` first. This module re-implements that
draw without scikit-learn, call for call on a ``numpy.random.RandomState``, so that with the same
domain labels (in the same row order) and the same seed it returns the very same index arrays, in
the same order, as ``train_test_split`` (checked against scikit-learn 1.9.1, whose algorithm is
unchanged since 0.22):

1. ``n_test = ceil(0.1 * N)`` and ``n_train = N - n_test``.
2. The domains are sorted (``np.unique``); each domain's rows, in increasing row order, form a
   block. A domain with a single row, or fewer rows in ``n_train``/``n_test`` than domains, is an
   error (as in scikit-learn).
3. Per-domain train counts: ``floor(count * n_train / N)``, then the missing rows go one each to
   the domains with the largest fractional remainders; ties are broken with
   ``rng.choice(tied, k, replace=False)``, visiting the remainder values from the largest down.
   The same rule on the rows left over gives the per-domain test counts.
4. For each domain in sorted order: ``rng.permutation(count)`` orders its block; the first train
   count rows go to train, the next test count rows to test.
5. Finally ``train = rng.permutation(train)`` and ``test = rng.permutation(test)``.

The seed is :data:`SEED` (= 2) for every data set: it is the official seed where the official
script sets one (Cars3D, CelebA). Shapes3D's and Edges2Shoes' scripts draw from an unseeded
generator, so their official splits cannot be reproduced; the same rule with seed 2 is used (see
``docs/dcodr-data.md``). Every split of every data set is therefore deterministic.

A split is returned as row indices into the ``"all"`` order of a reader (the published file
order); ``train`` and ``test`` keep the permuted order of step 5, which is the row order of the
official ``*_train.npz``/``*_test.npz`` files.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = ["SEED", "TEST_FRACTION", "SPLITS", "stratified_split", "split_rows", "check_split",
           "factor_codes"]

SEED = 2
"""Seed of the ``RandomState`` that draws every split (the official ``np.random.seed(2)``)."""
TEST_FRACTION = 0.1
"""Share of the rows that goes to the test split (the official ``test_size=0.1``)."""
SPLITS = ("train", "test", "all")
"""Split names the DCoDR readers accept."""


def check_split(dataset: str, split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"{dataset}: unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _approximate_mode(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Rows per domain when ``n_draws`` rows are spread over domains of sizes ``counts``:
    proportional shares rounded down, then the largest remainders get one more (ties drawn)."""
    share = counts / counts.sum() * n_draws
    taken = np.floor(share)
    missing = int(n_draws - taken.sum())
    if missing > 0:
        remainder = share - taken
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            k = min(len(tied), missing)
            taken[rng.choice(tied, size=k, replace=False)] += 1
            missing -= k
            if missing == 0:
                break
    return taken.astype(int)


def stratified_split(domains: np.ndarray, *, test_fraction: float = TEST_FRACTION,
                     seed: int = SEED, rng: Optional[np.random.RandomState] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of the official stratified split of ``N = len(domains)`` rows.

    ``domains`` holds one label per row (any sortable dtype). ``rng`` (a legacy
    ``numpy.random.RandomState``) is used and advanced when given, otherwise a fresh
    ``RandomState(seed)``; passing one lets a caller continue drawing exactly as the official script
    continues with the global generator (Shapes3D's reduced training set). Both arrays are int64
    and disjoint; together they cover every row.
    """
    domains = np.asarray(domains)
    if domains.ndim != 1:
        raise ValueError(f"domain labels must be one-dimensional, got shape {domains.shape}")
    n = domains.shape[0]
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"cannot split {n} rows {1 - test_fraction:g}/{test_fraction:g}: one part "
                         "would be empty")
    values, inverse, counts = np.unique(domains, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if counts.min() < 2:
        lonely = values[counts < 2][:10].tolist()
        raise ValueError(f"a stratified split needs at least 2 rows per domain; domain(s) "
                         f"{lonely} have only 1")
    if n_train < len(values) or n_test < len(values):
        raise ValueError(f"a stratified split of {n} rows into {n_train} train and {n_test} test "
                         f"rows cannot hold all {len(values)} domains in both parts")
    blocks = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    if rng is None:
        rng = np.random.RandomState(seed)
    train_per_domain = _approximate_mode(counts, n_train, rng)
    test_per_domain = _approximate_mode(counts - train_per_domain, n_test, rng)
    train: list = []
    test: list = []
    for block, count, k_train, k_test in zip(blocks, counts, train_per_domain, test_per_domain):
        shuffled = block.take(rng.permutation(count), mode="clip")
        train.extend(shuffled[:k_train])
        test.extend(shuffled[k_train:k_train + k_test])
    train_rows = rng.permutation(np.asarray(train, dtype=np.int64))
    test_rows = rng.permutation(np.asarray(test, dtype=np.int64))
    return train_rows.astype(np.int64), test_rows.astype(np.int64)


def split_rows(domains: np.ndarray, split: str, *, seed: int = SEED,
               test_fraction: float = TEST_FRACTION, dataset: str = "data set") -> np.ndarray:
    """Rows of ``split`` ("train", "test" or "all"): ``all`` is every row in order, the others
    come from :func:`stratified_split`."""
    check_split(dataset, split)
    if split == "all":
        return np.arange(len(domains), dtype=np.int64)
    try:
        train, test = stratified_split(domains, test_fraction=test_fraction, seed=seed)
    except ValueError as exc:
        raise ValueError(f"{dataset}: {exc}") from None
    return train if split == "train" else test


def factor_codes(values: np.ndarray) -> np.ndarray:
    """int64 codes 0..K-1 of ``values``, numbered in sorted order of the distinct values (the
    remapping DCoDR's evaluation applies to every factor)."""
    _, inverse = np.unique(np.asarray(values), return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)
