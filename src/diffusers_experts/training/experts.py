"""Building the experts a training run trains: MEME iU-Nets, plain UNet2DModels, or LoRA adapters on a base."""

from __future__ import annotations

import os

from diffusers import UNet2DModel
from torch import nn

from ..constants import SHARED_CONFIG_KEYS
from ..evaluation.trained_model import UsageError, usage_errors
from ..loading import class_from_model_folder, resolve_model_folder
from ..models import IUNet2DModel, LoRAExpert, meme_expert_config
from .objective import class_embeddings


EXPERT_CLASSES = {"iunet": IUNet2DModel, "unet": UNet2DModel}
EXPERT_TYPES = tuple(EXPERT_CLASSES)
# Small defaults; a `--model_config` JSON file overrides any of them (see examples/configs/).
DEFAULT_MODEL_CONFIGS = {
    "iunet": {
        "block_out_channels": [64, 128, 128],
        "layers_per_block": 1,
        "attention_head_dim": 32,
        "norm_num_groups": 32,
    },
    "unet": {
        "block_out_channels": [64, 128, 128],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": 32,
        "norm_num_groups": 32,
    },
}


def load_model_config(expert_type: str, path: str | None) -> dict:
    """Expert model kwargs: the defaults of `expert_type` (one of `EXPERT_TYPES`), overridden by the JSON file `path`
    (read with the expert class's `load_config`)."""
    config = dict(DEFAULT_MODEL_CONFIGS[expert_type])
    if path is not None:
        if not os.path.isfile(path):
            raise UsageError(f"`--model_config` {path!r} is not a file.")
        try:
            overrides = EXPERT_CLASSES[expert_type].load_config(path)
        except OSError as error:  # diffusers names the file: "... is not a valid JSON file"
            raise UsageError(f"`--model_config`: {error}") from None
        if not isinstance(overrides, dict):
            raise UsageError(f"`--model_config` {path!r} must hold a JSON object of model arguments.")
        given = sorted(set(overrides) & set(SHARED_CONFIG_KEYS))
        if given:
            raise UsageError(
                f"`--model_config` {path!r} sets {given}; these follow from the data (`--resolution`, the number of "
                f"channels, `--num_classes`, `--vae`), remove them."
            )
        config.update(overrides)
    return config


def downsampling_factor(config: dict) -> int:
    """Total spatial downsampling of an expert: the sample size must be a multiple of it."""
    num_stages = len(config["block_out_channels"])
    return 2 ** (num_stages - 1)


def build_experts(
    expert_type: str,
    num_experts: int,
    model_config: dict,
    sample_size: int,
    in_channels: int,
    num_class_embeds: int | None,
) -> list[nn.Module]:
    """`num_experts` fresh experts: MEME iU-Nets with per-expert attention shares (`meme_expert_config`) or plain
    `UNet2DModel`s (the "Multi-Expert" baseline). `num_experts=1` gives the single-model baselines."""
    shared = {
        **model_config,
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_class_embeds": num_class_embeds,
    }
    if expert_type == "iunet":
        return [IUNet2DModel(**meme_expert_config(k, num_experts, **shared)) for k in range(num_experts)]
    return [UNet2DModel(**shared) for _ in range(num_experts)]


def experts_from_args(args, sample_size: int, in_channels: int) -> list[nn.Module]:
    """`--num_experts` fresh experts of `--expert_type` and `--model_config` for samples of `in_channels` x
    `sample_size`^2 (pixels, or VAE latents with `--vae`), with the class embeddings of `--num_classes`."""
    config = load_model_config(args.expert_type, args.model_config)
    factor = downsampling_factor(config)
    if sample_size % factor:
        what = "the VAE latent size" if getattr(args, "vae", None) else "`--resolution`"
        raise UsageError(
            f"{what} {sample_size} must be divisible by {factor}, the total downsampling of experts with "
            f"{len(config['block_out_channels'])} stages (block_out_channels={config['block_out_channels']})."
        )
    return build_experts(
        args.expert_type, args.num_experts, config, sample_size, in_channels, class_embeddings(args.num_classes)
    )


def build_lora_experts(
    base_model_path: str, num_experts: int, rank: int, lora_alpha: float | None = None, target_modules=None
) -> list[nn.Module]:
    """`num_experts` LoRA experts (adapters `expert_0`, ...) sharing one frozen base loaded from `base_model_path`."""
    with usage_errors("--base_model", base_model_path):
        folder = resolve_model_folder(base_model_path)
        base = class_from_model_folder(folder).from_pretrained(folder)
    reference = os.path.abspath(base_model_path) if os.path.isdir(base_model_path) else base_model_path
    return [
        LoRAExpert.from_base(
            base,
            reference,
            adapter_name=f"expert_{k}",
            rank=rank,
            lora_alpha=lora_alpha,
            target_modules=target_modules,
        )
        for k in range(num_experts)
    ]


def trainable_parameters(expert: nn.Module) -> list[nn.Parameter]:
    """The parameters an expert's optimizer and EMA own: a LoRA expert's adapter, or every parameter."""
    if hasattr(expert, "adapter_parameters"):
        return list(expert.adapter_parameters())
    return list(expert.parameters())


def enable_gradient_checkpointing(expert: nn.Module) -> None:
    """Gradient checkpointing on an expert (on the base model of a LoRA expert)."""
    target = getattr(expert, "base_model", expert)
    if not getattr(target, "_supports_gradient_checkpointing", False):
        raise UsageError(f"`--gradient_checkpointing`: {type(target).__name__} does not support it.")
    target.enable_gradient_checkpointing()
