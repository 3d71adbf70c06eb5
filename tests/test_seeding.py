"""One seed scheme: streams are pure functions of (seed, tags) and never collide."""
import numpy as np
import torch

from fastipirm.data.dali import epoch_seed
from fastipirm.data.loader import epoch_permutation
from fastipirm.seeding import Stream, derive_seed, derived_generator, numpy_rng


def test_streams_are_pure_and_distinct():
    assert derive_seed(7, 1, 2) == derive_seed(7, 1, 2)
    seeds = {derive_seed(s, *tags) for s in (0, 7) for tags in ((), (1,), (2,), (1, 2), (2, 1))}
    assert len(seeds) == 10
    a = torch.rand(5, generator=derived_generator(3, Stream.AUGMENT))
    torch.rand(100, generator=derived_generator(3, Stream.THETA_INIT))   # another stream drawn
    assert torch.equal(a, torch.rand(5, generator=derived_generator(3, Stream.AUGMENT)))
    assert np.array_equal(numpy_rng(3, 1).random(4), numpy_rng(3, 1).random(4))


def test_named_streams_never_equal_an_epoch_order():
    assert all(s >= 2**32 for s in Stream if s is not Stream.DALI)
    assert len(set(Stream)) == len(Stream)


def test_epoch_order_and_dali_seed_are_the_seed_sequence_of_their_tags():
    """Pinned: the epoch order and the DALI seeds of earlier versions are this scheme's."""
    word = np.random.SeedSequence([5, 3]).generate_state(1, dtype=np.uint64)[0]
    want = torch.randperm(50, generator=torch.Generator().manual_seed(int(word)))
    assert torch.equal(epoch_permutation(50, 5, 3), want)
    dali = np.random.SeedSequence([5, 3, 0xDA11]).generate_state(1)[0]
    assert epoch_seed(5, 3) == int(dali) & 0x7FFFFFFF
