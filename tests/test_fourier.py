"""Fourier analysis of feature maps: low-pass vs high-pass ordering, hooks on real models, plots written."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import tiny_iunet, tiny_mixture, tiny_unet
from diffusers_experts.evaluation import (
    attention_shares,
    capture_feature_maps,
    default_fourier_layers,
    fourier_analysis,
    plot_attention_shares,
    plot_fourier,
    plot_fourier_experts,
    plot_routing,
    relative_log_amplitude,
    save_image_grid,
)


def _blur(x):
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="circular"), 3, stride=1)


class LowHigh(nn.Module):
    """Toy denoiser: `low` blurs its input (low-pass), `high` keeps only what the blur removes (high-pass)."""

    def __init__(self):
        super().__init__()
        self.low = nn.Identity()
        self.high = nn.Identity()

    def forward(self, sample, timestep, class_labels=None):
        return self.low(_blur(_blur(sample))) + self.high(sample - _blur(sample))


def test_relative_log_amplitude_orders_low_pass_below_high_pass():
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    low, high = relative_log_amplitude(_blur(_blur(x))), relative_log_amplitude(x - _blur(x))
    assert low.shape == (9,) and low[0] == 0 and high[0] == 0
    assert low[-1] < -2.0 < 1.0 < high[-1]  # damped vs amplified highest frequency
    assert bool((low[1:] < high[1:]).all())
    white = relative_log_amplitude(x)
    assert abs(float(white[-1])) < 0.5  # white noise: flat spectrum


def test_fourier_analysis_orders_hooked_low_and_high_pass_layers():
    result = fourier_analysis(LowHigh(), torch.randn(4, 1, 8, 8), timesteps=[10, 900], layers=["low", "high"])
    assert result.layers == ["low", "high"] and result.resolutions == [8, 8] and result.timesteps == [10, 900]
    for low_value, high_value in result.high_frequency():
        assert low_value < high_value
    assert result.frequencies(0) == pytest.approx([k / 4 * math.pi for k in range(5)])


@pytest.mark.parametrize("make", [tiny_unet, tiny_iunet])
def test_hooks_on_real_models_are_removed(make):
    model = make()
    layers = default_fourier_layers(model)
    assert layers[0] == "conv_in" and "mid_block" in layers
    maps = capture_feature_maps(model, torch.randn(2, 3, 16, 16), 500)
    assert list(maps) == layers
    assert all(m.ndim == 4 and m.shape[0] == 2 for m in maps.values())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    images = torch.randn(2, 3, 16, 16)
    result = fourier_analysis(model, images, [100, 900], seed=3)
    again = fourier_analysis(model, images, [100, 900], seed=3)
    assert len(result.values) == 2 and len(result.values[0]) == len(layers)
    assert again.values == result.values  # same images and seed: same noisy inputs
    assert set(result.to_dict()) == {"timesteps", "layers", "resolutions", "values", "high_frequency"}


def test_default_layers_match_stage_by_stage_across_architectures():
    # same stages (16x16, 8x8): the iU-Net and the UNet2DModel are read at the same resolutions in the same positions
    images = torch.randn(2, 3, 16, 16)
    analyses = {make.__name__: fourier_analysis(make(), images, [500]) for make in (tiny_unet, tiny_iunet)}
    unet, iunet = analyses["tiny_unet"], analyses["tiny_iunet"]
    assert unet.resolutions == iunet.resolutions == [16, 16, 8, 8, 8, 16]
    assert unet.layers == [
        "conv_in",
        "down_blocks.0.resnets.0",
        "down_blocks.1.attentions.0",
        "mid_block",
        "up_blocks.0.attentions.1",
        "up_blocks.1.resnets.1",
    ]
    assert iunet.layers == ["conv_in", "down_layers.0", "down_layers.1", "mid_block", "up_layers.1", "up_layers.3"]
    # deeper iU-Nets and UNets: still one map per stage, taken before the resampler
    deep_unet, deep_iunet = tiny_unet(layers_per_block=2), tiny_iunet(layers_per_block=2)
    maps = [capture_feature_maps(m, images, 500) for m in (deep_unet, deep_iunet)]
    assert [m.shape[-1] for m in maps[0].values()] == [m.shape[-1] for m in maps[1].values()] == [16, 16, 8, 8, 8, 16]
    assert list(maps[1])[1:3] == ["down_layers.1", "down_layers.3"]


def test_fourier_bad_inputs():
    with pytest.raises(ValueError, match="`feature_map`"):
        relative_log_amplitude(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="`timesteps`"):
        fourier_analysis(tiny_unet(), torch.randn(1, 3, 16, 16), [1000])
    with pytest.raises(ValueError, match="`layers`"):
        capture_feature_maps(tiny_unet(), torch.randn(1, 3, 16, 16), 1, layers=["nope"])
    with pytest.raises(ValueError, match="layers"):
        default_fourier_layers(nn.Linear(2, 2))


def _assert_png(path, min_size=(100, 80)):
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        extrema = image.convert("L").getextrema()
        assert extrema[0] < extrema[1]  # not a blank image


def test_plots_are_written_and_non_empty(tmp_path):
    mixture = tiny_mixture(2, routing="sigmoid")
    _assert_png(plot_routing(mixture, tmp_path / "routing.png", num_points=50))

    from diffusers_experts import IUNet2DModel, meme_expert_config

    experts = [
        IUNet2DModel(
            **meme_expert_config(
                k, 4, sample_size=16, block_out_channels=(32, 32, 64), norm_num_groups=8, attention_head_dim=8
            )
        )
        for k in (0, 3)
    ]
    shares = [attention_shares(e) for e in experts]
    assert all(a <= b for a, b in zip(shares[0], shares[0][1:]))  # attention share grows with depth
    assert shares[1][-1] > shares[0][-1]  # and faster for the high-noise expert
    _assert_png(plot_attention_shares(experts, tmp_path / "shares.png"))

    images = torch.randn(2, 3, 16, 16)
    analyses = {f"expert {k}": fourier_analysis(e, images, [100, 900]) for k, e in enumerate(mixture.experts)}
    _assert_png(plot_fourier(analyses["expert 0"], tmp_path / "fourier.png"))
    _assert_png(plot_fourier_experts(analyses, tmp_path / "fourier_experts.png"))
    _assert_png(save_image_grid(torch.rand(5, 1, 8, 8), tmp_path / "grid.png", columns=3), min_size=(24, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fourier.png",
        "fourier_experts.png",
        "grid.png",
        "routing.png",
        "shares.png",
    ]  # no temporary files left behind
    with pytest.raises(TypeError, match="IUNet2DModel"):
        attention_shares(tiny_unet())
