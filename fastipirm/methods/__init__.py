"""Training methods: a registry from ``method.name`` to a :class:`~fastipirm.methods.base.Method`.

``METHODS["ipirm"](ctx)`` builds IP-IRM for a run; :func:`build_method` does it by name. A new
method is a module here with a ``Method`` subclass, added to :data:`METHODS`.
"""
from .base import (Method, MethodContext, TrainStep, grouped_projection, project_batch,
                   project_views)
from .clica import CLICA
from .clica_supervised import CLICASupervised
from .dcodr import DCoDR
from .dcodr_norec import DCoDRNoRec
from .ipirm import IPIRM
from .ipirm_mixup import IPIRMMixup
from .mixup import MixupBaseline
from .simclr import SimCLR

METHODS: dict[str, type[Method]] = {m.name: m for m in (SimCLR, IPIRM, CLICA,
                                                          CLICASupervised, DCoDRNoRec, DCoDR,
                                                          IPIRMMixup, MixupBaseline)}


def build_method(name: str, ctx: MethodContext) -> Method:
    """The method registered as ``name``, built for ``ctx``."""
    if name not in METHODS:
        raise ValueError(f"method.name: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name](ctx)


__all__ = ["METHODS", "Method", "MethodContext", "TrainStep", "build_method",
           "grouped_projection", "project_batch", "project_views", "SimCLR", "IPIRM", "CLICA",
           "CLICASupervised", "DCoDRNoRec", "DCoDR", "IPIRMMixup", "MixupBaseline"]
