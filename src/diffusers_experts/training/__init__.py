"""Building blocks shared by the training scripts in `examples/` (data, experts, objective, EMA, checkpoints,
previews, export). One concept per module; the scripts themselves hold the training loops."""

from .accelerator import make_accelerator, prepare_output_dir
from .checkpointing import GeneratorState, latest_checkpoint, list_checkpoints, resume, save_checkpoint
from .data import (
    BatchStream,
    build_training_dataset,
    builtin_mnist,
    check_label_column,
    collate,
    load_image_dataset,
    make_image_transform,
    resolve_image_column,
)
from .ema import ExpertEMA
from .experts import build_experts, build_lora_experts, enable_gradient_checkpointing, trainable_parameters
from .export import export_pipeline, read_expert_runs, save_expert_run
from .latents import LatentCache, encode_latents, load_vae
from .objective import PREDICTION_TYPES, apply_class_dropout, prediction_target
from .preview import sample_grid, save_image_grid, save_preview


__all__ = [
    "BatchStream",
    "ExpertEMA",
    "GeneratorState",
    "LatentCache",
    "PREDICTION_TYPES",
    "apply_class_dropout",
    "build_experts",
    "build_lora_experts",
    "build_training_dataset",
    "builtin_mnist",
    "check_label_column",
    "collate",
    "enable_gradient_checkpointing",
    "encode_latents",
    "export_pipeline",
    "latest_checkpoint",
    "list_checkpoints",
    "load_image_dataset",
    "load_vae",
    "make_accelerator",
    "prepare_output_dir",
    "make_image_transform",
    "prediction_target",
    "read_expert_runs",
    "resolve_image_column",
    "resume",
    "sample_grid",
    "save_checkpoint",
    "save_expert_run",
    "save_image_grid",
    "save_preview",
    "trainable_parameters",
]
