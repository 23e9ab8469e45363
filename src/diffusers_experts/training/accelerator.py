"""The `Accelerator` of a training script: trackers, logging folder, seedable data order (exact resume)."""

from __future__ import annotations

import os
import shutil


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


def prepare_output_dir(args, accelerator) -> None:
    """Create `--output_dir` (emptied first with `--overwrite_output_dir`, unless resuming); every process waits."""
    if accelerator.is_main_process:
        if args.overwrite_output_dir and args.resume_from_checkpoint is None and os.path.isdir(args.output_dir):
            shutil.rmtree(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
