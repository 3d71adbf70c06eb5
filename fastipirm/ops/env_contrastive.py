"""The public op: contrastive loss and IRM penalty for every environment column at once."""
from __future__ import annotations

from typing import Optional

import torch

from .backends import resolve_backend
from .spec import EnvContrastiveSpec
from .torch_backend import env_contrastive_partials_torch, env_penalty_torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# the keyword options of env_contrastive_loss and their defaults (a spec= replaces them all)
_OPTION_DEFAULTS = dict(temperature=None, irm_temperature=None, soft=None, penalty="slot",
                        nonorm=False)


def _compiling() -> bool:
    return bool(getattr(torch, "compiler", None) and torch.compiler.is_compiling())


def _check_tensors(z1, z2, env_weights) -> None:
    for name, z in (("z1", z1), ("z2", z2), ("env_weights", env_weights)):
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(z.shape)}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    batch, dim = z1.shape
    if batch == 0:
        raise ValueError("the batch is empty (B=0): z1 and z2 need at least one row")
    if dim == 0:
        raise ValueError("the feature dimension is 0: z1 and z2 need at least one column")
    for name, z in (("z1", z1), ("z2", z2)):
        if z.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {z.dtype}")
    if z1.dtype != z2.dtype:
        raise ValueError(f"z1 and z2 must have the same dtype, got {z1.dtype} and {z2.dtype}")
    if env_weights.shape[0] != batch:
        raise ValueError(f"env_weights must have one row per sample: shape (B={batch}, M), got "
                         f"{tuple(env_weights.shape)}")
    if env_weights.shape[1] == 0:
        raise ValueError("env_weights has no environment column (M=0)")
    if z1.device != z2.device or env_weights.device != z1.device:
        raise ValueError(f"z1, z2 and env_weights must be on one device, got {z1.device}, "
                         f"{z2.device} and {env_weights.device}")


def _check_weights(env_weights, spec: EnvContrastiveSpec, check_values: bool) -> None:
    if spec.soft and not env_weights.is_floating_point():
        raise ValueError(f"soft env_weights must be floating point, got {env_weights.dtype}")
    if not check_values or _compiling():
        return
    w = env_weights.detach()
    if w.is_floating_point() and not bool(torch.isfinite(w).all()):
        raise ValueError("env_weights contains NaN or infinite values")
    if spec.soft:
        if bool((w < 0).any()) or bool((w > 1).any()):
            raise ValueError(f"soft env_weights must lie in [0, 1] (probabilities); got values in "
                             f"[{w.min().item():.4g}, {w.max().item():.4g}]")
    elif not bool(((w == 0) | (w == 1)).all()):
        bad = w[(w != 0) & (w != 1)][0].item()
        raise ValueError(f"hard env_weights must be 0/1 memberships (soft=False); found {bad!r}. "
                         "Pass soft=True for probabilities.")


def _validated(z1, z2, env_weights, spec: Optional[EnvContrastiveSpec], options: dict,
               check_values: bool) -> EnvContrastiveSpec:
    """The inputs' structure, then the options (the spec), then the weights' values."""
    _check_tensors(z1, z2, env_weights)
    spec = EnvContrastiveSpec.of(spec, **options)
    _check_weights(env_weights, spec, check_values)
    return spec


def validate_inputs(z1, z2, env_weights, *, temperature, irm_temperature, soft, penalty,
                    check_values: bool = True) -> EnvContrastiveSpec:
    """Raise ``ValueError`` naming the problem with the op's inputs; return their options as an
    :class:`~fastipirm.ops.spec.EnvContrastiveSpec` (``nonorm=False``).

    Value checks (weights in [0, 1] or exactly 0/1) read the tensor and so synchronise with the
    device; they are skipped with ``check_values=False`` and while ``torch.compile`` traces.
    """
    options = dict(temperature=temperature, irm_temperature=irm_temperature, soft=soft,
                   penalty=penalty)
    return _validated(z1, z2, env_weights, None, options, check_values)


def env_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, env_weights: torch.Tensor, *,
                         temperature: Optional[float] = None,
                         irm_temperature: Optional[float] = None, soft: Optional[bool] = None,
                         backend: Optional[str] = None, penalty: str = "slot",
                         nonorm: bool = False, check_values: bool = True,
                         spec: Optional[EnvContrastiveSpec] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR NT-Xent and IRM penalty of every environment column, in one call.

    Args:
        z1, z2: ``(B, D)`` L2-normalised projections of the two views of the same B samples
            (float16, bfloat16, float32 or float64, same dtype and device).
        env_weights: ``(B, M)``, one column per environment (M = partitions x environments).
            ``soft=False``: 0/1 memberships (bool, integer or float). ``soft=True``:
            probabilities in [0, 1].
        temperature: tau of the contrastive loss.
        irm_temperature: temperature of the logits inside the penalty (official ``irm_temp``).
        soft: ``False`` for the minimisation step, ``True`` for the maximisation step.
        backend: ``None``/``"auto"`` picks the fastest available one for the device (and falls
            back with one warning); a name (see :func:`available_backends`) insists on it.
        penalty: ``"slot"`` (official per-slot dummy), ``"scalar"`` (IRMv1), ``"split"``
            (even/odd-row unbiased product), ``"scalar_split"`` (DomainBed); see
            :mod:`fastipirm.ops.penalties`.
        nonorm: soft mode only: normalise the anchor-weighted loss by ``2B`` instead of the sum
            of the anchor weights (official ``--nonorm``). Ignored in hard mode.
        check_values: also check the weights' values (one device synchronisation).
        spec: the options ``temperature``, ``irm_temperature``, ``soft``, ``penalty`` and
            ``nonorm`` as one :class:`~fastipirm.ops.spec.EnvContrastiveSpec`, instead of the
            keywords (passing both is a ``TypeError``). Either way the options are validated
            once and the spec is what the backend receives.

    Returns:
        ``(loss, penalty)``, each of shape ``(M,)``; float32 for float16/bfloat16/float32 inputs,
        float64 for float64 inputs.

    Hard mode (``soft=False``): ``loss[m]`` is SimCLR's NT-Xent restricted to the members of
    column m (anchors and negatives only from the members, mean over their ``2b`` anchors), and
    ``penalty[m]`` the official per-slot penalty: the squared norm of the gradient of that
    cross-entropy, on logits divided by ``irm_temperature``, w.r.t. a vector of ones with one
    entry per logit column slot (positive first, then the negatives in ascending order of the
    environment's concatenated order). Not differentiable w.r.t. ``env_weights``.

    Soft mode (``soft=True``): ``loss[m]`` is the official "v2" soft loss: negatives reweighted
    by their sample's probability and renormalised to sum to ``2B-2`` per row, positive weight 1,
    anchor-weighted mean normalised by the sum of anchor weights; ``penalty[m]`` the same
    per-slot penalty of that soft loss. Differentiable w.r.t. z1, z2 and env_weights.

    Deviations from the official code (``docs/deviations.md#empty-environment``): an empty
    environment (or an all-zero soft column) gives loss 0 and penalty 0 with zero gradient, where
    the official code stops with an error (an all-zero soft column would give NaN); a soft row
    whose negatives all have weight 0 has a negative term of 0 instead of NaN.
    """
    options = dict(temperature=temperature, irm_temperature=irm_temperature, soft=soft,
                   penalty=penalty, nonorm=nonorm)
    if spec is not None:   # only the keywords that were given conflict with spec=
        options = {k: v for k, v in options.items() if v != _OPTION_DEFAULTS[k]}
    spec = _validated(z1, z2, env_weights, spec, options, check_values)
    _, impl = resolve_backend(backend, z1.device)
    if not env_weights.is_floating_point():
        env_weights = env_weights.to(torch.float32)
    return impl(z1, z2, env_weights, spec)


# the backends that implement the distributed form (env_contrastive_partials)
PARTIALS_BACKENDS = ("torch",)
# how a multi-process IP-IRM step computes its loss (config op.ddp_form, docs/distributed.md)
DDP_FORMS = ("auto", "local", "replicated")
# "auto" takes the distributed form from this many ranks on even where a fused backend would run
# the replicated loss: its GEMM form on 1/N of the anchors against the fused kernel on all of
# them (python -m bench ddp-loss; 2-core CPU, B 256, P 8: N = 2 1.34x, N = 4 0.99x, N = 8 0.73x
# the C++ kernel's time)
LOCAL_FORM_MIN_WORLD = 4


def choose_ddp_form(requested: str, backend: Optional[str], device: torch.device,
                    world: int) -> str:
    """``"local"`` (:func:`env_contrastive_partials` on this rank's anchors) or ``"replicated"``
    (:func:`env_contrastive_loss` on the whole gathered batch, through ``backend``) for a run on
    ``world`` ranks. ``requested``: ``"local"`` needs ``backend`` None/auto/torch;
    ``"replicated"`` is always possible; ``"auto"``: local when the backend the op would use is
    torch or from :data:`LOCAL_FORM_MIN_WORLD` ranks on (with ``backend`` None or torch), else
    replicated."""
    if requested not in DDP_FORMS:
        raise ValueError(f"ddp_form must be one of {DDP_FORMS}, got {requested!r}")
    local_ok = backend in (None, "auto", *PARTIALS_BACKENDS)
    if requested == "local" and not local_ok:
        raise ValueError(f"ddp_form 'local': the op's distributed form is implemented by "
                         f"{', '.join(PARTIALS_BACKENDS)} only, not backend {backend!r}")
    if requested != "auto":
        return requested
    if not local_ok:
        return "replicated"
    resolved, _ = resolve_backend(backend, device)
    return "local" if resolved in PARTIALS_BACKENDS or world >= LOCAL_FORM_MIN_WORLD \
        else "replicated"


def env_contrastive_partials(z1: torch.Tensor, z2: torch.Tensor, env_weights: torch.Tensor, *,
                             samples: tuple[int, int], temperature: float,
                             irm_temperature: float, penalty: str = "slot",
                             backend: Optional[str] = None, check_values: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The distributed form of :func:`env_contrastive_loss` (hard mode): one rank's partial sums.

    ``z1``, ``z2`` (B, D) and ``env_weights`` (B, M) are those of the *whole* (gathered) batch;
    only the samples ``[start, stop) = samples`` (this rank's share) are anchors, against every
    sample of the batch as negatives. Returns ``(loss_part (M,), slot_grads (G, slots))``:

    * ``loss_part[m]``: the anchors' share of ``loss[m]`` (their terms over the environment's
      whole anchor count), so the sum over disjoint shares is :func:`env_contrastive_loss`'s loss;
    * ``slot_grads``: the anchors' partial sums of the per-slot gradients ``g`` whose squares make
      the penalty (``G`` = M, or 2M for the split penalties). The penalty is *not* linear in
      them: sum them over the shares first (``torch.distributed.nn.functional.all_reduce``), then
      :func:`env_penalty`.

    Differentiable w.r.t. ``z1`` and ``z2`` (closed-form backward over the anchor rows, every
    row of the batch receiving its gradient as a negative); memberships are not differentiated.
    Implemented by the ``torch`` backend (the GEMM form, CPU and CUDA); ``backend`` may be
    ``None``/``"auto"``/``"torch"``, another name is an error.
    """
    if backend not in (None, "auto", *PARTIALS_BACKENDS):
        raise ValueError(f"backend {backend!r}: the distributed form of the op "
                         f"(env_contrastive_partials) is implemented by "
                         f"{', '.join(PARTIALS_BACKENDS)} only")
    spec = _validated(z1, z2, env_weights, None,
                      dict(temperature=temperature, irm_temperature=irm_temperature, soft=False,
                           penalty=penalty), check_values)
    start, stop = (int(v) for v in samples)
    if not 0 <= start < stop <= z1.shape[0]:
        raise ValueError(f"samples must be a non-empty range [start, stop) inside the batch of "
                         f"{z1.shape[0]}, got {tuple(samples)}")
    if not env_weights.is_floating_point():
        env_weights = env_weights.to(torch.float32)
    return env_contrastive_partials_torch(z1, z2, env_weights, spec, (start, stop))


def env_penalty(slot_grads: torch.Tensor, env_weights: torch.Tensor, *,
                penalty: str = "slot") -> torch.Tensor:
    """The penalty (M,) of :func:`env_contrastive_partials`'s slot gradients once they are summed
    over all the shares (differentiable w.r.t. them; 0 for an empty environment)."""
    spec = EnvContrastiveSpec.of(None, temperature=1.0, irm_temperature=1.0, soft=False,
                                 penalty=penalty)
    if not env_weights.is_floating_point():
        env_weights = env_weights.to(torch.float32)
    return env_penalty_torch(slot_grads, env_weights, spec)
