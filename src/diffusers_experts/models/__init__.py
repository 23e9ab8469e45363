from ..loading import register_expert_class, resolve_expert_class
from .conversion import mixture_from_wan, mixture_from_wan_pipeline, wan_components
from .expert_adapters import add_expert_adapter, expert_adapter_names, set_expert_adapters
from .expert_calls import ExpertsDisagreeError
from .expert_mixture import ExpertMixtureUNet
from .iformer import IFormerBlock
from .iunet_2d import IUNet2DModel, meme_expert_config, meme_high_ratios
from .lora_expert import LoRAExpert


__all__ = [
    "add_expert_adapter",
    "expert_adapter_names",
    "ExpertMixtureUNet",
    "ExpertsDisagreeError",
    "IFormerBlock",
    "IUNet2DModel",
    "LoRAExpert",
    "meme_expert_config",
    "meme_high_ratios",
    "mixture_from_wan",
    "mixture_from_wan_pipeline",
    "register_expert_class",
    "resolve_expert_class",
    "set_expert_adapters",
    "wan_components",
]
