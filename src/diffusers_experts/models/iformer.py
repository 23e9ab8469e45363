"""iFormer block adapted to diffusion (MEME, Fig. 4; Si et al. 2022, "Inception Transformer").

The block splits its `C` channels into a high-frequency part `C_h` and a low-frequency part `C_l` (`C = C_h + C_l`):

    X_h1, X_h2, X_l = split(X)                      # C_h = C_h1 + C_h2
    Y_h1 = FC(MaxPool(X_h1))                        # Eq. 4
    Y_h2 = DConv(FC(X_h2))                          # Eq. 5
    Y_l  = Up(MHSA(AvgPool(X_l)))                   # Eq. 6
    Y_c  = Concat(Y_h1, Y_h2, Y_l)                  # Eq. 7
    Y    = FC(Y_c + DConv(Y_c))                     # Eq. 8 (fusion)

For diffusion, the mixer input is a group-normalized map modulated by the timestep embedding (scale and shift), the
mixer and a feed-forward network sit in residual branches, as in a transformer block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def split_channels(channels: int, high_ratio: float, attention_head_dim: int) -> tuple[int, int]:
    """`(C_h, C_l)` for a block of `channels` with high-frequency share `high_ratio`.

    `C_l` is rounded to whole attention heads of `attention_head_dim` channels; `C_h` takes the rest.
    """
    if not 0.0 <= high_ratio <= 1.0:
        raise ValueError(f"`high_ratio` must lie in [0, 1], got {high_ratio!r}.")
    low = int(round(channels * (1.0 - high_ratio) / attention_head_dim)) * attention_head_dim
    low = min(low, channels - channels % attention_head_dim)
    return channels - low, low


class LowFrequencyMixer(nn.Module):
    """Multi-head self-attention on an average-pooled map, upsampled back (Eq. 6)."""

    def __init__(self, channels: int, attention_head_dim: int, pool_size: int):
        super().__init__()
        self.num_heads = channels // attention_head_dim
        self.pool_size = pool_size
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if self.pool_size > 1:
            pooled = F.adaptive_avg_pool2d(x, (math.ceil(height / self.pool_size), math.ceil(width / self.pool_size)))
        else:
            pooled = x
        pooled_h, pooled_w = pooled.shape[-2:]
        tokens = pooled.flatten(2).transpose(1, 2)  # (B, L, C_l)
        q, k, v = self.to_qkv(tokens).chunk(3, dim=-1)
        q, k, v = (z.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for z in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = self.to_out(attended.transpose(1, 2).flatten(2))
        out = attended.transpose(1, 2).reshape(batch, channels, pooled_h, pooled_w)
        if (pooled_h, pooled_w) != (height, width):
            out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
        return out


class IFormerBlock(nn.Module):
    r"""
    An iFormer block for diffusion denoisers: inception token mixer (convolution / max-pool branches for high
    frequencies, pooled self-attention for low frequencies, fusion) plus a feed-forward network, both residual, with
    the timestep embedding injected as a scale and shift of the normalized input.

    Args:
        channels (`int`): Channels `C` of the input and output.
        temb_channels (`int`): Size of the timestep embedding.
        high_ratio (`float`): Share of channels given to the high-frequency mixer, `C_h / C`, in `[0, 1]`.
        attention_head_dim (`int`, defaults to 32): Channels per attention head of the low-frequency mixer.
        pool_size (`int`, defaults to 1): Average-pooling factor before attention (1 = attention at full resolution).
        norm_num_groups (`int`, defaults to 32): Groups of the group norms.
        norm_eps (`float`, defaults to 1e-5): Epsilon of the group norms.
        ff_mult (`int`, defaults to 4): Hidden width multiplier of the feed-forward network.
        dropout (`float`, defaults to 0.0): Dropout inside the feed-forward network.
    """

    def __init__(
        self,
        channels: int,
        temb_channels: int,
        high_ratio: float,
        attention_head_dim: int = 32,
        pool_size: int = 1,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        ff_mult: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.high_channels, self.low_channels = split_channels(channels, high_ratio, attention_head_dim)
        self.high_channels_1 = self.high_channels // 2
        self.high_channels_2 = self.high_channels - self.high_channels_1

        self.norm1 = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        self.time_emb_proj = nn.Linear(temb_channels, 2 * channels)

        # high-frequency mixer: max-pool + FC branch (Eq. 4), FC + depth-wise conv branch (Eq. 5)
        c1, c2 = self.high_channels_1, self.high_channels_2
        self.max_pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.max_pool_proj = nn.Conv2d(c1, c1, 1) if c1 > 0 else None
        self.dw_proj = nn.Conv2d(c2, c2, 1) if c2 > 0 else None
        self.dw_conv = nn.Conv2d(c2, c2, 3, padding=1, groups=c2) if c2 > 0 else None
        # low-frequency mixer (Eq. 6)
        self.low_mixer = (
            LowFrequencyMixer(self.low_channels, attention_head_dim, pool_size) if self.low_channels > 0 else None
        )
        # fusion (Eq. 8)
        self.fuse_dw_conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.fuse_proj = nn.Conv2d(channels, channels, 1)

        self.norm2 = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        self.ff = nn.Sequential(
            nn.Conv2d(channels, ff_mult * channels, 1),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Conv2d(ff_mult * channels, channels, 1),
        )

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The inception token mixer, Eqs. 4-8."""
        x_h1, x_h2, x_l = torch.split(x, [self.high_channels_1, self.high_channels_2, self.low_channels], dim=1)
        outputs = []
        if self.max_pool_proj is not None:
            outputs.append(self.max_pool_proj(self.max_pool(x_h1)))
        if self.dw_conv is not None:
            outputs.append(self.dw_conv(self.dw_proj(x_h2)))
        if self.low_mixer is not None:
            outputs.append(self.low_mixer(x_l))
        y_c = torch.cat(outputs, dim=1)
        return self.fuse_proj(y_c + self.fuse_dw_conv(y_c))

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time_emb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm1(hidden_states) * (1 + scale) + shift
        hidden_states = hidden_states + self.mix(h)
        return hidden_states + self.ff(self.norm2(hidden_states))
