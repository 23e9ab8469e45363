"""diffusers-experts: multi-expert diffusion (MEME, blended experts) as native Hugging Face diffusers components."""

__version__ = "0.1.0"

from .models import (
    ExpertMixtureUNet,
    IFormerBlock,
    IUNet2DModel,
    LoRAExpert,
    meme_expert_config,
    meme_high_ratios,
    register_expert_class,
    resolve_expert_class,
)
from .pipelines import MultiExpertPipeline
from .routing import default_expertization_probs, timestep_from_sigma, timestep_from_snr
from .schedulers import BlendedScheduler


__all__ = [
    "BlendedScheduler",
    "ExpertMixtureUNet",
    "IFormerBlock",
    "IUNet2DModel",
    "LoRAExpert",
    "default_expertization_probs",
    "meme_expert_config",
    "meme_high_ratios",
    "MultiExpertPipeline",
    "register_expert_class",
    "resolve_expert_class",
    "timestep_from_sigma",
    "timestep_from_snr",
]
