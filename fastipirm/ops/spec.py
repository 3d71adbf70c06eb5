"""The options of one ``env_contrastive_loss`` call, as one validated, immutable object.

:class:`EnvContrastiveSpec` is built once, where a call enters the ops layer (the public op, or a
backend function called directly), and travels unchanged through the backend, the custom-op
wrapper, the fused glue and the kernel sets. Only the ``torch.library`` custom-op boundary, whose
schema takes plain scalars, flattens it (:meth:`EnvContrastiveSpec.op_args`) and rebuilds it on
the other side (:meth:`EnvContrastiveSpec.from_op_args`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .penalties import PENALTIES, SCALAR_PENALTIES, SPLIT_PENALTIES


def _check_temperature(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class EnvContrastiveSpec:
    """What to compute (the keyword options of :func:`fastipirm.ops.env_contrastive_loss`).

    Validated on construction (``ValueError`` naming the bad option); the temperatures are stored
    as ``float`` and ``nonorm`` as ``bool``. ``nonorm`` is kept as given: it only acts in soft
    mode (:attr:`normalise_by_rows`).
    """

    temperature: float
    irm_temperature: float
    soft: bool
    penalty: str = "slot"
    nonorm: bool = False

    def __post_init__(self):
        object.__setattr__(self, "temperature", _check_temperature("temperature",
                                                                    self.temperature))
        object.__setattr__(self, "irm_temperature", _check_temperature("irm_temperature",
                                                                        self.irm_temperature))
        if not isinstance(self.soft, bool):
            raise ValueError(f"soft must be True or False, got {self.soft!r}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"unknown penalty {self.penalty!r}; expected one of {PENALTIES}")
        object.__setattr__(self, "nonorm", bool(self.nonorm))

    @classmethod
    def of(cls, spec: Optional[EnvContrastiveSpec] = None, **options) -> EnvContrastiveSpec:
        """``spec`` itself, or a spec built from the keyword ``options`` (not both)."""
        if spec is None:
            return cls(**options)
        if not isinstance(spec, cls):
            raise TypeError(f"spec must be an {cls.__name__}, got {type(spec).__name__}")
        if options:
            raise TypeError(f"pass either spec= or the options {sorted(options)}, not both")
        return spec

    # ---- derived flags
    @property
    def scalar(self) -> bool:
        """A scalar dummy (one slot): the ``"scalar"`` and ``"scalar_split"`` penalties."""
        return self.penalty in SCALAR_PENALTIES

    @property
    def split(self) -> bool:
        """Even/odd row groups: the ``"split"`` and ``"scalar_split"`` penalties."""
        return self.penalty in SPLIT_PENALTIES

    @property
    def normalise_by_rows(self) -> bool:
        """The loss is normalised by ``2B`` instead of the sum of the anchor weights."""
        return self.soft and self.nonorm

    @property
    def two_temperatures(self) -> bool:
        """The penalty's logits use another temperature than the loss's."""
        return self.temperature != self.irm_temperature

    def groups(self, envs: int) -> int:
        """Row groups of the penalty for ``envs`` environment columns (two per column if split)."""
        return 2 * envs if self.split else envs

    # ---- the custom-op boundary (a torch.library schema takes scalars, not objects)
    def op_args(self) -> tuple[bool, bool, str, float, float]:
        """``(soft, nonorm, penalty, temperature, irm_temperature)``: the custom ops' order."""
        return self.soft, self.nonorm, self.penalty, self.temperature, self.irm_temperature

    @classmethod
    def from_op_args(cls, soft: bool, nonorm: bool, penalty: str, temperature: float,
                     irm_temperature: float) -> EnvContrastiveSpec:
        """The inverse of :meth:`op_args`."""
        return cls(temperature, irm_temperature, soft, penalty, nonorm)


SIMILARITIES = ("dot", "sqeuclidean", "l1", "lp")
REDUCTIONS = ("mean", "sum", "none")
#: integer codes of the similarities at the custom-op and kernel boundary
SIMILARITY_CODES = {name: i for i, name in enumerate(SIMILARITIES)}


@dataclass(frozen=True)
class MaskedContrastiveSpec:
    """The scalar options of one :func:`fastipirm.ops.masked_contrastive_loss` call.

    ``similarity`` with its exponent: ``"dot"`` (``q . k``), ``"sqeuclidean"`` (``-|q - k|^2``),
    ``"l1"`` (``-|q - k|_1``) or ``"lp"`` (``-sum_d |q_d - k_d|^p``, ``p >= 1``); ``p`` is set to
    2 and 1 for the two named distances and is None for the dot product. ``temperature`` divides
    the similarity. ``include_self``: a query's own key column is one of its negatives.
    ``reduction``: ``"mean"`` or ``"sum"`` over the queries, ``"none"`` for the per-query losses.
    ``key_penalty``: also return the per-key-column gradients of the loss w.r.t. a dummy scale of
    each key column (the IRM penalty's ingredient).
    """

    similarity: str = "dot"
    p: Optional[float] = None
    temperature: float = 1.0
    include_self: bool = False
    reduction: str = "mean"
    key_penalty: bool = False

    def __post_init__(self):
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {self.similarity!r}; expected one of "
                             f"{SIMILARITIES}")
        p = self.p
        if self.similarity == "lp":
            if p is None or isinstance(p, bool) or not isinstance(p, (int, float)) \
                    or not math.isfinite(p) or p < 1:
                raise ValueError(f"similarity 'lp' needs a finite p >= 1, got p={p!r}")
            p = float(p)
        elif p is not None:
            raise ValueError(f"p is only used with similarity 'lp', got p={p!r} with "
                             f"{self.similarity!r}")
        else:
            p = {"sqeuclidean": 2.0, "l1": 1.0}.get(self.similarity)
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "temperature", _check_temperature("temperature",
                                                                    self.temperature))
        for name in ("include_self", "key_penalty"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduction!r}; expected one of "
                             f"{REDUCTIONS}")

    @property
    def code(self) -> int:
        """The similarity's integer code (:data:`SIMILARITY_CODES`)."""
        return SIMILARITY_CODES[self.similarity]

    @property
    def exponent(self) -> float:
        """``p`` as the kernels take it (0 for the dot product)."""
        return 0.0 if self.p is None else self.p
