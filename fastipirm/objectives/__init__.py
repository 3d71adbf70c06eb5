"""Training objectives built on the fused ops."""
from .ipirm import (balance_constraint, maximization_objective, memberships_from_logits,
                    minimization_loss, relaxed_entropy_threshold)

__all__ = ["minimization_loss", "maximization_objective", "balance_constraint",
           "memberships_from_logits", "relaxed_entropy_threshold"]
