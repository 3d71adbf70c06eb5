"""One seed scheme: every random stream of a run is a pure function of (run seed, tags).

A stream is named by integer tags after the run seed and drawn from
``numpy.random.SeedSequence([seed, *tags])``: :func:`numpy_rng` is a NumPy generator on that
sequence, :func:`derive_seed` its first 64-bit word and :func:`derived_generator` a torch generator
seeded with that word. Nothing else in fastipirm turns a seed into randomness, so a stream never
depends on how many numbers another stream has drawn, and a run resumed at an epoch boundary gets
the same streams as the uninterrupted run.

The tags in use (:class:`Stream`): ``(epoch,)`` is the shuffled order of an epoch; every other
stream's first tag is at least ``2**32``, so it can never equal an epoch's order.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """First tags of the named streams (``derive_seed(seed, Stream.X, ...)``)."""

    AUGMENT = 2**32 + 1          # the training views' augmentation generator
    THETA_INIT = 2**32 + 2       # IP-IRM: the initial partition logits of a maximisation (+ epoch)
    THETA_ORDER = 2**32 + 3      # IP-IRM: the feature-batch shuffles of a maximisation (+ epoch)
    PROBE_INIT = 2**32 + 4       # linear probes: the classifier's initial weights
    PROBE_ORDER = 2**32 + 5      # linear probes: the shuffled training order
    PROBE_AUGMENT = 2**32 + 6    # linear probe with augmented training images
    DALI = 0xDA11                # third tag of a DALI pipeline seed: (epoch, DALI)
    LATENT_MIXING = 2**32 + 7    # CL-ICA: the frozen mixing network
    LATENT_PAIRS = 2**32 + 8     # CL-ICA: the latent pairs of an epoch (+ epoch)
    LATENT_EVAL = 2**32 + 9      # CL-ICA: the fresh samples of an evaluation (+ epoch)
    DOMAIN_BATCHES = 2**32 + 10  # DCoDR: the domain-block batches of an epoch (+ epoch)
    FACTOR_PROBES = 2**32 + 11   # DCoDR: the factor probes' initialisation and order


def _sequence(seed: int, tags) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), *(int(t) for t in tags)])


def derive_seed(seed: int, *tags: int) -> int:
    """The 64-bit seed of the stream ``(seed, *tags)`` (an int in ``[0, 2**64)``)."""
    return int(_sequence(seed, tags).generate_state(1, dtype=np.uint64)[0])


def derived_generator(seed: int, *tags: int, device="cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with :func:`derive_seed` of ``(seed, *tags)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *tags))


def numpy_rng(seed: int, *tags: int) -> np.random.Generator:
    """A NumPy generator on the seed sequence of ``(seed, *tags)``."""
    return np.random.default_rng(_sequence(seed, tags))
