"""Run configuration: a TOML file (stdlib ``tomllib``) into typed, nested dataclasses.

A config has the tables ``[run]``, ``[data]``, ``[model]``, ``[train]``, ``[method]``, ``[op]``,
``[eval]``, and one table per method with knobs of its own: ``[ipirm]`` and ``[partition]``
(IP-IRM's maximisation step), ``[clica]`` (CL-ICA), ``[dcodr]`` (DCoDR). Every key is a
field below with its default, its checks beside it (:func:`key`) and a comment. Unknown tables
or keys and values of the wrong type are ``ValueError``s that name the key
(``train.bach_size: unknown key``); a key that moved names its new place. ``--set
section.key=value`` overrides a key after the file is read (the value is parsed as a TOML value;
a bare word is taken as a string).

The official flags of IP-IRM's ``main.py`` map to keys as ``docs/official-ipirm.md#flags``
tabulates; the defaults are the official STL-10 headline run (``configs/stl.toml`` spells them out),
not the argparse defaults of ``main.py``. The lists of valid names (data sets, pipelines,
architectures, methods, op backends and penalties, AMP modes) come from the modules that own them.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .atomic import atomic_write_text
from .data import DATASETS, PIPELINES
from .data.clica_sources import CLICA_IMAGE_DATA, CLICA_SOURCES
from .data.domain_batches import DOMAIN_METHODS
from .data.synthetic import DISCRETE_FACTORS
from .methods import METHODS
from .models import ARCHS, MLP_ARCHS
from .models.clica_image_encoders import CLICA_IMAGE_ARCHS
from .models.dcodr_encoder import DCODR_ARCHS
from .ops import PENALTIES
from .ops.env_contrastive import DDP_FORMS, PARTIALS_BACKENDS
from .ops.backends import BACKENDS
from .runtime import AMP_MODES

# ---------------------------------------------------------------------------------------------
# checks: a check is called with (key, value) and returns an error message or None


def positive(name: str, value) -> Optional[str]:
    if value is not None and not value > 0:
        kind = "integer" if isinstance(value, int) else "number"
        return f"{name}: must be a positive {kind}, got {value!r}"
    return None


def non_negative(name: str, value) -> Optional[str]:
    if value is not None and not value >= 0:
        kind = "integer" if isinstance(value, int) else "number"
        return f"{name}: must be a non-negative {kind}, got {value!r}"
    return None


def one_of(*groups) -> Callable:
    """The value is a name in one of ``groups`` (tuples or registries, read at check time, so a
    name registered later is accepted)."""
    def check(name: str, value) -> Optional[str]:
        choices = [c for group in groups for c in group]
        if value not in choices:
            return f"{name}: {value!r} is not one of {', '.join(map(str, choices))}"
        return None
    return check


def at_most(bound: float, closed: str = "[") -> Callable:
    def check(name: str, value) -> Optional[str]:
        if value is not None and value > bound:
            return f"{name}: must lie in {closed}0, {bound:g}], got {value!r}"
        return None
    return check


def below(bound: float) -> Callable:
    def check(name: str, value) -> Optional[str]:
        if value is not None and not value < bound:
            return f"{name}: must be below {bound:g}, got {value!r}"
        return None
    return check


def not_implemented(bad, why: str) -> Callable:
    def check(name: str, value) -> Optional[str]:
        if value == bad:
            return f"{name} = {str(bad).lower()}: not implemented ({why})"
        return None
    return check


def key(default, *checks: Callable):
    """A config key: its default and its checks (``field`` metadata)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"checks": checks})
    return field(default=default, metadata={"checks": checks})


# ---------------------------------------------------------------------------------------------
# the tables


@dataclass
class RunConfig:
    name: str = "ipirm_stl"              # run directory: <output_dir>/<name>
    output_dir: str = "runs"
    seed: int = 1234                     # official set_seed(1234)
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    deterministic: bool = False          # torch.use_deterministic_algorithms + cudnn flags
    threads: int = key(0, non_negative)  # CPU threads for torch (0 = torch's default); under
                                         # torchrun shared by the processes of a machine
    pretrain_model: str = ""             # initialise the model from this checkpoint/state_dict
    compare_baseline: bool = False       # also train the SimCLR baseline, print a comparison
    compare_random: bool = False         # also evaluate the untrained network (same seed)
    log_every: int = key(50, positive)   # steps between host syncs (loss logging, NaN check)
    ckpt_every: int = key(25, positive)  # epochs between checkpoints (and always at the end)
    progress: bool = True                # tqdm progress bars
    tensorboard: bool = True             # write TensorBoard events when it is installed
    plot: bool = True                    # PNG of the curves at the end (matplotlib if installed)

    def check(self, cfg: "Config") -> Optional[str]:
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            return f"run.device: {dev!r} is not auto, cpu, cuda or cuda:N"
        if not self.name or "/" in self.name or self.name in (".", ".."):
            return f"run.name: {self.name!r} must be a plain directory name"
        return None


@dataclass
class DataConfig:
    name: str = key("stl10", one_of(DATASETS, CLICA_SOURCES))  # latent_mixing, threedident,
                                         # kitti_masks: CL-ICA's ([clica])
    root: str = "data"
    split: str = "train+unlabeled"       # pretraining (and partition) split
    memory_split: str = "train"          # labelled split: kNN memory and linear-probe training
    test_split: str = "test"             # kNN queries and linear-probe test
    download: bool = False
    crop_size: int = key(32, positive)   # RandomResizedCrop output size (official: 32)
    crop_scale_min: float = key(0.08, positive, at_most(1.0, "("))  # its scale lower bound
    pipeline: str = key("auto", one_of(PIPELINES))  # training views: auto (dali on a GPU when
                                         # installed, else torch) | torch (batched ops) | dali
    # synthetic data only (0 or absent = the generator's default)
    num_samples: int = key(0, non_negative)        # images of the pretraining split
    eval_num_samples: int = key(0, non_negative)   # images of every other split (e.g. test)
    image_size: int = key(0, non_negative)         # image side in pixels
    synthetic_seed: int = key(0, non_negative)     # generator seed
    label_factor: str = key("shape", one_of(DISCRETE_FACTORS))  # factor used as the label
    color_correlation: Optional[float] = key(None, non_negative, at_most(1.0))  # share of images
                                                   # whose color is tied to the shape (spurious)
    eval_color_correlation: Optional[float] = key(None, non_negative, at_most(1.0))  # the same
                                   # for every split but the pretraining one (None: the same value)
    noise: Optional[float] = key(None, non_negative)      # pixel noise std
    num_shapes: int = key(0, non_negative)                # shapes in use (0: the first 5 of 8)
    rotation: Optional[float] = key(None, non_negative, at_most(360.0))  # largest shape rotation
                                                          # in degrees (0: upright; default 360)
    num_colors: int = key(0, non_negative)                # foreground colours in use
    num_backgrounds: int = key(0, non_negative)           # background colours in use
    shading: Optional[float] = key(None, non_negative)    # strongest background shading
    min_images: int = key(0, non_negative)  # CelebA: keep identities with at least this many
                                         # images (0: the reader's default, 2)
    domain_factor: str = ""              # DCoDR: the factor used as the domain (e.g. the
                                         # synthetic data's "background"; "": the data set's own)


@dataclass
class ModelConfig:
    arch: str = key("resnet50", one_of(ARCHS, MLP_ARCHS, CLICA_IMAGE_ARCHS, DCODR_ARCHS))
                                         # clica_*: CL-ICA's encoders (MLP; 3DIdent's ResNets;
                                         # KITTI's conv net); dcodr_resnet50: DCoDR's encoder
    feature_dim: int = key(128, positive)  # official --feature_dim
    width: int = key(64, positive)       # base channel width of the ResNet (official 64)
    hidden_dim: int = key(512, positive)  # projection head hidden width (official 512)
    channels_last: bool = True
    compile: bool = False                # torch.compile the model
    bn_splits: int = key(1, positive)    # BN groups per view in training (2 = official 2 GPUs)
    sync_bn: bool = False                # multi-process runs: SyncBatchNorm over the ranks
                                         # (false: per-rank BN, as DataParallel; GPUs only)

    def check(self, cfg: "Config") -> Optional[str]:
        if cfg.train.batch_size % self.bn_splits:
            return (f"model.bn_splits: {self.bn_splits} does not divide train.batch_size "
                    f"{cfg.train.batch_size}")
        return None


@dataclass
class TrainConfig:
    epochs: int = key(400, positive)
    batch_size: int = key(256, positive)
    lr: float = key(1e-3, positive)      # Adam, coupled L2 weight decay (official)
    weight_decay: float = key(1e-6, non_negative)
    temperature: float = key(0.5, positive)  # tau of the contrastive loss
    amp: str = key("bf16", one_of(AMP_MODES))  # bf16 | fp16 | none (always none on CPU)
    betas: list[float] = key([0.9, 0.999])  # Adam's betas (DCoDR's official: 0.5, 0.999)

    def check(self, cfg: "Config") -> Optional[str]:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            return f"train.betas: two numbers in [0, 1), got {self.betas}"
        return None


@dataclass
class MethodConfig:
    name: str = key("ipirm", one_of(METHODS))  # the training method (fastipirm.methods)


@dataclass
class IpirmConfig:
    penalty_weight: float = key(0.2, non_negative)  # lambda1
    penalty_iters: int = key(0, non_negative)  # lambda1 active from this epoch (>= 200: always)
    irm_temperature: float = key(0.5, positive)  # official --irm_temp
    keep_cont: bool = True               # global NT-Xent term (ipirm_mixup: required, as the
                                         # official crashes without it)
    mixup_alpha: float = key(1.0, positive)  # ipirm_mixup / mixup: Beta(alpha, alpha) (--alpha)
    debiased: bool = False               # DCL's debiased estimator (official --debiased): the
                                         # simclr baseline's loss (IP-IRM ignores it officially)
    tau_plus: float = key(0.1, non_negative, below(1.0))  # official DCL prior (debiased only)
    ours_mode: str = key("w", one_of(("w",)))  # official penalty mode: only "w"
    increasing_weight: bool = key(False, not_implemented(
        True, "the official flag calls a missing function and crashes"))

    def check(self, cfg: "Config") -> Optional[str]:
        if self.debiased and cfg.method.name in ("ipirm", "ipirm_mixup"):
            return ("ipirm.debiased: the official IP-IRM ignores --debiased (only its SimCLR "
                    'baseline uses it); set method.name = "simclr" for the DCL baseline')
        if cfg.method.name == "ipirm_mixup" and not self.keep_cont:
            return ("ipirm.keep_cont: ipirm_mixup needs the global term (the official "
                    "main_mixup.py crashes without --keep_cont)")
        return None


@dataclass
class PartitionConfig:
    env_num: int = key(2, positive)      # K
    maximize_iter: int = key(50, positive)  # partition after every maximize_iter-th epoch
    irm_weight_maxim: float = key(0.5, non_negative)  # lambda2
    random_init: bool = True             # fresh N(0,1) Theta every time (else warm start)
    constrain: bool = True
    constrain_relax: bool = True
    retain_group: bool = True            # keep all partitions (else only the latest)
    retain_group_set: int = key(0, non_negative)  # keep at most this many, FIFO (0: unlimited)
    offline: bool = True                 # search on one feature bank (false: official
                                         # auto_split, fresh features every search epoch)
    nonorm: bool = False
    irm_mode: str = key("v1", one_of(("v1", "v2")))  # search penalty: v1 IRM gradient
                                         # penalty, v2 variance of the environment losses
    lr: float = key(0.5, positive)       # Adam on Theta
    milestones: list[int] = key([5, 35])
    gamma: float = key(0.2, positive)
    batch_size: int = key(3096, positive)  # feature batch of the Theta optimisation
    extract_batch_size: int = key(3096, positive)  # image batch of the feature extraction
    min_epochs: int = key(50, non_negative)  # early stop allowed once epoch > min_epochs ...
    patience: int = key(5, positive)     # ... and this many epochs without improvement
    max_epochs: int = key(60, non_negative)  # stop at this epoch index (official 60: 61 epochs)
    at_last_epoch: bool = False          # also partition after the final epoch (never used)

    mixup_max: bool = False              # ipirm_mixup: the online MixUp search (--mixup_max;
                                         # needs offline = false; lr 0.1, milestones [5, 25] and
                                         # the stop at 25/5/30 are the official fixed values)

    def check(self, cfg: "Config") -> Optional[str]:
        if self.env_num < 2:
            return f"partition.env_num: needs at least 2 environments, got {self.env_num}"
        if self.mixup_max and cfg.method.name != "ipirm_mixup":
            return (f"partition.mixup_max: the MixUp search belongs to method.name = "
                    f"\"ipirm_mixup\", got {cfg.method.name!r}")
        if self.mixup_max and self.offline:
            return ("partition.mixup_max: the online MixUp search needs partition.offline = "
                    "false (the official offline MixUp search, auto_split_offline_mixuup, is "
                    "used by no script and is not built)")
        if any(m < 0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            return (f"partition.milestones: must be non-negative and increasing, got "
                    f"{self.milestones}")
        return None


CLICA_METHODS = ("clica", "clica_supervised")


@dataclass
class ClicaConfig:
    """CL-ICA (``method.name = "clica"`` or its supervised baseline ``"clica_supervised"``) on
    ``data.name = "latent_mixing"`` (the MLP-mixing experiment), ``"threedident"`` or
    ``"kitti_masks"``; the official ``main_mlp.py``, ``main_3dident.py`` and ``main_kitti.py``
    flags map to these keys as ``docs/clica.md#flags`` tabulates."""

    n: int = key(10, positive)           # --n: latent dimensions
    space: str = key("box", one_of(("box", "sphere", "unbounded")))  # --space-type
    box_min: float = 0.0                 # --box-min
    box_max: float = 1.0                 # --box-max
    sphere_r: float = key(1.0, positive)  # --sphere-r
    m_p: float = key(0.0, non_negative)  # --m-p marginal: 0 uniform, 1 Laplace, 2 Normal, else
                                         # generalised normal with this exponent
    m_param: float = key(1.0, positive)  # --m-param: the marginal's scale
    c_p: float = key(2.0, non_negative)  # --c-p conditional: 0 von Mises-Fisher (sphere), 1
                                         # Laplace, 2 Normal, >= 3 generalised normal
    c_param: float = key(0.05, positive)  # --c-param: the conditional's scale (vMF: kappa)
    mixing_layers: int = key(3, positive)  # --n-mixing-layer
    act_fct: str = key("leaky_relu", one_of(("leaky_relu", "relu", "elu", "smooth_leaky_relu",
                                             "softplus")))  # --act-fct of the mixing
    cond_samples: int = key(25000, positive)  # random matrices of the condition-number threshold
    cond_thresh_ratio: float = key(0.0, non_negative, below(1.0))  # the quantile of the pool's
                                         # condition numbers (official 0.0: the minimum)
    p: float = key(2.0, non_negative)    # --p: 0 the dot product on the sphere, else L_p^p
    output_norm: str = key("auto", one_of(("auto", "none", "fixed_sphere", "learnable_sphere",
                                           "box", "fixed_box")))  # encoder output (auto:
                                         # fixed_sphere when p = 0, else none; --sphere-norm,
                                         # --box-norm; box: a learnable box)
    steps_per_epoch: int = key(250, positive)  # --n-log-steps: an epoch is one logging interval
    eval_samples: int = key(4096, positive)    # fresh samples of the R2/MCC at each epoch's end
    num_eval_batches: int = key(10, positive)  # --num-eval-batches of the final scores

    # image data (3DIdent, KITTI Masks; docs/clica.md#image-data)
    latents: str = key("box", one_of(("box", "periodic")))  # 3DIdent's latent space: box (official
                                         # --non-periodic-rotation-and-color) | periodic
                                         # (position in the box, the rest on a sphere)
    latent_dims: list[int] = key([])     # 3DIdent's used latent columns (official
                                         # latent_dimensions_to_use; empty: all)
    normalize_images: bool = True        # 3DIdent: the official per-channel mean/std
    workers: int = key(4, positive)      # 3DIdent: threads decoding a batch's PNG files
    kitti_max_delta_t: int = key(5, positive)  # KITTI Masks: largest frame gap of a pair
    kitti_augment: bool = True           # KITTI Masks: the official training transform

    def check(self, cfg: "Config") -> Optional[str]:
        data, arch = cfg.data.name, cfg.model.arch
        clica_data = data in CLICA_SOURCES
        clica_arch = arch in MLP_ARCHS or arch in CLICA_IMAGE_ARCHS
        method = cfg.method.name
        if method not in CLICA_METHODS:
            if clica_data or clica_arch:
                return (f"method.name: {method!r} trains on images; data.name "
                        f"{data!r} and model.arch {arch!r} are CL-ICA's "
                        f"(method.name = one of {', '.join(CLICA_METHODS)})")
            return None
        if not clica_data:
            return (f"data.name: method {method} trains on one of {', '.join(CLICA_SOURCES)}, "
                    f"got {data!r}")
        wanted = {"latent_mixing": MLP_ARCHS, "threedident": ("clica_resnet18", "clica_resnet50"),
                  "kitti_masks": ("clica_kitti_conv",)}[data]
        if arch not in wanted:
            return (f"model.arch: data.name = {data!r} is encoded by model.arch = one of "
                    f"{', '.join(wanted)}, got {arch!r}")
        if data in CLICA_IMAGE_DATA:
            if self.p not in (1, 2, 3):
                return (f"clica.p: the image experiments train the L1, L2 or L3 InfoNCE (p = 1, "
                        f"2 or 3; the official vMF/cosine choice is not supported), got {self.p}")
            if data == "threedident" and self.c_p not in (1, 2, 3):
                return (f"clica.c_p: 3DIdent's conditional is Laplace (1), Normal (2) or the "
                        f"generalised normal with exponent 3 (3), got {self.c_p}")
            if self.output_norm == "auto":
                return ('clica.output_norm: the image encoders take "none", "box", "fixed_box", '
                        '"fixed_sphere" or "learnable_sphere" explicitly')
        if data == "threedident" and self.latents == "periodic" and self.n <= 3:
            return f"clica.n: the periodic 3DIdent space has 3 position dimensions and more; " \
                   f"got n = {self.n}"
        if cfg.run.compare_baseline or cfg.run.compare_random:
            return ("run.compare_baseline / run.compare_random: the SimCLR baseline and the kNN "
                    "of the untrained network do not apply to CL-ICA; its baseline is "
                    'method.name = "clica_supervised", and summary.json has the raw '
                    "observations' scores")
        if self.box_min >= self.box_max:
            return f"clica.box_min: {self.box_min} is not below clica.box_max {self.box_max}"
        if 0 < self.p < 1:
            return f"clica.p: {self.p} is neither 0 (dot product) nor >= 1 (L_p distance)"
        if self.c_p == 0 and self.space != "sphere":
            return "clica.c_p = 0 (von Mises-Fisher) needs clica.space = \"sphere\""
        if self.m_p == 0 and self.space == "unbounded":
            return "clica.m_p = 0 (uniform) is not defined on clica.space = \"unbounded\""
        return None

    def periodic_dims(self, data_name: str) -> int:
        """Code dimensions on the sphere of 3DIdent's periodic parametrisation (all but the 3
        position dimensions), else 0."""
        return self.n - 3 if data_name == "threedident" and self.latents == "periodic" else 0

    @property
    def encoder_norm(self) -> str:
        """The encoder's output normalisation (``auto``: as the official, the fixed unit sphere
        for the dot-product model, else none)."""
        if self.output_norm != "auto":
            return self.output_norm
        return "fixed_sphere" if self.p == 0 else "none"


@dataclass
class DcodrConfig:
    """DCoDR and DCoDR-norec (``method.name`` ``"dcodr"``, ``"dcodr_norec"``); the official
    flags map to these keys as ``docs/dcodr.md#flags`` tabulates."""

    domains_per_batch: int = key(4, positive)    # --num-b-cls
    samples_per_domain: int = key(32, positive)  # --num-b-cls-samp
    domain_negatives: bool = True        # --class-negs: negatives only from the anchor's domain
    positives: bool = True               # --num-pos 1 (false: the no-positives ablation)
    lr_step_epochs: int = key(30, positive)  # StepLR every this many epochs (stepped per batch)
    lr_gamma: float = key(0.33, positive)    # its factor
    reconstruction_weight: float = key(0.3, non_negative)  # --reconstruction-decay (dcodr)
    generator_lr: float = key(3e-4, positive)  # the generator's Adam lr (dcodr)
    embedding_lr: float = key(3e-3, positive)  # the domain embeddings' lr (dcodr)
    embedding_dim: int = key(256, positive)    # the domain embedding (dcodr)
    generator_width: int = key(256, positive)  # the generator's channels (official 256)
    vgg_path: str = ""                   # torchvision's vgg16-397923af.pth (dcodr)
    init: str = key("moco", one_of(("moco", "random")))  # the dcodr_resnet50 encoder's start
    moco_path: str = ""                  # moco_v2_800ep_pretrain.pth.tar (init = "moco")
    content_dim: int = key(128, positive)  # the code (dcodr_resnet50)
    fc_head: bool = False                # --use-fc-head: 3 x Linear(128, 128) (SmallNorb)

    def check(self, cfg: "Config") -> Optional[str]:
        if cfg.method.name not in DOMAIN_METHODS:
            if cfg.model.arch in DCODR_ARCHS:
                return (f"model.arch: {cfg.model.arch!r} is DCoDR's encoder (method.name = "
                        f"one of {', '.join(DOMAIN_METHODS)})")
            return None
        if cfg.data.name in CLICA_SOURCES:
            return f"data.name: {cfg.data.name!r} is CL-ICA's; DCoDR trains on image data sets " \
                   f"with domains"
        if self.samples_per_domain < 2 and self.domain_negatives:
            return ("dcodr.samples_per_domain: same-domain negatives need at least 2 anchors of "
                    "a domain per batch")
        if cfg.method.name == "dcodr" and not self.vgg_path:
            return ('dcodr.vgg_path: method "dcodr" needs the VGG16 weights of its perceptual '
                    "loss (torchvision's vgg16-397923af.pth from "
                    "https://download.pytorch.org/models/vgg16-397923af.pth)")
        if cfg.model.arch == "dcodr_resnet50" and self.init == "moco" and not self.moco_path:
            return ('dcodr.moco_path: init = "moco" needs the MoCo v2 checkpoint '
                    "(moco_v2_800ep_pretrain.pth.tar from https://dl.fbaipublicfiles.com/moco/"
                    'moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar), or set '
                    'dcodr.init = "random"')
        return None


@dataclass
class OpConfig:
    backend: str = key("auto", one_of(("auto",), BACKENDS))  # the fused op's backend
    penalty: str = key("slot", one_of(PENALTIES))  # IRM penalty variant: slot (official) | ...
    # several processes, IP-IRM's loss: "local" (each rank's anchors against the gathered batch,
    # per-slot sums all-reduced; the torch backend's distributed form), "replicated" (the whole
    # global loss on every rank, through op.backend), "auto" (docs/distributed.md#gradients)
    ddp_form: str = key("auto", one_of(DDP_FORMS))

    def check(self, cfg: "Config") -> Optional[str]:
        if self.ddp_form == "local" and self.backend not in ("auto", *PARTIALS_BACKENDS):
            return (f"op.ddp_form = \"local\": the op's distributed form is implemented by the "
                    f"{', '.join(PARTIALS_BACKENDS)} backend only; op.backend is "
                    f"{self.backend!r} (use \"auto\" or \"replicated\")")
        return None

    @property
    def backend_or_none(self) -> Optional[str]:
        """``backend`` as the op takes it (None: choose automatically)."""
        return None if self.backend == "auto" else self.backend


@dataclass
class EvalConfig:
    knn_every: int = key(25, non_negative)  # epochs between kNN evaluations (0 = never)
    k: int = key(200, positive)          # official --k (clamped to the memory size)
    knn_temperature: Optional[float] = key(None, positive)  # None: train.temperature (official)
    batch_size: int = key(256, positive)  # feature-extraction batch
    linear_at_end: bool = False          # run the linear probe after training
    linear_epochs: int = key(100, non_negative)
    linear_batch_size: int = key(512, positive)
    linear_lr: float = key(1e-3, positive)
    linear_weight_decay: float = key(1e-6, non_negative)
    fixed_bn: bool = False               # encoder BN in eval mode (official: train mode)
    linear_augment: bool = True          # train the probe on SSL-augmented views (official)
    factors: bool = True                 # synthetic data: kNN + linear on every discrete factor
    factor_probes: bool = False          # DCoDR's evaluation: an MLP probe per factor on the
                                         # frozen, normalised codes (invariance to the domain,
                                         # informativeness of the rest; summary "probes")
    probe_epochs: int = key(100, positive)   # the probes' most epochs (official 100)
    probe_patience: int = key(7, positive)   # their early stopping (official 7)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    ipirm: IpirmConfig = field(default_factory=IpirmConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    clica: ClicaConfig = field(default_factory=ClicaConfig)
    dcodr: DcodrConfig = field(default_factory=DcodrConfig)
    op: OpConfig = field(default_factory=OpConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def copy(self) -> "Config":
        return copy.deepcopy(self)

    @property
    def knn_temperature(self) -> float:
        """The kNN weight temperature: ``eval.knn_temperature``, else ``train.temperature``
        (the official monitor uses the training temperature)."""
        t = self.eval.knn_temperature
        return self.train.temperature if t is None else t


SECTIONS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}

# keys that moved, and where to: an old config file gets an error naming the new place; an old
# checkpoint's config is upgraded (upgrade_v1_dict)
MOVED = {("train", k): ("ipirm", k) for k in (
    "penalty_weight", "penalty_iters", "irm_temperature", "keep_cont", "debiased", "tau_plus",
    "ours_mode", "increasing_weight")}
MOVED.update({("train", "penalty"): ("op", "penalty"), ("train", "backend"): ("op", "backend")})
BASELINE_MOVED = 'train.baseline: removed; choose the method with [method] name = "simclr" ' \
                 '(or "ipirm")'


# ---------------------------------------------------------------------------------------------
# reading and checking


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(name: str, value: Any, tp) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(name, value, args[0])
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{name}: expected a list of {_type_name(item)}, got "
                             f"{type(value).__name__} {value!r}")
        return [_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {type(value).__name__} "
                             f"{value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{name}: unsupported annotation {tp!r}")  # a bug in this module


def from_dict(raw: dict, base: Optional[Config] = None) -> Config:
    """Build a validated :class:`Config` from nested ``{section: {key: value}}`` data."""
    cfg = (base or Config()).copy()
    if not isinstance(raw, dict):
        raise ValueError(f"config: expected a table, got {type(raw).__name__}")
    for section, table in raw.items():
        if section not in SECTIONS:
            raise ValueError(f"{section}: unknown section (expected one of "
                             f"{', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ValueError(f"{section}: expected a table [{section}], got "
                             f"{type(table).__name__} {table!r}")
        hints = typing.get_type_hints(SECTIONS[section])
        target = getattr(cfg, section)
        for name, value in table.items():
            if name not in hints:
                if (section, name) == ("train", "baseline"):
                    raise ValueError(BASELINE_MOVED)
                if (section, name) in MOVED:
                    new = ".".join(MOVED[section, name])
                    raise ValueError(f"{section}.{name}: moved to {new} (the [{new.split('.')[0]}] "
                                     "table)")
                raise ValueError(f"{section}.{name}: unknown key")
            setattr(target, name, _coerce(f"{section}.{name}", value, hints[name]))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Type, range and choice checks of every key, then the cross-key checks of each table;
    every message starts with the offending key."""
    for section, cls in SECTIONS.items():
        table = getattr(cfg, section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name = f"{section}.{f.name}"
            value = _coerce(name, getattr(table, f.name), hints[f.name])
            for check in f.metadata.get("checks", ()):
                problem = check(name, value)
                if problem:
                    raise ValueError(problem)
        problem = table.check(cfg) if hasattr(table, "check") else None
        if problem:
            raise ValueError(problem)


def upgrade_v1_dict(raw: dict) -> dict:
    """A config dict written before ``[method]``, ``[ipirm]`` and ``[op]`` existed (first
    checkpoint format), in the current layout."""
    raw = copy.deepcopy(raw)
    train = raw.get("train", {})
    baseline = train.pop("baseline", False)
    raw.setdefault("method", {})["name"] = "simclr" if baseline else "ipirm"
    for (old_section, name), (new_section, new_name) in MOVED.items():
        if name in raw.get(old_section, {}):
            raw.setdefault(new_section, {})[new_name] = raw[old_section].pop(name)
    return raw


def parse_override(item: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` -> ``(section, key, value)``; the value is parsed as TOML."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected section.key=value")
    path, text = item.split("=", 1)
    path = path.strip()
    if path.count(".") != 1:
        raise ValueError(f"--set {item!r}: the key must be section.key, got {path!r}")
    section, name = path.split(".")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: a string (data.name=cifar10)
    return section, name, value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    raw: dict = {}
    for item in overrides or []:
        section, name, value = parse_override(item)
        raw.setdefault(section, {})[name] = value
    return from_dict(raw, base=cfg) if raw else cfg


def load_config(path, overrides: Optional[list[str]] = None) -> Config:
    """Read a TOML config file, apply ``section.key=value`` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"config file {str(path)!r} does not exist") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None
    try:
        cfg = from_dict(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return apply_overrides(cfg, overrides or [])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (keys whose value is None, i.e. "derived", are omitted)."""
    lines = ["# resolved fastipirm config (every key, defaults included)"]
    for section, table in cfg.to_dict().items():
        lines.append(f"\n[{section}]")
        for name, value in table.items():
            if value is not None:
                lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_config(cfg: Config, path) -> None:
    atomic_write_text(path, to_toml(cfg))
