"""Expert-major bulk generation (MEME's memory-saving inference): every batch through one expert's steps, then the next.

[`MultiExpertPipeline.generate_many`] delegates here. Each batch keeps its own state between experts in a
[`BatchRun`]: its latents and **its own deep copy of the scheduler**, taken right after `set_timesteps`, which holds
the batch's solver state (multistep history, Heun's first-order sample, the step index, ...). With
`intermediates="disk"` the latents and the batch-shaped part of that state, the fields named in
[`SOLVER_STATE_FIELDS`], are written as safetensors between experts (tensors only: nothing is pickled); the small
rest (step index, `lower_order_nums`, Heun's `dt`, UniPC's `timestep_list`, ...) stays in the scheduler copy in memory.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from safetensors.torch import load_file, save_file

from ..saving import atomic_file
from ..schedulers.scheduling_blended import BlendedScheduler


INTERMEDIATES = ("memory", "disk")
# The text conditioning of `__call__` that `generate_many` takes too (text-conditional experts).
TEXT_ARGUMENTS = ("prompt", "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "num_images_per_prompt")
IMAGE_NAME = "{:06d}.png"
INTERMEDIATES_FOLDER = ".intermediates"

# The batch-shaped tensors each diffusers scheduler keeps between steps (read from diffusers 0.42; a field holds a
# tensor, or a list whose items are tensors or None). `intermediates="disk"` writes them with the latents as
# `state.<field>` / `state.<field>.<i>`. A scheduler not listed here keeps all of its state in memory, in the batch's
# scheduler copy: still correct, only less memory is saved. tests/test_pipeline_multi_expert.py checks the table
# against the schedulers of `scheduler_names.SCHEDULER_NAMES`.
SOLVER_STATE_FIELDS: dict[str, tuple[str, ...]] = {
    "DDPMScheduler": (),
    "DDIMScheduler": (),
    "EulerDiscreteScheduler": (),
    "EulerAncestralDiscreteScheduler": (),
    "DPMSolverMultistepScheduler": ("model_outputs",),  # the last `solver_order` data predictions
    "DEISMultistepScheduler": ("model_outputs",),
    "UniPCMultistepScheduler": ("model_outputs", "last_sample"),  # history, and the corrector's previous sample
    "DPMSolverSinglestepScheduler": ("model_outputs", "sample"),
    "HeunDiscreteScheduler": ("prev_derivative", "sample"),  # between a step's first- and second-order call
    "KDPM2DiscreteScheduler": ("sample",),
    "KDPM2AncestralDiscreteScheduler": ("sample",),
    "LMSDiscreteScheduler": ("derivatives",),  # the last `order` derivatives of the linear multistep method
    "PNDMScheduler": ("ets", "cur_sample", "cur_model_output"),
}


@dataclass
class BulkGenerationOutput(BaseOutput):
    r"""
    Output of [`MultiExpertPipeline.generate_many`].

    Args:
        images: The images in order (`output_type` of the call), or `None` when they were written to `output_dir`.
        paths (`list[str]`, *optional*): The PNG file of every image when `output_dir` was given.
        expert_loads (`list[int]`, *optional*): Moves of each expert onto the device during this run (per-expert
            offload only): expert-major generation loads each expert once.
    """

    images: list | np.ndarray | torch.Tensor | None
    paths: list[str] | None = None
    expert_loads: list[int] | None = None


@dataclass
class BatchRun:
    """One batch of a bulk generation and where its denoising stands."""

    indices: list[int]  # the images of the batch
    scheduler: SchedulerMixin  # the batch's own copy of the pipeline's scheduler: its solver state
    latents: torch.Tensor | None  # None while parked on disk
    class_labels: torch.Tensor | None
    extra_step_kwargs: dict
    prompt_embeds: torch.Tensor | None = None  # the batch's text embeddings (text-conditional experts)
    negative_prompt_embeds: torch.Tensor | None = None


def generate_many(
    pipe,
    num_images: int,
    batch_size: int = 16,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    intermediates: str = "memory",
    class_labels=None,
    output_type: str = "pil",
    **call_kwargs,
) -> BulkGenerationOutput:
    """Expert-major generation with `pipe`; see [`MultiExpertPipeline.generate_many`] for the arguments."""
    # 1. Check inputs (once: the batches trust them)
    _check_bulk_inputs(num_images, batch_size, seed, output_dir, intermediates, call_kwargs)
    num_inference_steps = call_kwargs.get("num_inference_steps", 50)
    guidance_scale = call_kwargs.get("guidance_scale", 1.0)
    denoising_end = call_kwargs.get("denoising_end")
    text = {name: call_kwargs[name] for name in TEXT_ARGUMENTS if name in call_kwargs}
    _check_prompt_count(pipe, num_images, text)
    pipe.check_inputs(
        num_images,
        num_inference_steps,
        None,
        class_labels,
        guidance_scale,
        None,
        None,
        denoising_end,
        output_type,
        **text,
    )

    # 2. What is left to do: finished PNGs in `output_dir` are kept (resume)
    paths, todo = None, list(range(num_images))
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        paths = [os.path.join(output_dir, IMAGE_NAME.format(i)) for i in range(num_images)]
        todo = [i for i in todo if not os.path.isfile(paths[i])]

    # 3. One schedule for all; per batch its own scheduler copy, per-image noise and labels
    device = pipe._run_device
    guidance_scales = pipe._guidance_scales(guidance_scale)
    labels = pipe._class_labels(class_labels, num_images, device)
    embeds = negative_embeds = None
    if pipe._text_conditional:
        embeds, negative_embeds = pipe.encode_prompt(
            text.get("prompt"),
            device,
            text.get("num_images_per_prompt", 1),
            bool((guidance_scales != 1).any()),
            text.get("negative_prompt"),
            text.get("prompt_embeds"),
            text.get("negative_prompt_embeds"),
        )
    timesteps, _ = pipe.prepare_timesteps(num_inference_steps, device, None, denoising_end)
    batches = []
    for start in range(0, len(todo), batch_size):
        indices = todo[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + i) for i in indices]
        batch = BatchRun(
            indices=indices,
            scheduler=copy.deepcopy(pipe.scheduler),
            latents=pipe.prepare_latents(len(indices), generators, None, device),
            class_labels=None if labels is None else labels[indices],
            extra_step_kwargs=pipe.prepare_extra_step_kwargs(generators, call_kwargs.get("eta", 0.0)),
            prompt_embeds=None if embeds is None else embeds[indices],
            negative_prompt_embeds=None if negative_embeds is None else negative_embeds[indices],
        )
        batches.append(batch)

    # 4. Expert-major denoising: each run of consecutive steps with the same active experts, over all batches
    offload = pipe.expert_offload
    if offload is not None:
        offload.reset_counts()
    spill = os.path.join(os.fspath(output_dir), INTERMEDIATES_FOLDER) if intermediates == "disk" else None
    schedule = [pipe.unet.active_experts(t) for t in timesteps]
    with pipe.progress_bar(total=len(timesteps) * len(batches)) as progress_bar:
        for first, stop in _segments(schedule):
            for j, batch in enumerate(batches):
                _restore(batch, spill, j, device)
                for t, experts in zip(timesteps[first:stop], schedule[first:stop]):
                    scheduler = batch.scheduler
                    noise_pred = pipe._predict_noise(
                        scheduler,
                        batch.latents,
                        t,
                        batch.class_labels,
                        experts,
                        guidance_scales,
                        batch.prompt_embeds,
                        batch.negative_prompt_embeds,
                    )
                    batch.latents = scheduler.step(noise_pred, t, batch.latents, **batch.extra_step_kwargs).prev_sample
                    progress_bar.update()
                _park(batch, spill, j, offload)

    # 5. Decode; write PNGs (atomically: an interrupted run never leaves half an image) or collect the images
    images = []
    for j, batch in enumerate(batches):
        _restore(batch, spill, j, device)
        if output_dir is None:
            images.append(pipe._decode(batch.latents, output_type))
            continue
        for i, image in zip(batch.indices, pipe._decode(batch.latents, "pil")):
            with atomic_file(paths[i]) as tmp:
                image.save(tmp, format="PNG")
        batch.latents = None
    if spill is not None and os.path.isdir(spill):
        shutil.rmtree(spill)
    loads = list(offload.load_counts) if offload is not None else None
    if output_dir is not None:
        return BulkGenerationOutput(images=None, paths=paths, expert_loads=loads)
    return BulkGenerationOutput(images=_concat_images(images, output_type), paths=None, expert_loads=loads)


def _check_bulk_inputs(num_images, batch_size, seed, output_dir, intermediates, call_kwargs) -> None:
    """The arguments `generate_many` adds to those of `__call__` (checked by the pipeline's `check_inputs`)."""
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
        raise ValueError(f"`num_images` must be a positive integer, got {num_images!r}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if not isinstance(seed, int):
        raise TypeError(f"`seed` must be an integer, got {seed!r}.")
    if intermediates not in INTERMEDIATES:
        raise ValueError(f"`intermediates` must be one of {list(INTERMEDIATES)}, got {intermediates!r}.")
    if intermediates == "disk" and output_dir is None:
        raise ValueError("`intermediates='disk'` needs `output_dir` (the latents are kept under it).")
    reserved = sorted({"generator", "latents", "batch_size", "return_dict", "callback_on_step_end"} & set(call_kwargs))
    if reserved:
        raise TypeError(f"generate_many sets {reserved} itself; remove them from the arguments.")
    allowed = {"num_inference_steps", "guidance_scale", "eta", "denoising_start", "denoising_end", *TEXT_ARGUMENTS}
    unknown = sorted(set(call_kwargs) - allowed)
    if unknown:
        raise TypeError(f"Unknown argument(s) {unknown} for generate_many; valid: {sorted(allowed)}.")
    if call_kwargs.get("denoising_start") is not None:
        raise ValueError("`denoising_start` needs handed-over latents; generate_many starts from noise.")


def _check_prompt_count(pipe, num_images: int, text: dict) -> None:
    """With prompts, `num_images` must be the number of prompts times `num_images_per_prompt`."""
    prompt, embeds = text.get("prompt"), text.get("prompt_embeds")
    per_prompt = text.get("num_images_per_prompt", 1)
    countable = isinstance(prompt, (str, list)) or (prompt is None and torch.is_tensor(embeds) and embeds.ndim == 3)
    if (
        not countable
        or (prompt is not None and embeds is not None)
        or not isinstance(per_prompt, int)
        or per_prompt < 1
    ):
        return  # nothing to count, or malformed: `check_inputs` names the argument
    expected = pipe._num_images(None, prompt, embeds, per_prompt)
    if expected != num_images:
        raise ValueError(
            f"`num_images`={num_images} does not match the prompts: {expected // per_prompt} prompt(s) x "
            f"num_images_per_prompt={per_prompt} = {expected} images."
        )


def _segments(schedule: list[list[int]]) -> list[tuple[int, int]]:
    """Maximal runs `[start, stop)` of consecutive steps with the same active experts."""
    segments = []
    start = 0
    for i in range(1, len(schedule) + 1):
        if i == len(schedule) or schedule[i] != schedule[start]:
            segments.append((start, i))
            start = i
    return segments


def _park(batch: BatchRun, spill: str | None, j: int, offload) -> None:
    """Between segments: latents and solver state to disk (`spill`), or the latents to the offload device."""
    if spill is not None:
        os.makedirs(spill, exist_ok=True)
        tensors = {"latents": batch.latents, **take_solver_state(batch.scheduler)}
        tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
        save_file(tensors, os.path.join(spill, f"batch_{j}.safetensors"))
        batch.latents = None
    elif offload is not None:
        batch.latents = batch.latents.to(offload.offload_device)


def _restore(batch: BatchRun, spill: str | None, j: int, device: torch.device) -> None:
    """Undo [`_park`]: the batch's latents (and solver state) back on `device`."""
    if batch.latents is None:
        tensors = load_file(os.path.join(spill, f"batch_{j}.safetensors"), device=str(device))
        batch.latents = tensors.pop("latents")
        put_solver_state(batch.scheduler, tensors)
    batch.latents = batch.latents.to(device)


def _solver(scheduler: SchedulerMixin) -> SchedulerMixin:
    return scheduler.base if isinstance(scheduler, BlendedScheduler) else scheduler


def take_solver_state(scheduler: SchedulerMixin) -> dict[str, torch.Tensor]:
    """Remove and return the fields [`SOLVER_STATE_FIELDS`] names for this scheduler, as `state.<field>` (a tensor)
    or `state.<field>.<i>` (item `i` of a list); unset fields and `None` items are left as they are."""
    solver = _solver(scheduler)
    state = {}
    for name in SOLVER_STATE_FIELDS.get(type(solver).__name__, ()):
        value = getattr(solver, name)
        if isinstance(value, list):
            for i, item in enumerate(value):
                if torch.is_tensor(item):
                    state[f"state.{name}.{i}"] = item
                    value[i] = None
        elif torch.is_tensor(value):
            state[f"state.{name}"] = value
            setattr(solver, name, None)
    return state


def put_solver_state(scheduler: SchedulerMixin, state: dict[str, torch.Tensor]) -> None:
    """Put back what [`take_solver_state`] removed."""
    solver = _solver(scheduler)
    for key, value in state.items():
        name, _, index = key.removeprefix("state.").partition(".")
        if index:
            getattr(solver, name)[int(index)] = value
        else:
            setattr(solver, name, value)


def _concat_images(chunks: list, output_type: str):
    if output_type == "pil":
        return [image for chunk in chunks for image in chunk]
    if output_type == "np":
        return np.concatenate(chunks) if chunks else np.zeros((0,))
    return torch.cat(chunks) if chunks else torch.zeros(0)
