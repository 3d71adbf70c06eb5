"""DCoDR's training batches: contiguous blocks of same-domain anchors and their positives.

The official ``BalancedBatchSampler`` (``docs/dcodr.md#batches``): every domain keeps a shuffled
list of its samples and a pointer; a batch draws ``domains_per_batch`` (4) domains uniformly
without replacement (all of them when there are fewer, e.g. 2 for Edges2Shoes) and takes the
next ``samples_per_domain`` (32) samples of each, laid out as contiguous blocks; a domain whose
list has fewer than ``samples_per_domain`` left after the take is reshuffled and its pointer
reset, and a domain with fewer samples than that gives a short block (all its samples). An epoch
yields batches while ``count + batch < N`` (``count`` grows by the full batch size each time),
``(N - 1) // batch`` of them.

Here the lists, pointers and draws of an epoch come from a generator seeded by (run seed, epoch),
so an epoch is a pure function of them and a resumed run draws what the uninterrupted one drew
(the official carries its pointers over from one epoch to the next and uses NumPy's global
generator). Each batch is ``(indices, anchors, positives)`` on the device: float images in
[0, 1] (no mean/std normalisation), the anchors un-augmented, one positive view each
(:func:`.dcodr_augment.dcodr_positive_views`; with ``pipeline="dali"`` the same recipe as a DALI
graph, :class:`.dali.DaliDomainLoader`, whose draws derive from (seed, epoch)).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..seeding import Stream, derived_generator
from .dcodr_augment import dcodr_positive_views

#: the methods that train on these batches
DOMAIN_METHODS = ("dcodr", "dcodr_norec")


def domain_batch_size(domains: np.ndarray, domains_per_batch: int, samples_per_domain: int
                      ) -> int:
    """The full batch of the sampler: ``min(domains_per_batch, domains) * samples_per_domain``."""
    return min(domains_per_batch, len(np.unique(domains))) * samples_per_domain


def domain_epoch_length(domains: np.ndarray, domains_per_batch: int,
                        samples_per_domain: int) -> int:
    """Batches per epoch, the official ``(N - 1) // batch``."""
    return (len(domains) - 1) // domain_batch_size(domains, domains_per_batch, samples_per_domain)


def domain_batch_indices(domains: np.ndarray, domains_per_batch: int, samples_per_domain: int,
                         generator: torch.Generator) -> list[np.ndarray]:
    """The sample indices of one epoch's batches (each batch's blocks in draw order)."""
    domains = np.asarray(domains)
    labels = np.unique(domains)
    per = min(domains_per_batch, len(labels))
    batch = per * samples_per_domain
    members = {int(d): np.flatnonzero(domains == d) for d in labels}

    def shuffled(d: int) -> np.ndarray:
        m = members[d]
        return m[torch.randperm(len(m), generator=generator).numpy()]

    lists = {d: shuffled(d) for d in members}
    pointer = {d: 0 for d in members}
    out, count, n = [], 0, len(domains)
    while count + batch < n:
        chosen = labels[torch.randperm(len(labels), generator=generator)[:per].numpy()]
        blocks = []
        for d in map(int, chosen):
            blocks.append(lists[d][pointer[d]:pointer[d] + samples_per_domain])
            pointer[d] += samples_per_domain
            if pointer[d] + samples_per_domain > len(lists[d]):
                lists[d], pointer[d] = shuffled(d), 0
        out.append(np.concatenate(blocks))
        count += batch
    return out


class DomainBatches:
    """The loop's training views of a DCoDR run on ``dataset`` (an ``ArrayDataset``) with the
    domain of each sample in ``domains`` (N,)."""

    augment = None

    def __init__(self, dataset, domains: np.ndarray, *, domains_per_batch: int = 4,
                 samples_per_domain: int = 32, seed: int, device,
                 generator: torch.Generator, pipeline: str = "torch"):
        domains = np.asarray(domains)
        if domains.shape != (len(dataset.images),):
            raise ValueError(f"domains must hold one value per image ({len(dataset.images)}), "
                             f"got shape {domains.shape}")
        if len(np.unique(domains)) < 1:
            raise ValueError("the data set has no domains")
        self.dataset, self.domains, self.seed = dataset, domains, seed
        self.per, self.samples = domains_per_batch, samples_per_domain
        self.device, self.generator = torch.device(device), generator
        self.batch = domain_batch_size(domains, domains_per_batch, samples_per_domain)
        if len(domains) <= self.batch:
            raise ValueError(f"a DCoDR batch holds {self.batch} images but the data set has only "
                             f"{len(domains)} (dcodr.domains_per_batch, dcodr.samples_per_domain)")
        if pipeline not in ("torch", "dali"):
            raise ValueError(f"pipeline must be torch or dali, got {pipeline!r}")
        self.pipeline = pipeline
        self.dali = None
        if pipeline == "dali":
            from .dali import DaliDomainLoader
            self.dali = DaliDomainLoader(dataset.images, seed=seed, device=self.device)
        else:
            self.images = torch.from_numpy(dataset.images).to(self.device)      # uint8 NHWC

    def __len__(self) -> int:
        return domain_epoch_length(self.domains, self.per, self.samples)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        gen = derived_generator(self.seed, Stream.DOMAIN_BATCHES, epoch)
        batches = domain_batch_indices(self.domains, self.per, self.samples, gen)
        if self.dali is not None:
            yield from self.dali.epoch(epoch, batches)
            return
        for idx in batches:
            indices = torch.from_numpy(idx).to(self.device, non_blocking=True)
            x = self.images[indices].permute(0, 3, 1, 2).float().div_(255.0)
            yield indices, x, dcodr_positive_views(x, self.generator)


def domain_values(dataset, factor: str = "") -> np.ndarray:
    """The domain of every sample of ``dataset`` as int64 (N,): its factor ``factor`` when given
    (``data.domain_factor``, e.g. the synthetic data's background), else the factor the data set
    names as its domain (``dataset.domain_factor``), else its labels."""
    factors = getattr(dataset, "factors", None) or {}
    factor = factor or getattr(dataset, "domain_factor", None) or ""
    if factor:
        if factor not in factors:
            raise ValueError(f"data.domain_factor: {factor!r} is not a factor of "
                             f"{getattr(dataset, 'name', 'the data set')} (factors: "
                             f"{', '.join(factors) or 'none'})")
        return np.asarray(factors[factor]).astype(np.int64)
    if getattr(dataset, "labels", None) is None:
        raise ValueError(f"{getattr(dataset, 'name', 'the data set')} has no domain: set "
                         f"data.domain_factor to one of its factors")
    return np.asarray(dataset.labels).astype(np.int64)
