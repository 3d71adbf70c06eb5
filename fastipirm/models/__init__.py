"""Networks of fastipirm: small-stem ResNet encoders and the SimCLR model with its projection
head."""
from .modes import eval_mode, set_batchnorm_mode
from .resnet import ARCHS, ResNet, resnet18, resnet50
from .simclr import SimCLRModel, convert_official_state_dict, load_pretrained

__all__ = ["ARCHS", "ResNet", "resnet18", "resnet50", "SimCLRModel", "convert_official_state_dict",
           "load_pretrained", "eval_mode", "set_batchnorm_mode"]
