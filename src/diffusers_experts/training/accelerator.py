"""The `Accelerator` of a training script: trackers, logging folder, seedable data order (exact resume); the output
folder with its recorded run configuration; what gets logged."""

from __future__ import annotations

import logging
import os
import shutil

from .run_config import run_config, write_run_config


# accelerate's INFO lines about every saved or loaded state (about 16 per checkpoint) would break the progress bar
QUIET_LOGGERS = ("accelerate.checkpointing", "accelerate.accelerator")


def make_accelerator(args, find_unused_parameters: bool = False):
    """An `Accelerator` configured from the shared script arguments.

    The seedable sampler makes each epoch's data order depend only on the seed and the epoch, which resuming from a
    checkpoint relies on. `find_unused_parameters` is needed under DDP when some parameters of a prepared model get
    no gradient in a step (LoRA experts sharing one base, blended routing that skips an expert).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=handlers,
    )


def configure_logging() -> None:
    """INFO logs in one format, without accelerate's per-file checkpoint lines (warnings still show)."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def prepare_output_dir(args, accelerator, script: str) -> None:
    """Create `--output_dir` (emptied first with `--overwrite_output_dir`, unless resuming) and record the run's
    configuration in it (`run_config.json`, see [`check_output_dir`]); every process waits."""
    if accelerator.is_main_process:
        if args.overwrite_output_dir and args.resume_from_checkpoint is None and os.path.isdir(args.output_dir):
            shutil.rmtree(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        write_run_config(args.output_dir, run_config(args, script))
    accelerator.wait_for_everyone()
