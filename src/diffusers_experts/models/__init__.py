from ..loading import register_expert_class, resolve_expert_class
from .expert_mixture import ExpertMixtureUNet
from .iformer import IFormerBlock
from .iunet_2d import IUNet2DModel, meme_expert_config, meme_high_ratios
from .lora_expert import LoRAExpert


__all__ = [
    "ExpertMixtureUNet",
    "IFormerBlock",
    "IUNet2DModel",
    "LoRAExpert",
    "meme_expert_config",
    "meme_high_ratios",
    "register_expert_class",
    "resolve_expert_class",
]
