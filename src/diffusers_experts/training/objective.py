"""The denoising objective: the noise schedule, the regression target of each prediction type, and the null class
and label dropout of classifier-free guidance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..evaluation.heldout_loss import prediction_target


def make_noise_scheduler(args) -> DDPMScheduler:
    """The training noise schedule of the scripts' noise arguments (`--num_train_timesteps`, `--beta_schedule`,
    `--prediction_type`)."""
    return DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        prediction_type=args.prediction_type,
    )


def denoising_loss(
    model,
    noise_scheduler,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor | None,
    prediction_type: str,
) -> torch.Tensor:
    """MSE between `model`'s prediction at `x_t = add_noise(clean, noise, t)` and its target (DDPM objective)."""
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    prediction = model(noisy, timesteps, class_labels=class_labels).sample
    target = prediction_target(noise_scheduler, clean, noise, timesteps, prediction_type)
    return F.mse_loss(prediction.float(), target.float())


def class_embeddings(num_classes: int | None) -> int | None:
    """`num_class_embeds` of a model trained with `num_classes` classes: one more, the null class `num_classes` that
    label dropout trains for classifier-free guidance (None: unconditional)."""
    return None if num_classes is None else num_classes + 1


def apply_class_dropout(
    labels: torch.Tensor, probability: float, null_class: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by the null class with `probability` (classifier-free guidance training)."""
    if probability <= 0:
        return labels
    drop = torch.rand(labels.shape[0], generator=generator).to(labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def training_labels(args, batch: dict, generator: torch.Generator | None, device) -> torch.Tensor | None:
    """The batch's class labels with label dropout (`--class_dropout_prob`, the null class is `--num_classes`); None
    for unconditional training."""
    if args.num_classes is None:
        return None
    labels = batch["class_labels"].to(device)
    return apply_class_dropout(labels, args.class_dropout_prob or 0.0, args.num_classes, generator)
