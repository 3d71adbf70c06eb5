"""Fused ops of fastipirm with backend dispatch.

``env_contrastive_loss`` is the contract every backend implements;
``env_contrastive_loss_reference`` is the literal (loop over environments, double backward)
oracle they are tested against; ``EnvContrastiveSpec`` is the op's options as one validated
object (what a backend receives).
"""
from .backends import available_backends, backend_report, register_backend
from .env_contrastive import env_contrastive_loss, validate_inputs
from .penalties import PENALTIES
from .reference import env_contrastive_loss_reference
from .spec import EnvContrastiveSpec

__all__ = ["env_contrastive_loss", "env_contrastive_loss_reference", "available_backends",
           "backend_report", "register_backend", "validate_inputs", "PENALTIES",
           "EnvContrastiveSpec"]
