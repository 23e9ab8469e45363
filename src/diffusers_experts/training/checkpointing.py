"""Training checkpoints: atomic `checkpoint-<step>` folders written with accelerate's `save_state` (and the run's
recorded configuration, `run_config.json`), pruning, resume."""

from __future__ import annotations

import os
import re
import shutil

import torch


CHECKPOINT_PREFIX = "checkpoint-"
# the run configuration recorded in the output folder (see `run_config.py`), copied into each checkpoint
RUN_CONFIG_NAME = "run_config.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir` as `(step, path)`, oldest first (temporary folders are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """Path of the newest complete checkpoint in `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def checkpoint_step(path: str) -> int:
    """The global step a checkpoint folder was written at (from its name `checkpoint-<step>`)."""
    match = _CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise ValueError(f"`--resume_from_checkpoint` {path!r} is not a `checkpoint-<step>` folder.")
    return int(match.group(1))


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None = None) -> str:
    """Save the full training state (models, optimizers, lr schedulers, registered objects such as EMA and RNG
    generators, accelerate's RNG states) and the run's `run_config.json` as `output_dir/checkpoint-<step>`,
    atomically.

    Every process writes into the same temporary folder `.checkpoint-<step>.tmp`, all processes wait, then the main
    process renames it to `checkpoint-<step>` (a single rename: a partial checkpoint is never listed) and removes the
    oldest checkpoints beyond `total_limit`. Every process returns only once the checkpoint is in place.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(output_dir, f".{CHECKPOINT_PREFIX}{step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record = os.path.join(output_dir, RUN_CONFIG_NAME)
        if os.path.isfile(record):
            shutil.copyfile(record, os.path.join(tmp, RUN_CONFIG_NAME))
        if os.path.isdir(final):
            aside = f"{final}.old"
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
            os.rename(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, final)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def maybe_save_checkpoint(accelerator, args, step: int, total_steps: int) -> None:
    """Checkpoint every `--checkpointing_steps` optimizer steps and after the last one (`--checkpoints_total_limit`)."""
    if step % args.checkpointing_steps == 0 or step == total_steps:
        save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit)


def resume(accelerator, output_dir: str, resume_from_checkpoint: str | None) -> int:
    """Restore the training state from `resume_from_checkpoint` (`"latest"` or a `checkpoint-<step>` folder) and
    return the global step to continue from (0 for a new run; `"latest"` with no checkpoint yet starts a new run)."""
    if resume_from_checkpoint is None:
        return 0
    path = resume_from_checkpoint
    if path == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            accelerator.print(f"no checkpoint in {output_dir!r} yet: starting a new run")
            return 0
    elif not os.path.isdir(path):
        raise ValueError(f"`--resume_from_checkpoint` {path!r} is not a checkpoint folder.")
    step = checkpoint_step(path)
    accelerator.load_state(path)
    accelerator.print(f"resumed from {path} at step {step}")
    return step


class GeneratorState:
    """A `torch.Generator` whose state is saved and restored with accelerate's checkpoints
    (`accelerator.register_for_checkpointing(state)`), so noise, timesteps and label dropout resume exactly."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(int(seed))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def process_generator(accelerator, seed: int) -> torch.Generator:
    """This process's generator for noise, timesteps and label dropout: seeded with `seed` and the process index, and
    registered with `accelerator` so that checkpoints save and restore its state."""
    state = GeneratorState(seed * 1000 + accelerator.process_index)
    accelerator.register_for_checkpointing(state)
    return state.generator
