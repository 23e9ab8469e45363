"""Latent diffusion: encode images with an `AutoencoderKL`, optionally caching the latent distributions."""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL

from ..constants import CONFIG_NAME
from ..evaluation.trained_model import usage_errors
from ..loading import resolve_model_folder
from .data import collate


def load_vae(name_or_path: str, subfolder: str | None = None, revision: str | None = None):
    """An `AutoencoderKL` from a folder or Hub repo id; a pipeline folder with a `vae/` subfolder works too."""
    with usage_errors("--vae", name_or_path):
        folder = resolve_model_folder(name_or_path, subfolder=subfolder, revision=revision)
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)) and os.path.isdir(os.path.join(folder, "vae")):
            folder = os.path.join(folder, "vae")
        vae = AutoencoderKL.from_pretrained(folder)
    vae.requires_grad_(False)
    return vae.eval()


def vae_downsampling_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_latents(vae, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents `z = scaling_factor * sample(q(z|x))` of images in [-1, 1]."""
    dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype).to(dist.mean.device)
    return (dist.mean + dist.std * noise) * vae.config.scaling_factor


class LatentCache(torch.utils.data.Dataset):
    """The latent distribution (mean, std) of every image of a dataset, encoded once without augmentation; the
    training loop draws a fresh latent from it at every step with [`LatentCache.sample`]."""

    def __init__(self, vae, dataset, batch_size: int = 64):
        means, stds, labels = [], [], []
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            with torch.no_grad():
                dist = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
            if "class_labels" in batch:
                labels.append(batch["class_labels"])
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        self.labels = torch.cat(labels) if labels else None
        self.scaling_factor = float(vae.config.scaling_factor)

    def __len__(self) -> int:
        return self.mean.shape[0]

    def __getitem__(self, i: int) -> dict:
        item = {"latent_mean": self.mean[i], "latent_std": self.std[i]}
        if self.labels is not None:
            item["class_labels"] = self.labels[i]
        return item

    @staticmethod
    def sample(batch: dict, scaling_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents drawn from a batch of cached distributions."""
        mean, std = batch["latent_mean"], batch["latent_std"]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return (mean + std * noise) * scaling_factor
