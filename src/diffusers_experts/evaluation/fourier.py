"""Fourier analysis of feature maps (MEME Fig. 3 and Fig. 6, after Park & Kim 2022, "How do vision transformers work?").

For a feature map `(B, C, H, W)`: 2-D FFT per channel, log amplitude, mean over batch and channels, then the
half-diagonal of the (unshifted) spectrum from frequency 0 to the highest frequency `pi`, minus its value at 0:

    relative_log_amplitude[k] = log|F|(k, k) - log|F|(0, 0),   k = 0 .. H/2,   frequency = k / (H/2) * pi

Negative values mean high frequencies are damped relative to the mean (a low-pass layer); values closer to 0 mean
the layer keeps high frequencies. MEME reads these per layer, per timestep (Fig. 3) and per expert (Fig. 6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


__all__ = [
    "FourierAnalysis",
    "capture_feature_maps",
    "default_fourier_layers",
    "fourier_analysis",
    "relative_log_amplitude",
]


def relative_log_amplitude(feature_map: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Relative log amplitude along the half-diagonal of the 2-D spectrum of `(B, C, H, W)` maps, `H/2 + 1` values.

    Entry `k` is at normalised frequency `k / (H/2) * pi`; entry 0 is 0 by construction.
    """
    if not torch.is_tensor(feature_map) or feature_map.ndim != 4:
        shape = tuple(feature_map.shape) if torch.is_tensor(feature_map) else type(feature_map).__name__
        raise ValueError(f"`feature_map` must be a 4-D tensor (batch, channels, height, width), got {shape}.")
    height, width = feature_map.shape[-2:]
    if height != width or height < 2:
        raise ValueError(f"`feature_map` must have square maps of size >= 2, got {height}x{width}.")
    spectrum = torch.fft.fft2(feature_map.detach().double())
    log_amplitude = (spectrum.abs() + eps).log().mean(dim=(0, 1))
    k = torch.arange(height // 2 + 1)
    diagonal = log_amplitude[k, k]
    return (diagonal - diagonal[0]).float()


def _first_map(output) -> torch.Tensor | None:
    """The first 4-D tensor in a block's output (blocks return tensors, tuples or `UNet2DOutput`s)."""
    if torch.is_tensor(output):
        return output if output.ndim == 4 else None
    if hasattr(output, "sample"):
        return _first_map(output.sample)
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_map(item)
            if found is not None:
                return found
    return None


def _last_layer(prefix: str, block: nn.Module) -> str:
    """Name of the last layer of a diffusers down / up block before its resampler: its last attention, else its last
    ResNet."""
    for part in ("attentions", "resnets"):
        layers = getattr(block, part, None)
        if layers is not None and len(layers) > 0:
            return f"{prefix}.{part}.{len(layers) - 1}"
    return prefix


def default_fourier_layers(model: nn.Module) -> list[str]:
    """Names of the blocks to analyse, input to output, one per resolution stage: `conv_in`, the last layer of each
    encoder stage (before its downsampler), the middle, the last layer of each decoder stage (before its upsampler).

    Each stage is read at its own resolution, so architectures with the same stages give feature maps of the same
    sizes in the same positions (an `IUNet2DModel` and a `UNet2DModel` of the same `block_out_channels`: MEME Fig. 6
    compares experts of different architectures). Knows `UNet2DModel` and diffusers' other U-Nets (`down_blocks`,
    `mid_block`, `up_blocks`) and `IUNet2DModel` (`down_layers`, `mid_block`, `up_layers`); any other model must be
    given explicit `layers`.
    """
    names = dict(model.named_modules())
    layers = ["conv_in"] if "conv_in" in names else []
    mid = ["mid_block"] if "mid_block" in names else []
    if "down_blocks" in names and "up_blocks" in names:
        down = [_last_layer(f"down_blocks.{i}", block) for i, block in enumerate(names["down_blocks"])]
        up = [_last_layer(f"up_blocks.{i}", block) for i, block in enumerate(names["up_blocks"])]
        return layers + down + mid + up
    config = getattr(model, "config", None)
    if "down_layers" in names and "up_layers" in names and config is not None and "layers_per_block" in config:
        depth, stages = config.layers_per_block, len(config.block_out_channels)
        down = [f"down_layers.{(i + 1) * depth - 1}" for i in range(stages)]
        up = [f"up_layers.{(i + 1) * (depth + 1) - 1}" for i in range(stages)]
        return layers + down + mid + up
    raise ValueError(
        f"Cannot pick default layers of a {type(model).__name__}: pass `layers` (names from `model.named_modules()`)."
    )


def capture_feature_maps(
    model: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    layers: Sequence[str] | None = None,
    class_labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Feature maps `(B, C, H, W)` output by the named blocks of `model` in one forward call, via forward hooks.

    A block that is a `ModuleList` (the layers of `IUNet2DModel`) is read at its last item. Hooks are removed before
    returning, also when the call fails.
    """
    layers = list(default_fourier_layers(model) if layers is None else layers)
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"`layers` {missing} are not modules of {type(model).__name__}; e.g. {list(modules)[1:8]}.")
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args, output):
            feature_map = _first_map(output)
            if feature_map is not None:
                captured[name] = feature_map.detach()

        return hook

    handles = [_hook_target(modules[name]).register_forward_hook(hook_for(name)) for name in layers]
    try:
        kwargs = {"class_labels": class_labels} if class_labels is not None else {}
        with torch.no_grad():
            model(sample, timestep, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: captured[name] for name in layers if name in captured}


def _hook_target(module: nn.Module) -> nn.Module:
    """The module whose output is the block's output: a `ModuleList` block (as in `IUNet2DModel`) ends with its last item."""
    while isinstance(module, nn.ModuleList) and len(module) > 0:
        module = module[-1]
    return module


@dataclass
class FourierAnalysis:
    """Relative log amplitudes of a model's feature maps, per timestep and per layer.

    Attributes:
        timesteps (`list[int]`): Training timesteps analysed.
        layers (`list[str]`): Analysed blocks, input to output.
        resolutions (`list[int]`): Feature-map size of each layer.
        values (`list[list[list[float]]]`): `values[i][j]` is the curve of timestep `i`, layer `j` (`H_j/2 + 1` points
            from frequency 0 to `pi`).
    """

    timesteps: list[int]
    layers: list[str]
    resolutions: list[int]
    values: list[list[list[float]]] = field(repr=False)

    def frequencies(self, layer: int) -> list[float]:
        """Normalised frequencies (0 .. pi) of the points of layer `layer`."""
        half = self.resolutions[layer] // 2
        return [k / half * math.pi for k in range(half + 1)]

    def high_frequency(self) -> list[list[float]]:
        """`[timestep][layer]` relative log amplitude at the highest frequency `pi` (Park & Kim's summary)."""
        return [[curve[-1] for curve in per_layer] for per_layer in self.values]

    def to_dict(self) -> dict:
        return {
            "timesteps": self.timesteps,
            "layers": self.layers,
            "resolutions": self.resolutions,
            "values": self.values,
            "high_frequency": self.high_frequency(),
        }


def fourier_analysis(
    model: nn.Module,
    images: torch.Tensor,
    timesteps: Sequence[int],
    noise_scheduler=None,
    layers: Sequence[str] | None = None,
    class_labels: torch.Tensor | None = None,
    seed: int = 0,
) -> FourierAnalysis:
    r"""
    Relative log amplitude of the Fourier-transformed feature maps of `model`'s blocks, for noisy inputs
    `x_t = noise_scheduler.add_noise(images, noise, t)` at each of `timesteps`, averaged over the batch.

    To compare experts (MEME Fig. 6), run it on each expert of a mixture with the same `images`, `timesteps` and
    `seed`: every expert then sees the same noisy inputs.

    Args:
        model (`torch.nn.Module`): A denoiser (e.g. an expert, a `UNet2DModel`, an `IUNet2DModel`).
        images (`torch.Tensor`): Clean images `(B, C, H, W)` in the model's range (usually [-1, 1]).
        timesteps (`Sequence[int]`): Training timesteps to analyse.
        noise_scheduler (*optional*): A diffusers scheduler with `add_noise`; defaults to `DDPMScheduler()`.
        layers (`Sequence[str]`, *optional*): Block names; defaults to [`default_fourier_layers`].
        class_labels (`torch.Tensor`, *optional*): For class-conditional models.
        seed (`int`, defaults to 0): Seed of the noise.

    Example:
        ```py
        >>> import torch
        >>> from diffusers_experts import IUNet2DModel
        >>> from diffusers_experts.evaluation import fourier_analysis
        >>> model = IUNet2DModel(sample_size=16, block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=8)
        >>> result = fourier_analysis(model, torch.randn(4, 3, 16, 16), timesteps=[100, 900])
        >>> len(result.high_frequency()), result.layers[:3], result.resolutions
        (2, ['conv_in', 'down_layers.1', 'down_layers.3'], [16, 16, 8, 8, 8, 16])
        ```
    """
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(
            f"`images` must be a 4-D tensor (batch, channels, height, width), got {type(images).__name__}."
        )
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
        raise ValueError("`timesteps` must hold at least one training timestep, got an empty sequence.")
    if noise_scheduler is None:
        from diffusers import DDPMScheduler

        noise_scheduler = DDPMScheduler()
    num_train = noise_scheduler.config.num_train_timesteps
    bad = [t for t in timesteps if not 0 <= t < num_train]
    if bad:
        raise ValueError(f"`timesteps` must lie in [0, {num_train}), got {bad}.")
    layers = list(default_fourier_layers(model) if layers is None else layers)
    param = next(model.parameters(), None)
    if param is not None:
        images = images.to(param.device, param.dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)

    values, resolutions, names = [], None, None
    for t in timesteps:
        t_batch = torch.full((images.shape[0],), t, dtype=torch.long, device=images.device)
        noisy = noise_scheduler.add_noise(images, noise, t_batch)
        maps = capture_feature_maps(model, noisy, t_batch, layers=layers, class_labels=class_labels)
        names = list(maps)
        resolutions = [int(m.shape[-1]) for m in maps.values()]
        values.append([relative_log_amplitude(m).tolist() for m in maps.values()])
    return FourierAnalysis(timesteps=timesteps, layers=names, resolutions=resolutions, values=values)
