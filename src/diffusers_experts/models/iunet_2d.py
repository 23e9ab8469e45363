"""IUNet2DModel: MEME's iU-Net (Multi-Architecture Multi-Expert diffusion, AAAI 2024, Sec. "iU-Net Architecture")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .iformer import AttentionBlock2D, IFormerBlock


# MEME per-expert attention schedule (see `meme_high_ratios`)
MEME_FIRST_STAGE_HIGH_RATIO = 0.75
MEME_SLOWEST_DECAY = 0.75  # expert 0, lowest noise: keeps the most convolution in deep stages
MEME_FASTEST_DECAY = 0.5  # expert N-1, highest noise: turns to attention fastest


def meme_high_ratios(num_stages: int, expert: int = 0, num_experts: int = 1) -> tuple[float, ...]:
    r"""
    MEME's per-stage high-frequency shares `C_h / C` for expert `expert` of `num_experts`.

    The paper gives the rule, not closed-form numbers: the share decreases with depth (deeper layers focus on low
    frequencies, so they get more self-attention) and decreases *faster* for experts that handle larger `t` (noisier
    inputs carry only low frequencies). We use a geometric decay per stage:

        high_ratio[k][i] = 0.75 * gamma_k ** i,   gamma_k = 0.75 - 0.25 * k / (N - 1)

    so every expert starts with 3/4 convolution channels in the first stage (as iFormer's first stages do), the
    lowest-noise expert decays by 0.75 per stage and the highest-noise one by 0.5 per stage. With 4 stages:

    | expert (4 experts) | stage 1 | stage 2 | stage 3 | stage 4 |
    |---|---|---|---|---|
    | 0 (t small) | 0.750 | 0.563 | 0.422 | 0.316 |
    | 1 | 0.750 | 0.500 | 0.333 | 0.222 |
    | 2 | 0.750 | 0.438 | 0.255 | 0.149 |
    | 3 (t large) | 0.750 | 0.375 | 0.188 | 0.094 |

    A single model (`num_experts=1`) uses the middle rate, `gamma = 0.625`.
    """
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"`num_experts` must be a positive integer, got {num_experts!r}.")
    if not isinstance(expert, int) or not 0 <= expert < num_experts:
        raise ValueError(f"`expert` must be an integer in [0, {num_experts - 1}], got {expert!r}.")
    if num_experts == 1:
        gamma = (MEME_SLOWEST_DECAY + MEME_FASTEST_DECAY) / 2
    else:
        gamma = MEME_SLOWEST_DECAY - (MEME_SLOWEST_DECAY - MEME_FASTEST_DECAY) * expert / (num_experts - 1)
    return tuple(round(MEME_FIRST_STAGE_HIGH_RATIO * gamma**i, 4) for i in range(num_stages))


def meme_expert_config(expert: int, num_experts: int, **config) -> dict:
    """Config of MEME's iU-Net for expert `expert` of `num_experts`: `config` plus that expert's `high_ratios`.

    Example:
        ```py
        >>> from diffusers_experts import IUNet2DModel, meme_expert_config
        >>> cfg = meme_expert_config(3, 4, sample_size=32, block_out_channels=(32, 64), norm_num_groups=8)
        >>> cfg["high_ratios"]
        (0.75, 0.375)
        >>> model = IUNet2DModel(**cfg)
        ```
    """
    num_stages = len(config.get("block_out_channels", IUNet2DModel.DEFAULT_BLOCK_OUT_CHANNELS))
    return {**config, "high_ratios": meme_high_ratios(num_stages, expert, num_experts)}


UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D", "IFormerMidBlock2D")


def encoder_stage_layout(layers_per_block: int) -> list[tuple[str, ...]]:
    """Block kinds of each layer of an iU-Net encoder stage (one skip connection per layer).

    ResNet and iFormer blocks alternate, ResNet first (it changes the channels): at MEME's depth 2 a stage is one
    ResNet block and one iFormer block (MEME Table 4). A one-layer stage holds both blocks in its layer, so every stage
    keeps its iFormer block.
    """
    if layers_per_block == 1:
        return [("resnet", "iformer")]
    return [("resnet",) if j % 2 == 0 else ("iformer",) for j in range(layers_per_block)]


class IUNet2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    MEME's iU-Net: LDM's U-Net with an iFormer block in every encoder stage. The iFormer block splits its channels
    between convolution (high frequencies) and self-attention (low frequencies), with a per-stage share
    `high_ratios`. Following MEME (after Cao et al. 2022), the blocks are merged *asymmetrically*: each encoder stage
    is one ResNet block and one iFormer block (MEME Table 4; the iFormer block replaces a ResNet + attention pair of
    LDM's encoder), while the middle (ResNet, self-attention, ResNet) and the decoder (ResNet blocks, followed by
    self-attention at the stages of `up_block_types` that say so) are LDM's. Same call signature and output as
    [`~diffusers.UNet2DModel`], so it drops into diffusers pipelines and training loops.

    **Layout.** Each encoder stage has `layers_per_block` layers, each ending in a skip connection: ResNet and iFormer
    blocks alternate, ResNet first (see [`encoder_stage_layout`]); with `layers_per_block=1` the one layer is a ResNet
    block followed by an iFormer block. Each decoder stage has `layers_per_block + 1` ResNet blocks on concatenated
    skips, each followed by self-attention in `"AttnUpBlock2D"` stages, as in `UNet2DModel`.

    **Channel split.** In stage `i` the iFormer block gives `C_l = round(C_i * (1 - high_ratios[i]))` channels to
    self-attention (at least one whenever `high_ratios[i] < 1`, and at least one to convolution whenever
    `high_ratios[i] > 0`), in `max(1, round(C_l / attention_head_dim))` heads of `ceil(C_l / heads)` channels: the
    attention branch never disappears through rounding, and two ratios whose targets differ by a channel or more give
    different architectures.

    **MEME-S (Tables 3 and 4).** LDM's FFHQ U-Net with 128 channels (64x64x3 latents, multipliers 1, 2, 3, 4, depth 2,
    attention at resolutions 32, 16, 8, head channels 32), with an iFormer block in place of a ResNet + attention pair
    in each encoder stage:

        IUNet2DModel(**meme_expert_config(k, 4, sample_size=64, block_out_channels=(128, 256, 384, 512),
                                          layers_per_block=2, attention_head_dim=32))

    (all other arguments at their defaults: `up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",)`,
    `mid_block_type="UNetMidBlock2D"`, `ff_mult=4`, `attention_pool_sizes=(2, 2, 1, 1)`) has 82.77 / 82.99 / 83.19 /
    83.36 M parameters for experts k = 0..3, against the paper's 82.56 / 82.85 / 83.11 / 83.32 M (+0.25 % at most).
    LDM-S, the same U-Net with ResNet + attention encoder stages, is diffusers' `UNet2DModel` with 89.54 M (paper:
    89.5 M).

    Args:
        sample_size (`int`, *optional*):
            Height and width of the input. Must be divisible by `2 ** (len(block_out_channels) - 1)`.
        in_channels (`int`, defaults to 3): Channels of the input sample.
        out_channels (`int`, defaults to 3): Channels of the output.
        block_out_channels (`tuple[int]`, defaults to `(128, 256, 384, 512)`):
            Channels of each stage (MEME-S: 128 with multipliers 1, 2, 3, 4). Each stage but the last downsamples 2x.
        layers_per_block (`int`, defaults to 2): Encoder layers (skip connections) per stage, LDM's "depth".
        high_ratios (`tuple[float]`, *optional*):
            High-frequency share `C_h / C` of the iFormer blocks of each stage, in `[0, 1]` (1 = convolution only,
            0 = attention only). Defaults to [`meme_high_ratios`] for a single model.
        mid_high_ratio (`float`, *optional*):
            Share of the middle iFormer block when `mid_block_type="IFormerMidBlock2D"`; defaults to the last stage's.
        attention_head_dim (`int`, defaults to 32): Channels per attention head (MEME: head channels 32).
        attention_pool_sizes (`tuple[int]`, *optional*):
            Average-pooling factor before the iFormer attention in each stage. Defaults to 2 for the first two stages
            and 1 after, as in iFormer.
        ff_mult (`int`, defaults to 4): Feed-forward width multiplier of the iFormer blocks.
        norm_num_groups (`int`, defaults to 32): Groups of all group norms.
        norm_eps (`float`, defaults to 1e-5): Epsilon of all group norms.
        dropout (`float`, defaults to 0.0): Dropout in ResNet and feed-forward blocks.
        num_class_embeds (`int`, *optional*):
            Number of class embeddings for class-conditional models (reserve one for the null class of classifier-free
            guidance). `None` gives an unconditional model.
        flip_sin_to_cos (`bool`, defaults to `True`), freq_shift (`int`, defaults to 0): Sinusoidal timestep embedding.
        up_block_types (`tuple[str]`, *optional*):
            Decoder stages, deepest first, as in `UNet2DModel`: `"AttnUpBlock2D"` (ResNet blocks each followed by
            self-attention) or `"UpBlock2D"` (ResNet blocks only). Defaults to LDM's placement: attention at every
            stage but the highest-resolution one.
        mid_block_type (`str`, defaults to `"UNetMidBlock2D"`):
            `"UNetMidBlock2D"`: ResNet, self-attention, ResNet (LDM, MEME); `"IFormerMidBlock2D"`: ResNet, iFormer
            (share `mid_high_ratio`), ResNet.

    Example:
        ```py
        >>> import torch
        >>> from diffusers_experts import IUNet2DModel
        >>> model = IUNet2DModel(sample_size=32, block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8)
        >>> model(torch.randn(2, 3, 32, 32), timestep=10).sample.shape
        torch.Size([2, 3, 32, 32])
        ```
    """

    DEFAULT_BLOCK_OUT_CHANNELS = (128, 256, 384, 512)
    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: Sequence[int] = DEFAULT_BLOCK_OUT_CHANNELS,
        layers_per_block: int = 2,
        high_ratios: Sequence[float] | None = None,
        mid_high_ratio: float | None = None,
        attention_head_dim: int = 32,
        attention_pool_sizes: Sequence[int] | None = None,
        ff_mult: int = 4,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        num_class_embeds: int | None = None,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        up_block_types: Sequence[str] | None = None,
        mid_block_type: str = "UNetMidBlock2D",
    ):
        super().__init__()
        # 1. check and complete the config
        num_stages = len(block_out_channels)
        if num_stages < 1:
            raise ValueError(f"`block_out_channels` must name at least one stage, got {block_out_channels!r}.")
        if any(c % norm_num_groups for c in block_out_channels):
            raise ValueError(
                f"Every entry of `block_out_channels` {tuple(block_out_channels)} must be divisible by "
                f"`norm_num_groups`={norm_num_groups}."
            )
        if not isinstance(layers_per_block, int) or layers_per_block < 1:
            raise ValueError(f"`layers_per_block` must be a positive integer, got {layers_per_block!r}.")
        factor = 2 ** (num_stages - 1)
        sizes = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        if sizes is not None and any(s % factor for s in sizes):
            raise ValueError(
                f"`sample_size`={sample_size!r} must be divisible by the total downsampling factor {factor} "
                f"(2 ** (len(block_out_channels) - 1) for {num_stages} stages)."
            )
        if high_ratios is None:
            high_ratios = meme_high_ratios(num_stages)
            self.register_to_config(high_ratios=high_ratios)
        if len(high_ratios) != num_stages or not all(0.0 <= r <= 1.0 for r in high_ratios):
            raise ValueError(
                f"`high_ratios` must hold one value in [0, 1] per stage ({num_stages}), got {tuple(high_ratios)!r}."
            )
        if attention_pool_sizes is None:
            attention_pool_sizes = tuple(2 if i < 2 else 1 for i in range(num_stages))
            self.register_to_config(attention_pool_sizes=attention_pool_sizes)
        if len(attention_pool_sizes) != num_stages or not all(int(p) >= 1 for p in attention_pool_sizes):
            raise ValueError(
                f"`attention_pool_sizes` must hold one integer >= 1 per stage ({num_stages}), "
                f"got {tuple(attention_pool_sizes)!r}."
            )
        if up_block_types is None:
            up_block_types = ("AttnUpBlock2D",) * (num_stages - 1) + ("UpBlock2D",)
            self.register_to_config(up_block_types=up_block_types)
        if len(up_block_types) != num_stages or any(t not in UP_BLOCK_TYPES for t in up_block_types):
            raise ValueError(
                f"`up_block_types` must hold one of {UP_BLOCK_TYPES} per stage ({num_stages}, deepest first), "
                f"got {tuple(up_block_types)!r}."
            )
        if mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"`mid_block_type` must be one of {MID_BLOCK_TYPES}, got {mid_block_type!r}.")
        if mid_block_type == "UNetMidBlock2D" and mid_high_ratio is not None:
            raise ValueError(
                f"`mid_high_ratio`={mid_high_ratio!r} sets the middle iFormer block, but `mid_block_type` is "
                "'UNetMidBlock2D' (ResNet, self-attention, ResNet): pass mid_block_type='IFormerMidBlock2D' or drop "
                "`mid_high_ratio`."
            )
        if mid_high_ratio is None:
            mid_high_ratio = high_ratios[-1]
        self.sample_size = sample_size
        self.gradient_checkpointing = False
        time_embed_dim = block_out_channels[0] * 4

        def resnet(c_in: int, c_out: int) -> ResnetBlock2D:
            return ResnetBlock2D(
                in_channels=c_in,
                out_channels=c_out,
                temb_channels=time_embed_dim,
                groups=norm_num_groups,
                eps=norm_eps,
                dropout=dropout,
            )

        def iformer(channels: int, high_ratio: float, pool_size: int) -> IFormerBlock:
            return IFormerBlock(
                channels,
                time_embed_dim,
                high_ratio,
                attention_head_dim=attention_head_dim,
                pool_size=int(pool_size),
                norm_num_groups=norm_num_groups,
                norm_eps=norm_eps,
                ff_mult=ff_mult,
                dropout=dropout,
            )

        def attention(channels: int) -> AttentionBlock2D:
            return AttentionBlock2D(channels, attention_head_dim, norm_num_groups=norm_num_groups, norm_eps=norm_eps)

        # 2. time and class embeddings
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)
        self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds else None

        # 3. encoder: per stage, ResNet and iFormer blocks (MEME Table 4), one skip connection per layer
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.down_layers = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_channels = [block_out_channels[0]]
        channels = block_out_channels[0]
        for i, stage_channels in enumerate(block_out_channels):
            for kinds in encoder_stage_layout(layers_per_block):
                blocks = []
                for kind in kinds:
                    if kind == "resnet":
                        blocks.append(resnet(channels, stage_channels))
                    else:
                        blocks.append(iformer(stage_channels, high_ratios[i], attention_pool_sizes[i]))
                    channels = stage_channels
                self.down_layers.append(nn.ModuleList(blocks))
                skip_channels.append(channels)
            if i < num_stages - 1:
                self.downsamplers.append(
                    Downsample2D(channels, use_conv=True, out_channels=channels, padding=1, name="op")
                )
                skip_channels.append(channels)

        # 4. middle: ResNet, self-attention (or iFormer), ResNet
        if mid_block_type == "UNetMidBlock2D":
            mid_mixer = attention(channels)
        else:
            mid_mixer = iformer(channels, mid_high_ratio, attention_pool_sizes[-1])
        self.mid_block = nn.ModuleList([resnet(channels, channels), mid_mixer, resnet(channels, channels)])

        # 5. decoder: ResNet blocks on concatenated skips, each followed by self-attention in attention stages
        self.up_layers = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        stages = list(reversed(list(enumerate(block_out_channels))))
        for (i, stage_channels), up_block_type in zip(stages, up_block_types):
            for _ in range(layers_per_block + 1):
                blocks = [resnet(channels + skip_channels.pop(), stage_channels)]
                if up_block_type == "AttnUpBlock2D":
                    blocks.append(attention(stage_channels))
                self.up_layers.append(nn.ModuleList(blocks))
                channels = stage_channels
            if i > 0:
                self.upsamplers.append(Upsample2D(channels, use_conv=True, out_channels=channels))

        # 6. output
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """`ConfigMixin.load_config`, refusing configs saved by diffusers-experts 0.1, whose weights belong to another
        layout (an iFormer block after every encoder ResNet, a decoder without attention)."""
        outputs = super().load_config(*args, **kwargs)
        config = outputs[0] if isinstance(outputs, tuple) else outputs
        if "_diffusers_version" in config and "up_block_types" not in config:
            raise ValueError(
                "This IUNet2DModel was saved by diffusers-experts 0.1 (its config has no `up_block_types`): its "
                "weights belong to the 0.1 layout (an iFormer block after every encoder ResNet block, an iFormer "
                "middle, no attention in the decoder), which was replaced by MEME's Table 4 layout in 0.2 and cannot "
                "be loaded into it. Load it with diffusers-experts==0.1, or retrain."
            )
        return outputs

    def _block(self, block: nn.Module, hidden_states: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Run one block, through gradient checkpointing when it is enabled and gradients are on."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, hidden_states, emb)
        return block(hidden_states, emb)

    def _layer(self, layer: nn.ModuleList, hidden_states: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Run the blocks of one layer in order."""
        for block in layer:
            hidden_states = self._block(block, hidden_states, emb)
        return hidden_states

    def _embed(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None) -> torch.Tensor:
        """Timestep (+ class) embedding, one row per sample."""
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        if timesteps.shape[0] not in (1, sample.shape[0]):
            raise ValueError(
                f"`timestep` must be a scalar or hold one value per sample ({sample.shape[0]}), "
                f"got shape {tuple(timesteps.shape)}."
            )
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(
                    f"`class_labels` must be given: this model is class-conditional "
                    f"(num_class_embeds={self.config.num_class_embeds})."
                )
            emb = emb + self.class_embedding(class_labels).to(dtype=self.dtype)
        elif class_labels is not None:
            raise ValueError(
                "`class_labels` were given, but this model is unconditional (num_class_embeds=None): pass "
                "class_labels=None or build the model with `num_class_embeds`."
            )
        return emb

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        r"""
        Args:
            sample (`torch.Tensor`): Noisy input of shape `(batch, channel, height, width)`.
            timestep (`torch.Tensor` or `float` or `int`): Training timestep, a scalar or one per sample.
            class_labels (`torch.Tensor`, *optional*): Class indices, for class-conditional models only.
            return_dict (`bool`, defaults to `True`): Return a [`~diffusers.models.unets.unet_2d.UNet2DOutput`].

        Returns:
            [`~diffusers.models.unets.unet_2d.UNet2DOutput`] or `tuple` whose first element is the output sample.
        """
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        if sample.shape[-1] % factor or sample.shape[-2] % factor:
            raise ValueError(
                f"`sample` spatial size {tuple(sample.shape[-2:])} must be divisible by the total downsampling "
                f"factor {factor}."
            )
        # 1. time
        emb = self._embed(sample, timestep, class_labels)

        # 2. encoder
        hidden_states = self.conv_in(sample)
        skips = [hidden_states]
        layers = iter(self.down_layers)
        for i in range(len(self.config.block_out_channels)):
            for _ in range(self.config.layers_per_block):
                hidden_states = self._layer(next(layers), hidden_states, emb)
                skips.append(hidden_states)
            if i < len(self.downsamplers):
                hidden_states = self.downsamplers[i](hidden_states)
                skips.append(hidden_states)

        # 3. middle
        hidden_states = self._layer(self.mid_block, hidden_states, emb)

        # 4. decoder
        layers = iter(self.up_layers)
        for i in range(len(self.config.block_out_channels)):
            for _ in range(self.config.layers_per_block + 1):
                hidden_states = torch.cat([hidden_states, skips.pop()], dim=1)
                hidden_states = self._layer(next(layers), hidden_states, emb)
            if i < len(self.upsamplers):
                hidden_states = self.upsamplers[i](hidden_states)

        # 5. output (NCHW memory, whatever the memory format the blocks left the maps in; see `iformer`)
        sample = self.conv_out(self.conv_act(self.conv_norm_out(hidden_states))).contiguous()
        if not return_dict:
            return (sample,)
        return UNet2DOutput(sample=sample)
