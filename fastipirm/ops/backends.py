"""Backend registries of the fused ops: which implementations exist, which work here.

:data:`ENV` holds the backends of ``env_contrastive_loss``: a backend is a function
``impl(z1, z2, env_weights, spec) -> (loss, penalty)``, the inputs already validated by the public
op (``env_weights`` floating point), ``spec`` the call's options as one
:class:`~fastipirm.ops.spec.EnvContrastiveSpec`, as
:func:`fastipirm.ops.torch_backend.env_contrastive_loss_torch`. :data:`MASKED` holds those of
``masked_contrastive_loss``: a backend is a kernel set
(:class:`fastipirm.ops.masked_glue.MaskedKernels`) that the op's shared glue drives. Backends
register lazily: a loader is only called when the backend is first asked for, so a machine
without Triton or without the compiled extension still imports the package.

Selection rules (the Liger-Kernel convention):

* ``backend="name"`` (or ``FASTIPIRM_BACKEND=name``): that backend or an error saying why it
  cannot run here;
* ``backend=None`` / ``"auto"``: the first available backend in :data:`AUTO_ORDER` for the
  inputs' device; when a preferred one is unavailable the op falls back and says so once.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..kernels.utils import is_interpreter, triton_available


@dataclass
class Backend:
    name: str
    devices: tuple[str, ...]          # device types whose tensors it accepts
    loader: Callable[[], Callable]    # returns the implementation or raises with the reason
    _impl: Optional[Callable] = None
    _error: Optional[str] = None

    def load(self) -> Optional[Callable]:
        if self._impl is None and self._error is None:
            try:
                self._impl = self.loader()
            except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
                self._error = f"{type(exc).__name__}: {exc}"
        return self._impl

    @property
    def error(self) -> Optional[str]:
        self.load()
        return self._error


def _load_torch():
    from .torch_backend import env_contrastive_loss_torch
    return env_contrastive_loss_torch


def _load_cpu():
    from .cpu_backend import load_cpu_backend
    return load_cpu_backend()


def _load_cuda():
    from .cuda_backend import load_cuda_backend
    return load_cuda_backend()


def _load_triton():
    if not triton_available():
        raise ImportError("the 'triton' package is not installed (pip install triton; it ships "
                          "with the CUDA builds of torch on Linux)")
    if not is_interpreter() and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available (set TRITON_INTERPRET=1 before importing "
                           "fastipirm to run the Triton kernels in the CPU interpreter, for tests)")
    try:
        from .triton_backend import env_contrastive_loss_triton
    except ImportError as exc:
        raise ImportError(f"the Triton kernels (fastipirm.kernels) cannot be imported: "
                          f"{exc}") from exc
    return env_contrastive_loss_triton


class Registry:
    """The backends of one op: ``backends`` (name -> :class:`Backend`) and ``auto_order``
    (device type -> preferred names)."""

    def __init__(self, op: str, backends: dict, auto_order: dict):
        self.op, self.backends, self.auto_order = op, backends, auto_order
        self._warned: set[str] = set()

    def register(self, name: str, devices: tuple[str, ...], loader: Callable[[], Callable],
                 auto_rank: Optional[dict[str, int]] = None) -> None:
        """Add a backend; ``auto_rank`` maps a device type to its place in the automatic
        order."""
        self.backends[name] = Backend(name, devices, loader)
        for device, rank in (auto_rank or {}).items():
            order = [b for b in self.auto_order.get(device, ()) if b != name]
            order.insert(rank, name)
            self.auto_order[device] = tuple(order)

    def available(self, device: Optional[str] = None) -> list[str]:
        """Names of the backends that load on this machine (for ``device``'s type if given: a
        ``torch.device`` or a name such as ``"cuda:0"``)."""
        kind = None if device is None else torch.device(device).type
        return [b.name for b in self.backends.values()
                if (kind is None or kind in b.devices) and b.load() is not None]

    def report(self) -> list[tuple[str, bool, str]]:
        """``(name, available, reason or devices)`` for every known backend."""
        rows = []
        for b in self.backends.values():
            ok = b.load() is not None
            rows.append((b.name, ok, ",".join(b.devices) if ok else (b.error or "")))
        return rows

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=5)

    def resolve(self, backend: Optional[str], device: torch.device) -> tuple[str, Callable]:
        """Pick the implementation for tensors on ``device`` (see the module docstring)."""
        explicit = backend not in (None, "auto")
        if not explicit:
            env = os.environ.get("FASTIPIRM_BACKEND", "").strip()
            if env and env != "auto":
                backend, explicit = env, True
        if explicit:
            if backend not in self.backends:
                raise ValueError(f"unknown backend {backend!r}; known backends: "
                                 f"{sorted(self.backends)}")
            b = self.backends[backend]
            if device.type not in b.devices:
                raise ValueError(f"backend {backend!r} does not run on {device.type} tensors "
                                 f"(it runs on: {', '.join(b.devices)})")
            impl = b.load()
            if impl is None:
                raise RuntimeError(f"backend {backend!r} was requested but is not available "
                                   f"here: {b.error}")
            return backend, impl
        order = self.auto_order.get(device.type, ("torch",))
        for i, name in enumerate(order):
            if name not in self.backends:
                continue
            impl = self.backends[name].load()
            if impl is not None:
                if i > 0:
                    skipped = ", ".join(f"{n} ({self.backends[n].error})" for n in order[:i]
                                        if n in self.backends)
                    self._warn_once(f"{device.type}:{name}",
                                    f"fastipirm: {self.op}: preferred backend(s) unavailable on "
                                    f"{device.type}: {skipped}; falling back to {name!r}")
                return name, impl
        raise RuntimeError(f"no {self.op} backend is available for {device.type} tensors")


ENV = Registry("env_contrastive_loss", {
    "torch": Backend("torch", ("cpu", "cuda"), _load_torch),
    "cpu": Backend("cpu", ("cpu",), _load_cpu),
    # CPU tensors only through the Triton interpreter (tests); never chosen automatically on CPU
    "triton": Backend("triton", ("cuda", "cpu") if is_interpreter() else ("cuda",),
                      _load_triton),
    "cuda": Backend("cuda", ("cuda",), _load_cuda),
}, {
    "cuda": ("triton", "cuda", "torch"),   # triton vs cuda: the kernel benchmark decides
    "cpu": ("cpu", "torch"),   # the C++ kernel: 4-10x the torch backend (python -m bench cpu-ratio)
})
BACKENDS, AUTO_ORDER = ENV.backends, ENV.auto_order


def _masked_loader(name: str) -> Callable[[], Callable]:
    def load():
        from . import masked_backends
        return masked_backends.load(name)
    return load


MASKED = Registry("masked_contrastive_loss", {
    "torch": Backend("torch", ("cpu", "cuda"), _masked_loader("torch")),
    "cpu": Backend("cpu", ("cpu",), _masked_loader("cpu")),
    "triton": Backend("triton", ("cuda", "cpu") if is_interpreter() else ("cuda",),
                      _masked_loader("triton")),
    "cuda": Backend("cuda", ("cuda",), _masked_loader("cuda")),
}, {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")})


def register_backend(name: str, devices: tuple[str, ...], loader: Callable[[], Callable],
                     auto_rank: Optional[dict[str, int]] = None) -> None:
    """Add a backend of ``env_contrastive_loss`` (:meth:`Registry.register`); ``loader()``
    returns ``impl(z1, z2, env_weights, spec)`` or raises with the reason it cannot run here."""
    ENV.register(name, devices, loader, auto_rank)


def available_backends(device: Optional[str] = None) -> list[str]:
    """Names of the ``env_contrastive_loss`` backends that load here (for ``device`` type)."""
    return ENV.available(device)


def backend_report() -> list[tuple[str, bool, str]]:
    """``(name, available, reason or devices)`` for every ``env_contrastive_loss`` backend."""
    return ENV.report()


def resolve_backend(backend: Optional[str], device: torch.device) -> tuple[str, Callable]:
    """The ``env_contrastive_loss`` implementation for tensors on ``device``."""
    return ENV.resolve(backend, device)
