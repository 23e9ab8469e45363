"""What a training run reports at each optimizer step: a progress bar, Accelerate's trackers and `train_log.jsonl`."""

from __future__ import annotations

import json
import os

from tqdm.auto import tqdm

from ..saving import atomic_file


TRAIN_LOG_NAME = "train_log.jsonl"


class RunLog:
    """The progress bar (local main processes), the trackers of `--report_to` (main process) and
    `output_dir/train_log.jsonl` (main process, one JSON line per optimizer step; lines after `initial_step` from an
    earlier run of the same configuration are dropped) of a training run.

    Args:
        accelerator: The run's `Accelerator`.
        args: The script's arguments (`output_dir`, `report_to`; all of them are logged as the tracker config).
        project (`str`): The trackers' project name (the script's name).
        total_steps (`int`): Optimizer steps of the whole run.
        initial_step (`int`, defaults to 0): The step a resumed run starts from.
    """

    def __init__(self, accelerator, args, project: str, total_steps: int, initial_step: int = 0):
        self.accelerator = accelerator
        self.path = os.path.join(args.output_dir, TRAIN_LOG_NAME)
        if accelerator.is_main_process:
            self._keep_steps_up_to(initial_step)
        if accelerator.is_main_process and args.report_to != "none":
            accelerator.init_trackers(project, config={k: str(v) for k, v in vars(args).items()})
        self.progress = tqdm(total=total_steps, initial=initial_step, disable=not accelerator.is_local_main_process)

    def _keep_steps_up_to(self, initial_step: int) -> None:
        """Drop the log lines after `initial_step` (a new run starts an empty log; a resumed one drops the steps
        that it redoes), so each step is logged once."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= initial_step]
        with atomic_file(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)

    def step(self, step: int, logs: dict, **postfix) -> None:
        """Report optimizer step `step`: advance the bar (showing `postfix`), send `logs` to the trackers, append them
        to `train_log.jsonl`."""
        self.progress.update(1)
        self.progress.set_postfix(**postfix)
        self.accelerator.log(logs, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")

    def close(self) -> None:
        self.progress.close()
