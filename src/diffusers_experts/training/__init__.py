"""Building blocks shared by the training scripts in `examples/` (arguments, data, experts, objective, optimisation,
EMA, checkpoints, run configuration, run log, previews, export). One concept per module; the scripts themselves hold the training loops."""

from ..evaluation.heldout_loss import PREDICTION_TYPES, prediction_target
from .accelerator import configure_logging, make_accelerator, prepare_output_dir
from .checkpointing import (
    GeneratorState,
    latest_checkpoint,
    list_checkpoints,
    maybe_save_checkpoint,
    process_generator,
    resume,
    save_checkpoint,
)
from .data import (
    BatchStream,
    build_training_dataset,
    builtin_mnist,
    check_label_column,
    collate,
    dataset_description,
    load_image_dataset,
    make_dataloader,
    make_image_transform,
    resolve_image_column,
)
from .ema import ExpertEMA, make_ema
from .experts import (
    build_experts,
    build_lora_experts,
    enable_gradient_checkpointing,
    experts_from_args,
    trainable_parameters,
)
from .export import export_pipeline, export_run, push_pipeline, read_expert_runs, save_expert_run
from .latents import LatentCache, encode_latents, load_vae
from .objective import apply_class_dropout, class_embeddings, denoising_loss, make_noise_scheduler, training_labels
from .optimization import make_lr_scheduler, make_optimizer, optimizer_step, optimizer_steps
from .preview import sample_grid, save_preview
from .run_config import check_output_dir, read_run_config, run_config, write_run_config
from .run_log import RunLog


__all__ = [
    "BatchStream",
    "ExpertEMA",
    "GeneratorState",
    "LatentCache",
    "PREDICTION_TYPES",
    "RunLog",
    "apply_class_dropout",
    "build_experts",
    "build_lora_experts",
    "build_training_dataset",
    "builtin_mnist",
    "check_label_column",
    "check_output_dir",
    "class_embeddings",
    "collate",
    "configure_logging",
    "dataset_description",
    "denoising_loss",
    "enable_gradient_checkpointing",
    "encode_latents",
    "experts_from_args",
    "export_pipeline",
    "export_run",
    "latest_checkpoint",
    "list_checkpoints",
    "load_image_dataset",
    "load_vae",
    "make_accelerator",
    "make_dataloader",
    "make_ema",
    "make_image_transform",
    "make_lr_scheduler",
    "make_noise_scheduler",
    "make_optimizer",
    "maybe_save_checkpoint",
    "optimizer_step",
    "optimizer_steps",
    "prediction_target",
    "prepare_output_dir",
    "process_generator",
    "push_pipeline",
    "read_run_config",
    "read_expert_runs",
    "resolve_image_column",
    "resume",
    "run_config",
    "sample_grid",
    "save_checkpoint",
    "save_expert_run",
    "save_preview",
    "trainable_parameters",
    "training_labels",
    "write_run_config",
]
