"""The contrastive code of a model's output: DCoDR's encoder returns its code, the SimCLR model
``(h, z)`` (the code is the projection ``z``), CL-ICA's encoders their latent estimate."""
from __future__ import annotations

import torch


def contrastive_code(output) -> torch.Tensor:
    """The code in ``output`` (a tensor, or the SimCLR model's ``(h, z)``: ``z``)."""
    return output[1] if isinstance(output, (tuple, list)) else output
