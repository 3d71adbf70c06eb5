"""Shared fixtures of the test suite."""
import os
import random

import pytest
import torch


@pytest.fixture
def seed():
    """Fresh random inputs every run; ``FASTIPIRM_TEST_SEED`` replays a failure's seed."""
    s = int(os.environ.get("FASTIPIRM_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(s)
    return s


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one CPU thread is faster and immune to oversubscription on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
