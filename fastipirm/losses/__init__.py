"""The pure loss functions of the training methods, one module per method, all on the fused op."""
from .clica import clica_infonce, clica_similarity
from .dcodr import dcodr_contrastive_loss
from .ipirm import (balance_constraint, maximization_objective, memberships_from_logits,
                    minimization_loss, relaxed_entropy_threshold)
from .perceptual import PerceptualDistance, load_vgg16
from .simclr import debiased_nt_xent, nt_xent

__all__ = ["nt_xent", "debiased_nt_xent", "clica_infonce", "clica_similarity", "minimization_loss",
           "maximization_objective", "balance_constraint", "memberships_from_logits",
           "relaxed_entropy_threshold", "dcodr_contrastive_loss", "PerceptualDistance",
           "load_vgg16"]
