"""The denoising objective: the regression target of each prediction type, and label dropout for guidance."""

from __future__ import annotations

import torch


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_target(
    noise_scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the denoiser regresses: the noise `eps`, the velocity `v = sqrt(a_t) eps - sqrt(1 - a_t) x_0`, or `x_0`."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    raise ValueError(f"`--prediction_type` must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")


def apply_class_dropout(
    labels: torch.Tensor, probability: float, null_class: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by the null class with `probability` (classifier-free guidance training)."""
    if probability <= 0:
        return labels
    drop = torch.rand(labels.shape[0], generator=generator).to(labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_class), labels)
