"""Train/eval mode switches that always put a module back as they found it."""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """``with eval_mode(model):`` the model in eval mode (BN running statistics, no dropout),
    restored to its previous mode afterwards, also when the body raises."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def set_batchnorm_mode(module: nn.Module, training: bool) -> None:
    """Put only the BatchNorm layers of ``module`` in train (``True``) or eval mode."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(training)
