"""Held-out denoising loss per timestep: the cheap, low-variance quality metric of a denoiser (a plain model or an
`ExpertMixtureUNet`) that compares models and experts noise level by noise level (DESIGN contract 9).

Every model is scored on the same held-out images, the same noise draws (seeded) and the same timestep grid, so two
tables differ only by the models. A class-conditional model is scored twice: with the true labels (`cond`) and with
the null class of classifier-free guidance (`null`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


# 16 timesteps from 5 to 995 (training-timestep units of T = 1000), evenly spaced.
DEFAULT_HELDOUT_TIMESTEPS = tuple(round(5 + i * 66) for i in range(16))
CONDITIONS = ("cond", "null")


def heldout_digits(
    image_size: int = 16, num_train: int = 4000, num_heldout: int = 512, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out MNIST digits `(images in [-1, 1], labels)`: digits `num_train .. num_train + num_heldout` of the
    bundled digits shuffled with `seed` (`diffusers_experts.evaluation.mnist_digits`). A model trained on the first
    `num_train` of that order (`examples/train_meme.py --max_train_samples num_train`) has never seen them."""
    from .mnist import MNIST_NUM_DIGITS, mnist_digits

    if not 0 < num_heldout <= MNIST_NUM_DIGITS - num_train:
        raise ValueError(
            f"`num_heldout` must lie in [1, {MNIST_NUM_DIGITS - num_train}] with `num_train`={num_train}, "
            f"got {num_heldout!r}."
        )
    digits, labels = mnist_digits(image_size, seed=seed)
    chosen = slice(num_train, num_train + num_heldout)
    return digits[chosen].float() / 127.5 - 1.0, labels[chosen]


@dataclass
class HeldoutLoss:
    """Per-timestep held-out loss. `losses[condition][i]` is the mean squared error of the prediction at
    `timesteps[i]` (`condition` is `"cond"`, `"null"`, or `"uncond"` for an unconditional model)."""

    timesteps: list[int]
    losses: dict[str, list[float]] = field(default_factory=dict)
    prediction_type: str = "epsilon"

    def mean(self, condition: str | None = None, low: float = 0.0, high: float = float("inf")) -> float:
        """Mean loss over the grid timesteps in `[low, high)` (default: all) of `condition` (default: the first)."""
        values = self.losses[condition or next(iter(self.losses))]
        chosen = [v for t, v in zip(self.timesteps, values) if low <= t < high]
        if not chosen:
            raise ValueError(f"No grid timestep lies in [{low}, {high}); grid: {self.timesteps}.")
        return sum(chosen) / len(chosen)

    def bins(self, edges: Sequence[float], condition: str | None = None) -> list[float]:
        """Mean loss in each bin `[edges[i], edges[i + 1])` (e.g. the experts' intervals `[0, 250, 500, 750, 1000]`)."""
        return [self.mean(condition, low, high) for low, high in zip(edges[:-1], edges[1:])]

    def to_dict(self) -> dict:
        return {"timesteps": list(self.timesteps), "losses": {k: list(v) for k, v in self.losses.items()}}

    def table(self, condition: str | None = None, name: str = "loss") -> str:
        """A markdown table `t | loss` of one condition."""
        condition = condition or next(iter(self.losses))
        lines = [f"| t | {name} ({condition}) |", "|---|---|"]
        lines += [f"| {t} | {v:.4f} |" for t, v in zip(self.timesteps, self.losses[condition])]
        return "\n".join(lines)


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
    raise ValueError(f"`prediction_type` must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")


@torch.no_grad()
def heldout_loss(
    denoiser,
    noise_scheduler,
    images: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    timesteps: Sequence[int] = DEFAULT_HELDOUT_TIMESTEPS,
    seed: int = 0,
    batch_size: int = 256,
    prediction_type: str | None = None,
    conditions: Sequence[str] | None = None,
) -> HeldoutLoss:
    r"""
    Held-out denoising loss of `denoiser` at each timestep of a fixed grid, with fixed noise.

    Args:
        denoiser: A diffusers-style denoiser `denoiser(x_t, t, class_labels=...)` returning `.sample` (or a tuple):
            a `UNet2DModel`, an `IUNet2DModel`, an `ExpertMixtureUNet` (routed by `t`), ...
        noise_scheduler: The training noise schedule (`add_noise`, `get_velocity`, `config.prediction_type`).
        images (`torch.Tensor`): Held-out clean samples `(N, C, H, W)` in the model's space ([-1, 1] pixels).
        class_labels (`torch.Tensor`, *optional*): Their labels, for a class-conditional denoiser.
        timesteps (`Sequence[int]`): The timestep grid (default: 16 timesteps from 5 to 995).
        seed (`int`): Seed of the noise; the draws depend only on it, the image shape and the grid.
        batch_size (`int`): Images per model call.
        prediction_type (`str`, *optional*): Defaults to `noise_scheduler.config.prediction_type`.
        conditions (`Sequence[str]`, *optional*): For a class-conditional denoiser, any of `"cond"` (true labels)
            and `"null"` (the null class `num_class_embeds - 1`); default both. Unconditional: `["uncond"]`.

    Returns:
        [`HeldoutLoss`]: the mean squared error per timestep and condition.
    """
    prediction_type = prediction_type or noise_scheduler.config.prediction_type
    grid = [int(t) for t in timesteps]
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if not grid or not all(0 <= t < num_train_timesteps for t in grid):
        raise ValueError(
            f"`timesteps` must be a non-empty grid in [0, {num_train_timesteps}), got {list(timesteps)!r}."
        )
    num_class_embeds = getattr(getattr(denoiser, "config", None), "num_class_embeds", None)
    if num_class_embeds is None:
        if class_labels is not None:
            raise ValueError("`class_labels` were given, but the denoiser is unconditional (num_class_embeds=None).")
        conditions = ["uncond"]
    else:
        if class_labels is None:
            raise ValueError(f"The denoiser is class-conditional (num_class_embeds={num_class_embeds}): pass labels.")
        conditions = list(conditions or CONDITIONS)
        unknown = [c for c in conditions if c not in CONDITIONS]
        if unknown:
            raise ValueError(f"`conditions` must be among {list(CONDITIONS)}, got {list(conditions)!r}.")
    param = next(denoiser.parameters())
    device, dtype = param.device, param.dtype
    clean_all = images.float()
    generator = torch.Generator().manual_seed(seed)
    noise_all = torch.randn((len(grid), *clean_all.shape), generator=generator)
    was_training = denoiser.training
    denoiser.eval()
    sums = {c: [0.0] * len(grid) for c in conditions}
    try:
        for i, t in enumerate(grid):
            for start in range(0, len(clean_all), batch_size):
                clean = clean_all[start : start + batch_size]
                noise = noise_all[i, start : start + batch_size]
                t_batch = torch.full((clean.shape[0],), t, dtype=torch.long)
                noisy = noise_scheduler.add_noise(clean, noise, t_batch)
                target = prediction_target(noise_scheduler, clean, noise, t_batch, prediction_type)
                for condition in conditions:
                    labels = None
                    if condition == "cond":
                        labels = class_labels[start : start + batch_size].to(device)
                    elif condition == "null":
                        labels = torch.full((clean.shape[0],), num_class_embeds - 1, dtype=torch.long, device=device)
                    out = denoiser(noisy.to(device, dtype), t_batch.to(device), class_labels=labels)
                    prediction = out.sample if hasattr(out, "sample") else out[0]
                    error = (prediction.float().cpu() - target) ** 2
                    sums[condition][i] += error.sum().item()
    finally:
        denoiser.train(was_training)
    count = clean_all.numel()
    return HeldoutLoss(grid, {c: [s / count for s in sums[c]] for c in conditions}, prediction_type)
