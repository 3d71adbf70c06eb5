"""Data layer of fastipirm: in-memory data sets, batched GPU/CPU augmentation, an index-keyed
loader and the training views built on them."""
from .augment import CIFAR10_MEAN, CIFAR10_STD, TwoViewAugment, eval_transform
from .datasets import DATASETS, ArrayDataset, load_dataset
from .latent_mixing import GENERATIVE, LatentMixing, LatentPairBatches
from .loader import IndexedLoader, epoch_permutation
from .views import PIPELINES, TwoViewBatches, choose_pipeline

__all__ = ["ArrayDataset", "load_dataset", "DATASETS", "GENERATIVE", "LatentMixing",
           "LatentPairBatches", "TwoViewAugment", "eval_transform",
           "CIFAR10_MEAN", "CIFAR10_STD", "IndexedLoader", "epoch_permutation", "PIPELINES",
           "TwoViewBatches", "choose_pipeline"]
