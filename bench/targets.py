"""Every performance target of fastipirm, with what it means: the one place they are written.

A target bounds one *figure* of a benchmark record (``bench.baselines.figures``: keys such as
``step/resnet50/P=8/fastipirm_over_official``) from below (``min``) or above (``max``). The
benchmarks' tables, ``python -m bench gpu-check``, ``--compare`` / ``--accept`` and the
regression tests (``tests/test_perf_regression.py``) all read them from here. A GPU baseline file
(``bench/baselines/<gpu>.json``) receives the targets when a run is accepted and may restate one
with another bound for its GPU (an edit by hand, which later acceptances keep).

``requires`` names record settings a target was set for (the official sizes): a run that states
another value for one of them (e.g. a smaller ``num_samples`` in a quick maximisation) is not
held to that target.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Target:
    """``bound``: ``{"min": x}`` or ``{"max": x}``; ``machine``: where it applies (``"gpu"``: one
    NVIDIA H200, ``"cpu"``: any CPU, the CI gate); ``meaning``: what it asks, in words."""

    bound: dict
    machine: str
    meaning: str
    requires: dict = field(default_factory=dict)


FUSED = ("triton", "cuda")                       # the fused GPU backends the kernel targets bind
KERNEL_SHAPE = "kernels/bf16/D=128/2B=8192/M=16"
OFFICIAL_STEP = {"batch": 256, "width": 64, "crop": 32}
OFFICIAL_MAXIMIZE = {"num_samples": 105_000, "arch": "resnet50", "width": 64,
                     "feature_batch": 3096}
CPU_RATIO = {"shape": {"batch": 512, "dim": 128, "envs": 16}, "threads": 1, "min": 2.0,
             "what": "median time of the 'torch' backend over the 'cpu' (C++) backend, forward "
                     "+ backward, hard and soft mode, measured interleaved in one process with "
                     "one thread (per-core efficiency, which a busy CI machine distorts least)"}


MASKED_CLICA = {"case": "clica-l1/B=4096/n=10", "dtype": "fp32", "backend": "cpu",
                "memory_max": 1 / 20, "time_max": 0.5}


def _masked_targets() -> dict[str, Target]:
    """CL-ICA L1 on the CPU (``python -m bench masked --device cpu``): the C++ ``cpu`` kernel
    set of ``masked_contrastive_loss`` against the official construction. The figures exist only
    when the ``cpu`` backend is available (and its loss equals the official one), so the targets
    bind only then."""
    t = MASKED_CLICA
    key = f"masked/{t['case']}/{t['dtype']}/ours-{t['backend']}"
    what = ("CL-ICA LpSimCLRLoss with the L1 distance, B = 4096, n = 10, fp32, forward + "
            "backward on the CPU, masked_contrastive_loss with the C++ 'cpu' backend against "
            "the official construction (the materialised B x B x n difference tensor)")
    return {
        f"{key}/memory_over_official": Target(
            {"max": t["memory_max"]}, "cpu",
            f"{what}: peak memory at most 1/20 of the official's (peak resident set above the "
            "inputs, one fresh process per row)", {"device": "cpu"}),
        f"{key}/time_over_official": Target(
            {"max": t["time_max"]}, "cpu",
            f"{what}: median time at most 1/2 of the official's", {"device": "cpu"}),
    }


def _kernel_targets() -> dict[str, Target]:
    out = {}
    for mode in ("hard", "soft"):
        for impl in FUSED:
            key = f"{KERNEL_SHAPE}/{mode}/{impl}"
            out[f"{key}/x_reference"] = Target(
                {"min": 20}, "gpu",
                f"{impl}, {mode} mode, forward + backward at 2B = 8192, D = 128, M = 16 in bf16: "
                "at least 20x faster than the literal official-style reference (a loop over "
                "environments, boolean row selection, a double backward per penalty)")
            out[f"{key}/x_compile"] = Target(
                {"min": 4}, "gpu",
                f"{impl}, {mode} mode, same shape: at least 4x faster than torch.compile of the "
                "'torch' backend (what a user gets without the fused kernels)")
            out[f"{key}/memory_over_compile"] = Target(
                {"max": 0.05}, "gpu",
                f"{impl}, {mode} mode, same shape: peak memory above the inputs at most 1/20 of "
                "torch.compile's (no (2B)^2 buffer: memory linear in the batch)")
    return out


def _cpu_ratio_targets() -> dict[str, Target]:
    s = CPU_RATIO["shape"]
    return {f"cpu_ratio/B={s['batch']}/D={s['dim']}/M={s['envs']}/threads={CPU_RATIO['threads']}/"
            f"{mode}/torch_over_cpu": Target({"min": CPU_RATIO["min"]}, "cpu",
                                            f"{mode} mode: {CPU_RATIO['what']}")
            for mode in ("hard", "soft")}


TARGETS: dict[str, Target] = {
    **_kernel_targets(),
    "loader/32px/dali/vs_step": Target(
        {"min": 2}, "gpu",
        "the DALI pipeline makes two-view 32 px samples at least twice as fast as a ResNet-50 "
        "IP-IRM step consumes them: the data never limits training",
        {"arch": "resnet50", "width": 64, "batch": 256}),
    "step/resnet50/P=8/fastipirm_over_official": Target(
        {"min": 5}, "gpu",
        "fastipirm's training step with its data pipeline, ResNet-50, batch 256, 32 px, 8 "
        "retained partitions: at least 5x the images/s of the official-style step (fp32, one "
        "graph and double backward per environment) fed by the per-image PIL pipeline",
        OFFICIAL_STEP),
    "step/resnet50/P=8/ipirm_over_simclr_time": Target(
        {"max": 1.15}, "gpu",
        "an IP-IRM step with 8 retained partitions takes at most 15% longer than a SimCLR step "
        "of the same model (model step only): the penalty is nearly free", OFFICIAL_STEP),
    "maximize/fastipirm_seconds": Target(
        {"max": 10}, "gpu",
        "one whole partition maximisation over N = 105,000 images (STL-10 train + unlabeled), "
        "ResNet-50: feature extraction plus 61 epochs of Theta optimisation in at most 10 s",
        OFFICIAL_MAXIMIZE),
    "estimate/400_epoch_hours": Target(
        {"max": 1.5}, "gpu",
        "the official 400-epoch STL-10 ResNet-50 IP-IRM run, estimated from the measured step "
        "and maximisation rates (bench.suite.FORMULA): at most 1.5 hours on one H200"),
    **_cpu_ratio_targets(),
    **_masked_targets(),
}


def bounds(machine: str = "gpu") -> dict[str, dict]:
    """``{figure key: {"min"/"max": x}}`` of the targets of ``machine`` (``"gpu"`` or ``"cpu"``)."""
    return {key: dict(t.bound) for key, t in TARGETS.items() if t.machine == machine}


def _settings(key: str, record: dict) -> dict:
    """The settings of the record (or, in an ``all`` record, of the part) that ``key`` is from."""
    if record.get("benchmark") == "all":
        record = record.get("parts", {}).get(key.split("/")[0]) or {}
    return record.get("settings") or record.get("args") or {}


def applies(key: str, record: dict) -> bool:
    """Whether ``record`` is held to the target ``key``: no setting it states contradicts the
    target's ``requires`` (True for keys that are not in :data:`TARGETS`)."""
    target = TARGETS.get(key)
    if target is None:
        return True
    settings = _settings(key, record)
    return all(settings.get(name, want) == want for name, want in target.requires.items())


def describe(key: str) -> str:
    """``key: >= x (meaning)`` for a table or an error message."""
    t = TARGETS[key]
    (kind, value), = t.bound.items()
    return f"{key}: {'>=' if kind == 'min' else '<='} {value:g} ({t.meaning})"


def check(record: dict) -> list[tuple[str, float, bool]]:
    """``(key, value, met)`` for every target that ``record`` measures and is held to."""
    from .baselines import figures

    current = figures(record)
    out = []
    for key, t in TARGETS.items():
        if key in current and applies(key, record):
            value = current[key]["value"]
            (kind, bound), = t.bound.items()
            out.append((key, value, value >= bound if kind == "min" else value <= bound))
    return out


def report(record: dict) -> list[str]:
    """Table lines: each target the record measures, its value, its bound and met / MISSED."""
    lines = []
    for key, value, met in check(record):
        (kind, bound), = TARGETS[key].bound.items()
        lines.append(f"target {'met   ' if met else 'MISSED'} {key} = {value:.4g} "
                     f"({'>=' if kind == 'min' else '<='} {bound:g}, {TARGETS[key].machine})")
    return lines
