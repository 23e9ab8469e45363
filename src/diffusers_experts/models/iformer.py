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

Inside the block the maps are channels-last tokens `(B, H, W, C)`: every FC is then a plain matrix product
(`nn.Linear`), about twice as fast as a 1x1 convolution of an NCHW map on the CPU, and the depth-wise convolutions and
pooling run on channels-last views. The blocks take and return `(B, C, H, W)` maps like the rest of the U-Net; the
memory format of what they return is a speed choice only (same values): the attention block returns its residual sum
in channels-last memory, as diffusers' attention blocks do, and so does the iFormer block without autograd (the
layers after it then run channels-last too, which made CPU inference of the demo iU-Net about 4 % faster); with
autograd the iFormer block returns NCHW memory, as returning channels-last made CPU training slower.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def split_channels(channels: int, high_ratio: float, attention_head_dim: int | None = None) -> tuple[int, int]:
    r"""
    `(C_h, C_l)`: the channels of a block of `channels` given to the high- and low-frequency mixers.

    `C_l` is `C * (1 - high_ratio)` rounded to the nearest whole channel (halves up), so two ratios whose targets
    differ by one channel or more always give different splits; the attention heads then follow from `C_l` (see
    [`attention_heads`]), so rounding never removes the attention branch. `high_ratio = 1` gives a convolution-only
    block and `high_ratio = 0` an attention-only one; any ratio in between keeps both mixers (`C_l >= 1`,
    `C_h >= 1`). `attention_head_dim` is accepted for backward compatibility and does not change the split (up to
    diffusers-experts 0.1 it rounded `C_l` to whole heads, which could remove the attention branch).

    Example:
        ```py
        >>> split_channels(16, 0.75), split_channels(32, 0.5625), split_channels(32, 0.5)
        ((12, 4), (18, 14), (16, 16))
        ```

    Raises:
        `ValueError`: if `high_ratio` is outside `[0, 1]`, or lies strictly between 0 and 1 while `channels < 2`
            (no way to give both mixers a channel).
    """
    if not 0.0 <= high_ratio <= 1.0:
        raise ValueError(f"`high_ratio` must lie in [0, 1], got {high_ratio!r}.")
    if high_ratio == 1.0:
        return channels, 0
    if high_ratio == 0.0:
        return 0, channels
    if channels < 2:
        raise ValueError(
            f"`high_ratio`={high_ratio!r} asks for both a convolution and an attention branch, which needs at least "
            f"2 channels, got `channels`={channels}. Use high_ratio 0 or 1, or more channels."
        )
    low = min(max(_round_half_up(channels * (1.0 - high_ratio)), 1), channels - 1)
    return channels - low, low


def attention_heads(channels: int, attention_head_dim: int) -> tuple[int, int]:
    r"""
    `(heads, head_size)` of self-attention over `channels` channels: as many heads of about `attention_head_dim`
    channels as fit, at least one:

        heads = max(1, round(channels / attention_head_dim)),   head_size = ceil(channels / heads)

    The query/key/value projections map the `channels` channels to `heads * head_size` (at most `heads - 1` more than
    `channels`) and back, so any channel count gets attention; with `channels` a multiple of `attention_head_dim`
    this is the usual `channels / attention_head_dim` heads of `attention_head_dim`.
    """
    if attention_head_dim < 1:
        raise ValueError(f"`attention_head_dim` must be a positive integer, got {attention_head_dim!r}.")
    heads = max(1, _round_half_up(channels / attention_head_dim))
    return heads, math.ceil(channels / heads)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` map -> contiguous `(B, H, W, C)` tokens (one copy)."""
    return x.permute(0, 2, 3, 1).contiguous()


def _map(tokens: torch.Tensor) -> torch.Tensor:
    """`(B, H, W, C)` tokens -> `(B, C, H, W)` view in channels-last memory (no copy)."""
    return tokens.permute(0, 3, 1, 2)


def max_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 max-pooling with stride 1 and padding 1 of a `(B, C, H, W)` map (MEME Eq. 4's MP). Without autograd it is
    the running maximum of shifted views, many times faster than `F.max_pool2d`'s CPU kernel and exactly equal to it;
    with autograd, `F.max_pool2d` on a channels-last copy."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 3, stride=1, padding=1)
    padded = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(padded[:, :, :-2], padded[:, :, 1:-1]), padded[:, :, 2:])
    return torch.maximum(torch.maximum(rows[..., :-2], rows[..., 1:-1]), rows[..., 2:])


def _max_pool_proj(tokens: torch.Tensor, proj: nn.Module) -> torch.Tensor:
    """`proj(MaxPool(X))` (MEME Eq. 4) of `(B, H, W, C)` tokens, as tokens (with autograd, a strided view).

    Without autograd, [`max_pool_3x3`]. With autograd, the batch is folded into the channels: `F.max_pool2d` of the
    `(1, B * C, H, W)` channels-last map (one copy in) vectorizes over all `B * C` channels and is several times
    faster, forward and backward, than on `(B, C, H, W)` with the few channels of the branch; each map is pooled
    alone, so values and gradient routing are those of [`max_pool_3x3`]. `proj` (per token) then runs on the
    `(H, W, B, C)` tokens as they lie in memory."""
    if not (torch.is_grad_enabled() and tokens.requires_grad):
        return proj(max_pool_3x3(_map(tokens)).permute(0, 2, 3, 1))
    batch, height, width, channels = tokens.shape
    folded = tokens.permute(1, 2, 0, 3).reshape(1, height, width, batch * channels)
    pooled = F.max_pool2d(_map(folded), 3, stride=1, padding=1)  # (1, B * C, H, W), channels-last
    return proj(pooled.permute(0, 2, 3, 1).reshape(height, width, batch, channels)).permute(2, 0, 1, 3)


class MultiHeadSelfAttention2D(nn.Module):
    """Multi-head self-attention over the pixels of a `(B, H, W, C)` token map, optionally on an average-pooled copy
    that is upsampled back (MEME Eq. 6); fused query/key/value projection, `F.scaled_dot_product_attention`."""

    def __init__(self, channels: int, attention_head_dim: int, pool_size: int = 1):
        super().__init__()
        self.num_heads, self.head_size = attention_heads(channels, attention_head_dim)
        inner = self.num_heads * self.head_size
        self.pool_size = pool_size
        self.to_qkv = nn.Linear(channels, 3 * inner)
        self.to_out = nn.Linear(inner, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = tokens.shape
        pooled = tokens
        if self.pool_size > 1:
            if height % self.pool_size == 0 and width % self.pool_size == 0:
                pooled = F.avg_pool2d(_map(tokens), self.pool_size)
            else:
                size = (math.ceil(height / self.pool_size), math.ceil(width / self.pool_size))
                pooled = F.adaptive_avg_pool2d(_map(tokens), size)
            pooled = pooled.permute(0, 2, 3, 1)
        pooled_h, pooled_w = pooled.shape[1:3]
        qkv = self.to_qkv(pooled.reshape(batch, pooled_h * pooled_w, channels))
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_size)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, head_size)
        out = self.to_out(attended.transpose(1, 2).flatten(2)).view(batch, pooled_h, pooled_w, channels)
        if (pooled_h, pooled_w) != (height, width):
            out = F.interpolate(_map(out), size=(height, width), mode="bilinear", align_corners=False)
            out = out.permute(0, 2, 3, 1)
        return out


class AttentionBlock2D(nn.Module):
    r"""
    LDM's spatial self-attention block (the attention of diffusers' `AttnDownBlock2D` / `AttnUpBlock2D` /
    `UNetMidBlock2D`): group norm, multi-head self-attention, residual. Same parameter count as diffusers'
    `Attention` there (fused query/key/value projection).

    Args:
        channels (`int`): Channels of the input and output.
        attention_head_dim (`int`, defaults to 32): Channels per head (see [`attention_heads`]).
        norm_num_groups (`int`, defaults to 32): Groups of the group norm.
        norm_eps (`float`, defaults to 1e-5): Epsilon of the group norm.
    """

    def __init__(self, channels: int, attention_head_dim: int = 32, norm_num_groups: int = 32, norm_eps: float = 1e-5):
        super().__init__()
        self.group_norm = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        self.attention = MultiHeadSelfAttention2D(channels, attention_head_dim)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # attention output first: the sum takes its channels-last memory format, as in diffusers' attention blocks
        return _map(self.attention(_tokens(self.group_norm(hidden_states)))) + hidden_states


class IFormerBlock(nn.Module):
    r"""
    An iFormer block for diffusion denoisers: inception token mixer (convolution / max-pool branches for high
    frequencies, pooled self-attention for low frequencies, fusion) plus a feed-forward network, both residual, with
    the timestep embedding injected as a scale and shift of the normalized input.

    The channel split is [`split_channels`]: `C_l = round(C * (1 - high_ratio))`, at least one channel for each mixer
    when `0 < high_ratio < 1`; the attention heads follow from `C_l` ([`attention_heads`]: about `attention_head_dim`
    channels each, at least one head). The high-frequency channels are halved between the max-pool branch
    (`C_h1 = C_h // 2`) and the depth-wise convolution branch (`C_h2 = C_h - C_h1`; a single high-frequency channel
    goes to the depth-wise branch). The fully-connected layers (FC in Eqs. 4, 5 and 8, the feed-forward network) are
    `nn.Linear` layers on channels-last tokens.

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
        self.high_channels, self.low_channels = split_channels(channels, high_ratio)
        self.high_channels_1 = self.high_channels // 2
        self.high_channels_2 = self.high_channels - self.high_channels_1

        self.norm1 = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        self.time_emb_proj = nn.Linear(temb_channels, 2 * channels)

        # high-frequency mixer: max-pool + FC branch (Eq. 4), FC + depth-wise conv branch (Eq. 5)
        c1, c2 = self.high_channels_1, self.high_channels_2
        self.max_pool_proj = nn.Linear(c1, c1) if c1 > 0 else None
        self.dw_proj = nn.Linear(c2, c2) if c2 > 0 else None
        self.dw_conv = nn.Conv2d(c2, c2, 3, padding=1, groups=c2) if c2 > 0 else None
        # low-frequency mixer (Eq. 6)
        self.low_mixer = (
            MultiHeadSelfAttention2D(self.low_channels, attention_head_dim, pool_size)
            if self.low_channels > 0
            else None
        )
        # fusion (Eq. 8)
        self.fuse_dw_conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.fuse_proj = nn.Linear(channels, channels)

        self.norm2 = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        self.ff = nn.Sequential(
            nn.Linear(channels, ff_mult * channels),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ff_mult * channels, channels),
        )

    def mix(self, tokens: torch.Tensor) -> torch.Tensor:
        """The inception token mixer, Eqs. 4-8, on `(B, H, W, C)` tokens."""
        x_h1, x_h2, x_l = torch.split(tokens, [self.high_channels_1, self.high_channels_2, self.low_channels], dim=-1)
        outputs = []
        if self.max_pool_proj is not None:
            outputs.append(_max_pool_proj(x_h1, self.max_pool_proj))
        if self.dw_conv is not None:
            outputs.append(self.dw_conv(_map(self.dw_proj(x_h2))).permute(0, 2, 3, 1))
        if self.low_mixer is not None:
            outputs.append(self.low_mixer(x_l))
        y_c = torch.cat(outputs, dim=-1)
        # Y_c + DConv(Y_c), summed into the convolution's output (whose backward needs neither)
        return self.fuse_proj(self.fuse_dw_conv(_map(y_c)).permute(0, 2, 3, 1).add_(y_c))

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time_emb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm1(hidden_states), 1 + scale)
        mixed = _map(self.mix(_tokens(h)))
        if torch.is_grad_enabled():  # NCHW memory, as the input's (see the module docstring)
            hidden_states = hidden_states + mixed
            return hidden_states + _map(self.ff(_tokens(self.norm2(hidden_states))))
        hidden_states = mixed + hidden_states  # channels-last memory, as the tokens'
        return hidden_states.add_(_map(self.ff(_tokens(self.norm2(hidden_states)))))
