"""Writing training outputs: a pipeline folder (`MultiExpertPipeline.from_pretrained`) with model cards, pushed to
the Hub on request, or the output of a single-expert run (to be assembled with the others' later)."""

from __future__ import annotations

import json
import os

from ..constants import MODEL_INDEX_NAME
from ..evaluation.trained_model import UsageError
from ..hub import push_mixture_to_hub
from ..model_card import MODEL_CARD_NAME, save_model_cards
from ..pipelines import MultiExpertPipeline
from ..saving import atomic_directory
from .preview import save_preview


EXPERT_RUN_INFO = "expert_info.json"
EXPERT_RUN_FOLDER = "expert"
SCHEDULER_FOLDER = "scheduler"
PIPELINE_ENTRIES = (MODEL_INDEX_NAME, "unet", SCHEDULER_FOLDER, "vae", MODEL_CARD_NAME)


def export_pipeline(output_dir: str, mixture, noise_scheduler, vae=None, metadata: dict | None = None):
    """Save `MultiExpertPipeline(unet=mixture, scheduler=noise_scheduler, vae=vae)` into `output_dir` with a model card
    for the mixture and one per expert (training `metadata`: steps, dataset, strategy, p_k, ...). The pipeline files
    are swapped in atomically; other content of `output_dir` (checkpoints, logs, samples) is kept."""
    pipe = MultiExpertPipeline(unet=mixture, scheduler=noise_scheduler, vae=vae)
    with atomic_directory(output_dir, stale=PIPELINE_ENTRIES) as tmp:
        pipe.save_pretrained(tmp)
        save_model_cards(tmp, pipe, metadata)
    return pipe


def push_pipeline(args, pipe, metadata: dict | None = None) -> None:
    """Push an exported pipeline to `--hub_model_id` in one commit (`--hub_token`, `--hub_private_repo`)."""
    private = args.hub_private_repo or None
    push_mixture_to_hub(pipe, args.hub_model_id, metadata=metadata, token=args.hub_token, private=private)


def export_run(args, mixture, noise_scheduler, metadata: dict, vae=None, device=None) -> None:
    """End of a training run (main process): the pipeline and its cards in `--output_dir`, a final preview grid
    `samples/final.png`, then with `--push_to_hub` the pipeline on the Hub."""
    pipe = export_pipeline(args.output_dir, mixture, noise_scheduler, vae, metadata)
    grid = save_preview(args, mixture, noise_scheduler, "final.png", None, vae, device)
    print(f"saved the pipeline to {args.output_dir}")
    print(f"sample grid: {grid}")
    if args.push_to_hub:
        push_pipeline(args, pipe, metadata)


def save_expert_run(output_dir: str, expert, info: dict, noise_scheduler) -> None:
    """Output of a run that trained one expert (`--expert_index k`): `expert/` (its model folder), `scheduler/` and
    `expert_info.json` (index, count, boundaries, T, routing, strategy, p_k, steps) for `--assemble`."""
    with atomic_directory(output_dir, stale=(EXPERT_RUN_FOLDER, SCHEDULER_FOLDER, EXPERT_RUN_INFO)) as tmp:
        expert.save_pretrained(os.path.join(tmp, EXPERT_RUN_FOLDER), safe_serialization=True)
        noise_scheduler.save_pretrained(os.path.join(tmp, SCHEDULER_FOLDER))
        with open(os.path.join(tmp, EXPERT_RUN_INFO), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, sort_keys=True)


def read_expert_runs(directories: list[str]) -> list[dict]:
    """The `expert_info.json` of each single-expert run folder, checked to form one complete mixture; sorted by
    expert index, each with its `path`."""
    infos = []
    for directory in directories:
        path = os.path.join(directory, EXPERT_RUN_INFO)
        if not os.path.isfile(path):
            raise UsageError(
                f"`--assemble` folder {directory!r} has no {EXPERT_RUN_INFO}: not an `--expert_index` run."
            )
        with open(path, encoding="utf-8") as f:
            infos.append({**json.load(f), "path": directory})
    first = infos[0]
    for key in ("num_experts", "boundaries", "num_train_timesteps", "routing"):
        values = [info[key] for info in infos]
        if any(v != values[0] for v in values):
            raise UsageError(f"`--assemble` runs disagree on `{key}`: {values!r} for {directories!r}.")
    indices = sorted(info["expert_index"] for info in infos)
    if indices != list(range(first["num_experts"])):
        raise UsageError(
            f"`--assemble` needs each of the {first['num_experts']} experts exactly once, got expert indices "
            f"{[info['expert_index'] for info in infos]} from {directories!r}."
        )
    return sorted(infos, key=lambda info: info["expert_index"])
