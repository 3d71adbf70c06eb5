"""Fused ops of fastipirm with backend dispatch.

``masked_contrastive_loss`` is the general op (queries x keys, L_p similarities, groups, soft
targets, the per-key-column penalty ingredient), ``masked_contrastive_loss_reference`` its literal
oracle.

``env_contrastive_loss`` is the contract every backend implements;
``env_contrastive_loss_reference`` is the literal (loop over environments, double backward)
oracle they are tested against; ``EnvContrastiveSpec`` is the op's options as one validated
object (what a backend receives); ``env_contrastive_partials`` and ``env_penalty`` are its
distributed form (one rank's anchors against the gathered batch; per-slot partial sums to
all-reduce before the penalty squares them).
"""
from .backends import available_backends, backend_report, register_backend
from .env_contrastive import (env_contrastive_loss, env_contrastive_partials, env_penalty,
                             validate_inputs)
from .masked_contrastive import key_group_penalty, masked_contrastive_loss
from .masked_reference import masked_contrastive_loss_reference
from .penalties import PENALTIES
from .reference import env_contrastive_loss_reference
from .spec import EnvContrastiveSpec, MaskedContrastiveSpec

__all__ = ["env_contrastive_loss", "env_contrastive_loss_reference", "available_backends",
           "backend_report", "register_backend", "validate_inputs", "PENALTIES",
           "EnvContrastiveSpec", "masked_contrastive_loss", "masked_contrastive_loss_reference",
           "key_group_penalty", "MaskedContrastiveSpec", "env_contrastive_partials", "env_penalty"]
