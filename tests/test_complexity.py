"""Params and MACs: hand counts for convolution + attention, diffusers attention, iU-Net attention, mixtures."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_iunet, tiny_mixture, tiny_unet
from diffusers_experts import ExpertMixtureUNet
from diffusers_experts.evaluation import (
    count_parameters,
    expert_macs,
    measure_macs,
    mixture_macs_per_call,
    mixture_macs_schedule,
)


class ConvAttention(nn.Module):
    """conv 3x3 -> tokens -> qkv projection -> 2-head SDPA -> output projection -> conv 1x1."""

    def __init__(self, c_in=3, channels=8, heads=2, c_out=3):
        super().__init__()
        self.heads = heads
        self.conv_in = nn.Conv2d(c_in, channels, 3, padding=1)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.conv_out = nn.Conv2d(channels, c_out, 1)

    def forward(self, sample, timestep, class_labels=None):
        h = self.conv_in(sample)
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in self.qkv(tokens).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        h = self.out(attended).transpose(1, 2).reshape(b, c, height, width)
        return self.conv_out(h)


def test_conv_attention_matches_hand_count():
    b, c_in, c, heads, c_out, hw = 2, 3, 8, 2, 3, 6
    model = ConvAttention(c_in, c, heads, c_out)
    tokens = hw * hw
    head_dim = c // heads
    conv_in = b * tokens * c * c_in * 9
    qkv = b * tokens * c * 3 * c
    attention = b * heads * tokens * tokens * (head_dim + head_dim)  # QK^T and AV
    out = b * tokens * c * c
    conv_out = b * tokens * c_out * c
    expected = conv_in + qkv + attention + out + conv_out
    assert measure_macs(model, torch.randn(b, c_in, hw, hw), 0) == expected
    # PyTorch's own counter misses the CPU attention kernel: exactly the attention term is missing
    plain = FlopCounterMode(display=False)
    with torch.no_grad(), plain:
        model(torch.randn(b, c_in, hw, hw), 0)
    assert plain.get_total_flops() // 2 == expected - attention


def _plain_macs(model, sample, timestep):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(sample, timestep)
    return counter.get_total_flops() // 2


def test_unet2d_attention_counted():
    # tiny_unet: attention at 8x8 (second stage, 32 channels, head dim 8 -> 4 heads): 1 down + 1 mid + 2 up layers
    model, sample = tiny_unet(), torch.randn(2, 3, 16, 16)
    attention = 4 * (2 * 4 * 64 * 64 * (8 + 8))
    assert measure_macs(model, sample, 10) - _plain_macs(model, sample, 10) == attention


def test_iunet_attention_counted():
    # tiny_iunet (16 / 32 channels, head dim 8, high ratios 0.75 / 0.469, attention pooled 2x in both stages):
    # stage-1 iFormer: 4 attention channels = 1 head of 4 on an 8x8 map; stage-2 iFormer: 17 = 2 heads of 9 on 4x4;
    # the middle and the 2 decoder layers of stage 2: self-attention over 32 channels = 4 heads of 8 at 8x8.
    model, sample = tiny_iunet(), torch.randn(2, 3, 16, 16)
    attention = 2 * 1 * 64 * 64 * (4 + 4) + 2 * 2 * 16 * 16 * (9 + 9) + 3 * (2 * 4 * 64 * 64 * (8 + 8))
    assert measure_macs(model, sample, 10) - _plain_macs(model, sample, 10) == attention


def test_macs_scale_with_batch_and_parameters_counted():
    model = tiny_iunet()
    one = measure_macs(model, torch.randn(1, 3, 16, 16), 5)
    assert measure_macs(model, torch.randn(3, 3, 16, 16), 5) == 3 * one
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    model.conv_in.requires_grad_(False)
    frozen = sum(p.numel() for p in model.conv_in.parameters())
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - frozen


def test_mixture_counts_only_experts_that_run():
    small, large = tiny_iunet(0), tiny_unet(1)
    mixture = ExpertMixtureUNet.from_experts([small, large], boundaries=[500], routing="hard").eval()
    sample = torch.randn(2, 3, 16, 16)
    m_small, m_large = (measure_macs(m, sample[:1], 0) for m in (small, large))
    assert m_small != m_large
    assert measure_macs(mixture, sample, 100) == 2 * m_small
    assert measure_macs(mixture, sample, 900) == 2 * m_large
    assert measure_macs(mixture, sample, torch.tensor([100, 900])) == m_small + m_large
    assert expert_macs(mixture, (1, 3, 16, 16)) == [m_small, m_large]
    assert count_parameters(mixture) == count_parameters(small) + count_parameters(large)

    # schedule average: hard routing, 3 of 5 steps on the large expert
    timesteps = [900, 700, 500, 300, 100]
    assert mixture_macs_schedule(mixture, timesteps, (1, 3, 16, 16)) == [m_large] * 3 + [m_small] * 2
    assert mixture_macs_per_call(mixture, timesteps, (1, 3, 16, 16)) == pytest.approx((3 * m_large + 2 * m_small) / 5)


def test_blended_mixture_runs_both_experts_in_the_overlap():
    mixture = tiny_mixture(2, routing="linear", blend_width=200.0)
    one = expert_macs(mixture, (1, 3, 16, 16))
    # linear ramp of width 200 around 500: both experts between 400 and 600, one outside
    assert mixture_macs_schedule(mixture, [950, 550, 450, 50], (1, 3, 16, 16)) == [
        one[1],
        one[0] + one[1],
        one[0] + one[1],
        one[0],
    ]
    assert measure_macs(mixture, torch.randn(1, 3, 16, 16), 550) == one[0] + one[1]


def test_bad_inputs():
    with pytest.raises(TypeError, match="`model`"):
        count_parameters("unet")
    with pytest.raises(ValueError, match="`sample`"):
        measure_macs(tiny_unet(), torch.randn(3, 16, 16), 0)
    with pytest.raises(TypeError, match="`mixture`"):
        mixture_macs_per_call(tiny_unet(), [1, 2], (1, 3, 16, 16))
    with pytest.raises(ValueError, match="`sample_shape`"):
        mixture_macs_per_call(tiny_mixture(2), [1, 2], (3, 16, 16))
    with pytest.raises(ValueError, match="`timesteps`"):
        mixture_macs_per_call(tiny_mixture(2), [], (1, 3, 16, 16))
