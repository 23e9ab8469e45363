"""PNG plots: routing weights over t, MEME attention shares per stage, Fourier curves, image grids.

matplotlib is imported inside the functions (Agg back end), never at package import.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image

from ..saving import atomic_file
from .fourier import FourierAnalysis
from .metrics import to_uint8_images


__all__ = [
    "attention_shares",
    "plot_attention_shares",
    "plot_fourier",
    "plot_fourier_experts",
    "plot_routing",
    "save_image_grid",
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> str:
    """Write the figure to `path` as a PNG (atomically) and close it."""
    try:
        fig.tight_layout()
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return os.fspath(path)


def plot_routing(mixture, path: str | os.PathLike, num_points: int = 1000, title: str | None = None) -> str:
    """Each expert's routing weight `w_k(t)` over the training timesteps `t in [0, T)` of `mixture`, as a PNG."""
    if not hasattr(mixture, "expert_weights"):
        raise TypeError(f"`mixture` must be an ExpertMixtureUNet, got {type(mixture).__name__}.")
    num_train = mixture.config.num_train_timesteps
    t = torch.linspace(0, num_train - 1, num_points)
    with torch.no_grad():
        weights = mixture.expert_weights(t).detach().cpu().float().numpy()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k in range(weights.shape[1]):
        ax.plot(t.numpy(), weights[:, k], label=f"expert {k}")
    for boundary in mixture.config.boundaries:
        ax.axvline(boundary, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("training timestep t")
    ax.set_ylabel("weight w_k(t)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or f"routing: {mixture.config.routing}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def attention_shares(model) -> list[float]:
    """Share of channels given to self-attention (`C_l / C`) in each stage of an `IUNet2DModel` (MEME Eq. 6)."""
    from ..models.iformer import split_channels

    config = getattr(model, "config", None)
    if config is None or "high_ratios" not in config:
        raise TypeError(f"`model` must be an IUNet2DModel (config with `high_ratios`), got {type(model).__name__}.")
    shares = []
    for channels, ratio in zip(config.block_out_channels, config.high_ratios):
        low = split_channels(channels, ratio, config.attention_head_dim)[1]
        shares.append(low / channels)
    return shares


def plot_attention_shares(experts: Sequence, path: str | os.PathLike, title: str | None = None) -> str:
    """MEME's per-expert attention share per stage (grows with depth, faster for high-noise experts), as a PNG."""
    shares = [attention_shares(expert) for expert in experts]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    styles = ("-", "--", "-.", ":")
    for k, row in enumerate(shares):  # distinct line styles and shrinking markers keep equal rows visible
        style = styles[k % len(styles)]
        ax.plot(range(1, len(row) + 1), row, style, marker="o", markersize=9 - 1.5 * (k % 4), label=f"expert {k}")
    ax.set_xlabel("stage (depth)")
    ax.set_ylabel("attention channels C_l / C")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(range(1, max(len(r) for r in shares) + 1))
    ax.set_title(title or "iU-Net attention share per stage")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_fourier(analysis: FourierAnalysis, path: str | os.PathLike, title: str | None = None) -> str:
    """MEME Fig. 3: one panel per layer, relative log amplitude from frequency 0 to pi, one curve per timestep."""
    plt = _pyplot()
    num_layers = len(analysis.layers)
    cols = min(4, num_layers)
    rows = -(-num_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False, sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 1, len(analysis.timesteps)))
    for j, layer in enumerate(analysis.layers):
        ax = axes[j // cols][j % cols]
        freqs = np.array(analysis.frequencies(j)) / np.pi
        for i, t in enumerate(analysis.timesteps):
            ax.plot(freqs, analysis.values[i][j], color=colors[i], label=f"t={t}")
        ax.set_title(f"{layer} ({analysis.resolutions[j]}px)", fontsize=8)
        ax.set_xlabel("frequency / pi", fontsize=7)
    for j in range(num_layers, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].set_ylabel("relative log amplitude")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title or "Fourier-transformed feature maps per timestep")
    return _save(fig, path)


def plot_fourier_experts(
    analyses: Mapping[str, FourierAnalysis], path: str | os.PathLike, title: str | None = None
) -> str:
    """MEME Fig. 6: per timestep, the relative log amplitude at the highest frequency over depth, one line per model.

    `analyses` maps a label (e.g. `"expert 0"`) to the [`FourierAnalysis`] of that model, all made with the same
    timesteps and inputs.
    """
    if not analyses:
        raise ValueError("`analyses` must map at least one label to a FourierAnalysis.")
    first = next(iter(analyses.values()))
    plt = _pyplot()
    num_t = len(first.timesteps)
    fig, axes = plt.subplots(1, num_t, figsize=(3.2 * num_t, 2.8), squeeze=False, sharey=True)
    for i, t in enumerate(first.timesteps):
        ax = axes[0][i]
        for label, analysis in analyses.items():
            if analysis.timesteps != first.timesteps:
                raise ValueError(f"`analyses[{label!r}]` has timesteps {analysis.timesteps}, not {first.timesteps}.")
            ax.plot(range(len(analysis.layers)), analysis.high_frequency()[i], marker=".", label=label)
        ax.set_title(f"t = {t}", fontsize=9)
        ax.set_xlabel("layer (input -> output)", fontsize=8)
    axes[0][0].set_ylabel("rel. log amplitude at pi")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "high-frequency amplitude per layer, per expert")
    return _save(fig, path)


def save_image_grid(images, path: str | os.PathLike, columns: int | None = None, scale: int = 1) -> str:
    """Tile `images` into one PNG at `path` (written atomically) with `diffusers.utils.make_image_grid`; returns `path`.

    `images`: any form [`~diffusers_experts.evaluation.to_uint8_images`] takes (uint8 or [0, 1] floats, channels first
    or last, as pipelines return them; a list of PIL images). `columns` defaults to `ceil(sqrt(n))`; missing tiles of
    the last row are black; `scale` enlarges the grid by pixel repetition. Grey images give a grey PNG.
    """
    x = to_uint8_images(images, "images")
    if x.shape[0] == 0:
        raise ValueError("`images` is empty.")
    n, channels, height, width = x.shape
    columns = min(columns or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / columns)
    tiles = [Image.fromarray(image.permute(1, 2, 0).squeeze(-1).numpy()) for image in x]
    tiles += [Image.new(tiles[0].mode, (width, height))] * (rows * columns - n)
    grid = make_image_grid(tiles, rows=rows, cols=columns)  # always RGB
    if channels == 1:
        grid = grid.convert("L")  # exact: the three channels of a grey tile are equal
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    with atomic_file(path) as tmp:
        grid.save(tmp)
    return os.fspath(path)
