"""Building blocks shared by the training scripts in `examples/` (data, experts, objective, EMA, checkpoints,
previews, export). One concept per module; the scripts themselves hold the training loops."""

from .checkpointing import GeneratorState, latest_checkpoint, list_checkpoints, save_checkpoint
from .data import (
    BatchStream,
    builtin_mnist,
    check_label_column,
    load_image_dataset,
    make_image_transform,
    resolve_image_column,
)
from .ema import ExpertEMA
from .experts import build_experts, enable_gradient_checkpointing, trainable_parameters
from .export import export_pipeline, save_expert_run
from .latents import LatentCache, encode_latents, load_vae
from .objective import PREDICTION_TYPES, apply_class_dropout, prediction_target
from .preview import sample_grid, save_image_grid


__all__ = [
    "BatchStream",
    "ExpertEMA",
    "GeneratorState",
    "LatentCache",
    "PREDICTION_TYPES",
    "apply_class_dropout",
    "build_experts",
    "builtin_mnist",
    "check_label_column",
    "enable_gradient_checkpointing",
    "encode_latents",
    "export_pipeline",
    "latest_checkpoint",
    "list_checkpoints",
    "load_image_dataset",
    "load_vae",
    "make_image_transform",
    "prediction_target",
    "resolve_image_column",
    "sample_grid",
    "save_checkpoint",
    "save_expert_run",
    "save_image_grid",
    "trainable_parameters",
]
