"""Building the experts a training run trains: MEME iU-Nets, plain UNet2DModels, or LoRA adapters on a base."""

from __future__ import annotations

import json
import os

from torch import nn


EXPERT_TYPES = ("iunet", "unet")
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
DATA_KEYS = ("sample_size", "in_channels", "out_channels", "num_class_embeds")


def load_model_config(expert_type: str, path: str | None) -> dict:
    """Expert model kwargs: the defaults of `expert_type`, overridden by the JSON file `path`."""
    if expert_type not in EXPERT_TYPES:
        raise ValueError(f"`--expert_type` must be one of {list(EXPERT_TYPES)}, got {expert_type!r}.")
    config = dict(DEFAULT_MODEL_CONFIGS[expert_type])
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"`--model_config` {path!r} is not a file.")
        with open(path, encoding="utf-8") as f:
            overrides = json.load(f)
        if not isinstance(overrides, dict):
            raise ValueError(f"`--model_config` {path!r} must hold a JSON object of model arguments.")
        given = sorted(set(overrides) & set(DATA_KEYS))
        if given:
            raise ValueError(
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
    indices=None,
) -> list[nn.Module]:
    """`num_experts` fresh experts: MEME iU-Nets with per-expert attention shares (`meme_expert_config`) or plain
    `UNet2DModel`s (the "Multi-Expert" baseline). `num_experts=1` gives the single-model baselines."""
    from diffusers import UNet2DModel

    from ..models import IUNet2DModel, meme_expert_config

    shared = {
        **model_config,
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_class_embeds": num_class_embeds,
    }
    experts = []
    for k in range(num_experts):
        if expert_type == "iunet":
            experts.append(IUNet2DModel(**meme_expert_config(k, num_experts, **shared)))
        else:
            experts.append(UNet2DModel(**shared))
    return experts


def build_lora_experts(
    base_model_path: str, num_experts: int, rank: int, lora_alpha: float | None = None, target_modules=None
) -> list[nn.Module]:
    """`num_experts` LoRA experts (adapters `expert_0`, ...) sharing one frozen base loaded from `base_model_path`."""
    from ..hub import resolve_model_folder
    from ..models import LoRAExpert
    from ..models.expert_mixture import _class_from_model_folder

    folder = resolve_model_folder(base_model_path)
    base = _class_from_model_folder(folder).from_pretrained(folder)
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
        raise ValueError(f"`--gradient_checkpointing`: {type(target).__name__} does not support it.")
    target.enable_gradient_checkpointing()
