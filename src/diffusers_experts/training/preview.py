"""Preview sampling during and after training: a grid of images from the mixture with a fast sampler."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from ..evaluation.plots import save_image_grid
from ..pipelines import MultiExpertPipeline


PREVIEW_SAMPLERS = ("ddim", "dpm")


def preview_scheduler(noise_scheduler, sampler: str = "ddim"):
    """A fast sampler (DDIM or DPM-Solver++) on the training noise schedule."""
    if sampler == "ddim":
        return DDIMScheduler.from_config(noise_scheduler.config)
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(noise_scheduler.config)
    raise ValueError(f"`--preview_sampler` must be one of {list(PREVIEW_SAMPLERS)}, got {sampler!r}.")


@torch.no_grad()
def sample_grid(
    mixture,
    noise_scheduler,
    num_images: int,
    num_inference_steps: int = 25,
    sampler: str = "ddim",
    num_classes: int | None = None,
    guidance_scale: float = 1.0,
    vae=None,
    seed: int = 0,
) -> np.ndarray:
    """`num_images` images as a float array `(n, h, w, c)` in [0, 1], sampled with `MultiExpertPipeline`.

    Class-conditional mixtures get labels `0, 1, ..., num_classes - 1, 0, 1, ...` (so a grid with `num_classes`
    columns shows one class per column) and classifier-free guidance with `guidance_scale`.
    """
    was_training = mixture.training
    mixture.eval()
    pipe = MultiExpertPipeline(unet=mixture, scheduler=preview_scheduler(noise_scheduler, sampler), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    labels = None
    if num_classes is not None:
        labels = [i % num_classes for i in range(num_images)]
    generator = torch.Generator().manual_seed(seed)
    images = pipe(
        batch_size=num_images,
        num_inference_steps=num_inference_steps,
        generator=generator,
        class_labels=labels,
        guidance_scale=guidance_scale if num_classes else 1.0,
        output_type="np",
    ).images
    mixture.train(was_training)
    return images


def save_preview(args, mixture, noise_scheduler, name: str, ema=None, vae=None, device=None) -> str:
    """Sample `args.num_preview_images` with the scripts' preview arguments (EMA weights when `ema` is given) and
    save the grid as `output_dir/samples/<name>`; class-conditional grids show one class per column."""
    with torch.no_grad(), ema.averaged() if ema is not None else contextlib.nullcontext():
        if device is not None:
            mixture.to(device)
        images = sample_grid(
            mixture,
            noise_scheduler,
            args.num_preview_images,
            args.preview_inference_steps,
            args.preview_sampler,
            num_classes=args.num_classes,
            guidance_scale=args.guidance_scale,
            vae=vae,
            seed=args.seed,
        )
    columns = args.num_classes if args.num_classes and args.num_preview_images % args.num_classes == 0 else None
    scale = max(1, 64 // images.shape[1])
    return save_image_grid(images, os.path.join(args.output_dir, "samples", name), columns=columns, scale=scale)
