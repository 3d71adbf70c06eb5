"""Networks of fastipirm: small-stem ResNet encoders and the SimCLR model with its projection
head, CL-ICA's MLP encoder; the encoder under torchvision's names (:mod:`.export`). Reading and
writing model files is :mod:`fastipirm.model_files`."""
from .export import (from_torchvision, infer_model_keys, to_torchvision, torchvision_arch,
                     torchvision_keys)
from .mlp_encoder import MLP_ARCHS, MLPEncoder
from .modes import eval_mode, set_batchnorm_mode
from .resnet import ARCHS, ResNet, resnet18, resnet50
from .simclr import (SimCLRModel, convert_official_state_dict, load_pretrained,
                     official_state_dict)

__all__ = ["ARCHS", "MLP_ARCHS", "MLPEncoder", "ResNet", "resnet18", "resnet50", "SimCLRModel",
           "convert_official_state_dict",
           "load_pretrained", "official_state_dict", "eval_mode", "set_batchnorm_mode",
           "torchvision_keys", "to_torchvision", "from_torchvision", "torchvision_arch",
           "infer_model_keys"]
