"""The run configuration: the arguments that define a training run's model and data, recorded as `run_config.json`
in its output folder and in each checkpoint, so that a folder or a checkpoint of another run is never mixed in."""

from __future__ import annotations

import json
import os

from ..saving import atomic_file
from .checkpointing import RUN_CONFIG_NAME, checkpoint_step, latest_checkpoint


# Arguments that change where and how a run reports, not what it trains: they may differ between the runs that share
# an output folder (and between a run and its resumption). Every other argument of a script defines the run.
NOT_RUN_DEFINING = (
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "logging_dir",
    "report_to",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "save_images_steps",
    "num_preview_images",
    "preview_inference_steps",
    "preview_sampler",
    "guidance_scale",
    "push_to_hub",
    "hub_model_id",
    "hub_token",
    "hub_private_repo",
    "dataloader_num_workers",
    "cache_dir",
    "gradient_checkpointing",
    "assemble",
)
# Arguments naming local files or folders: recorded as absolute paths, so `data` and `./data` are the same run.
PATH_ARGUMENTS = ("train_data_dir", "dataset_name", "model_config", "base_model", "vae", "init_from")
# What a training script leaves in its output folder (a folder holding any of these holds a run).
RUN_ENTRIES = ("train_log.jsonl", "model_index.json", "unet", "vae", "expert", "expert_info.json", "samples", "logs")


def run_config(args, script: str) -> dict:
    """The configuration of a run of `script` (e.g. `"train_meme"`): its run-defining arguments, JSON-normalised."""
    config = {"script": script}
    for name, value in sorted(vars(args).items()):
        if name in NOT_RUN_DEFINING:
            continue
        if name in PATH_ARGUMENTS and isinstance(value, str) and os.path.exists(value):
            value = os.path.abspath(value)
        config[name] = json.loads(json.dumps(value))
    return config


def read_run_config(folder: str) -> dict | None:
    """The configuration recorded in an output folder or a checkpoint folder, or None when none is recorded."""
    path = os.path.join(folder, RUN_CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_run_config(folder: str, config: dict) -> None:
    """Record `config` as `folder/run_config.json` (written atomically)."""
    with atomic_file(os.path.join(folder, RUN_CONFIG_NAME)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)


def config_differences(recorded: dict, current: dict, limit: int = 3) -> str:
    """The arguments in which `current` differs from `recorded`, as `--name <recorded> there, <current> now`; empty
    when the two runs are the same."""
    if recorded.get("script") != current["script"]:
        return f"written by {recorded.get('script')}.py, not {current['script']}.py"
    names = [n for n in sorted(set(recorded) | set(current)) if recorded.get(n) != current.get(n)]
    parts = [f"`--{n}` {_shown(recorded.get(n))} there, {_shown(current.get(n))} now" for n in names[:limit]]
    if len(names) > limit:
        parts.append(f"and {len(names) - limit} more")
    return "; ".join(parts)


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def check_output_dir(args, script: str) -> None:
    """Refuse (`ValueError`, one line naming the flag) an `--output_dir` that holds another run, or a checkpoint to
    resume from that another configuration wrote. Runs at argument parsing, before anything is loaded.

    - Without `--resume_from_checkpoint`: the folder's recorded configuration must equal this run's (a folder holding
      run files but no record is refused too); `--overwrite_output_dir` empties the folder instead.
    - With it: the checkpoint it resumes (the newest one for `latest`) must have been written with this configuration.
      `latest` with no checkpoint yet starts a new run, checked like one.
    """
    current = run_config(args, script)
    checkpoint = _checkpoint_to_resume(args)
    if checkpoint is not None:
        recorded = read_run_config(checkpoint)
        differences = config_differences(recorded, current) if recorded is not None else ""
        if differences:
            raise ValueError(
                f"`--resume_from_checkpoint {args.resume_from_checkpoint}`: {checkpoint} was written by another run "
                f"({differences}): resume with that run's arguments, or start a new run in another `--output_dir` "
                f"(or with `--overwrite_output_dir`, without `--resume_from_checkpoint`)."
            )
        return
    if args.overwrite_output_dir or not os.path.isdir(args.output_dir):
        return
    recorded = read_run_config(args.output_dir)
    if recorded is None:
        found = sorted(
            n for n in os.listdir(args.output_dir) if n in RUN_ENTRIES or _is_checkpoint(args.output_dir, n)
        )
        if found:
            raise ValueError(
                f"`--output_dir` {args.output_dir} holds files of an earlier run ({', '.join(found[:4])}) whose "
                f"configuration was not recorded: pass `--overwrite_output_dir` to replace them, or choose another "
                f"`--output_dir`."
            )
        return
    differences = config_differences(recorded, current)
    if differences:
        raise ValueError(
            f"`--output_dir` {args.output_dir} holds another run ({differences}): pass `--overwrite_output_dir` to "
            f"replace it, or choose another `--output_dir`."
        )


def _checkpoint_to_resume(args) -> str | None:
    """The checkpoint folder `--resume_from_checkpoint` names (the newest one for `latest`), or None."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        return latest_checkpoint(args.output_dir)
    if not os.path.isdir(args.resume_from_checkpoint):
        raise ValueError(f"`--resume_from_checkpoint` {args.resume_from_checkpoint!r} is not a checkpoint folder.")
    checkpoint_step(args.resume_from_checkpoint)  # a `checkpoint-<step>` name, or a ValueError naming the flag
    return args.resume_from_checkpoint


def _is_checkpoint(folder: str, name: str) -> bool:
    try:
        checkpoint_step(name)
    except ValueError:
        return False
    return os.path.isdir(os.path.join(folder, name))
