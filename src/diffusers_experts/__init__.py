"""diffusers-experts: multi-expert diffusion (MEME, blended experts) as native Hugging Face diffusers components."""

__version__ = "0.1.0"

from .hub import push_experts_to_hub, push_mixture_to_hub  # also registers the models' `push_to_hub` pusher
from .loading import load_expert
from .model_card import save_model_cards
from .models import (
    ExpertMixtureUNet,
    ExpertsDisagreeError,
    IFormerBlock,
    IUNet2DModel,
    LoRAExpert,
    add_expert_adapter,
    expert_adapter_names,
    meme_expert_config,
    meme_high_ratios,
    mixture_from_wan,
    mixture_from_wan_pipeline,
    register_expert_class,
    resolve_expert_class,
    wan_components,
)
from .pipelines import MultiExpertPipeline
from .routing import (
    boundary_from_denoising_end,
    default_expertization_probs,
    timestep_from_noise_level,
    timestep_from_sigma,
    timestep_from_snr,
)
from .schedulers import BlendedScheduler
from .variant_lookup import install_variant_lookup


install_variant_lookup()  # DiffusionPipeline.from_pretrained(..., variant=...) sees the experts' variant weights


__all__ = [
    "add_expert_adapter",
    "BlendedScheduler",
    "ExpertMixtureUNet",
    "ExpertsDisagreeError",
    "IFormerBlock",
    "IUNet2DModel",
    "LoRAExpert",
    "boundary_from_denoising_end",
    "default_expertization_probs",
    "expert_adapter_names",
    "load_expert",
    "meme_expert_config",
    "meme_high_ratios",
    "mixture_from_wan",
    "mixture_from_wan_pipeline",
    "MultiExpertPipeline",
    "push_experts_to_hub",
    "push_mixture_to_hub",
    "register_expert_class",
    "resolve_expert_class",
    "save_model_cards",
    "timestep_from_noise_level",
    "timestep_from_sigma",
    "timestep_from_snr",
    "wan_components",
]
