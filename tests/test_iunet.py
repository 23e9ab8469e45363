"""IUNet2DModel: MEME's iU-Net behaves like a native diffusers model, keeps its attention at any width, gives every
expert its own architecture and reproduces the paper's Table-4 parameter counts."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_iunet
from diffusers_experts import IUNet2DModel, meme_expert_config, meme_high_ratios
from diffusers_experts.evaluation import count_parameters
from diffusers_experts.models.iformer import (
    AttentionBlock2D,
    IFormerBlock,
    MultiHeadSelfAttention2D,
    _max_pool_proj,
    attention_heads,
    max_pool_3x3,
    split_channels,
)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_output_shape_scalar_and_per_sample_timesteps():
    model = tiny_iunet()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out_scalar = model(x, 10).sample
        out_tensor = model(x, torch.tensor(10)).sample
        out_per_sample = model(x, torch.tensor([10, 10, 10])).sample
        tup = model(x, 10, return_dict=False)
    assert out_scalar.shape == x.shape
    torch.testing.assert_close(out_scalar, out_tensor)
    torch.testing.assert_close(out_scalar, out_per_sample)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out_scalar)


def test_deterministic_and_batch_independent():
    model = tiny_iunet()
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([1, 200, 500, 999])
    with torch.no_grad():
        full = model(x, t).sample
        again = model(x, t).sample
        halves = torch.cat([model(x[:2], t[:2]).sample, model(x[2:], t[2:]).sample])
        single = model(x[1:2], t[1:2]).sample
    assert torch.equal(full, again)
    torch.testing.assert_close(full, halves, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[1:2], single, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[0], full[3])  # the timestep matters


def test_save_load_round_trip(tmp_path):
    model = tiny_iunet(num_class_embeds=4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = IUNet2DModel.from_pretrained(tmp_path).eval()
    assert list(loaded.config.high_ratios) == list(model.config.high_ratios)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(model(x, t, y).sample, loaded(x, t, y).sample)


def test_gradients_flow_with_and_without_checkpointing():
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 600])
    grads = []
    for checkpointing in (False, True):
        model = tiny_iunet().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.is_gradient_checkpointing
        model(x, t).sample.pow(2).mean().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == []
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_class_conditioning():
    model = tiny_iunet(num_class_embeds=3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = model(x, 50, class_labels=torch.tensor([0, 0])).sample
        b = model(x, 50, class_labels=torch.tensor([1, 1])).sample
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="class_labels.*must be given"):
        model(x, 50)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_iunet()(x, 50, class_labels=torch.tensor([0, 1]))


def test_sample_size_must_be_divisible_by_downsampling():
    with pytest.raises(ValueError, match="sample_size.*=30.*divisible by the total downsampling factor 4"):
        IUNet2DModel(sample_size=30, block_out_channels=(8, 16, 16), norm_num_groups=8, attention_head_dim=8)
    model = tiny_iunet()
    with pytest.raises(ValueError, match="divisible by the total downsampling factor 2"):
        model(torch.randn(1, 3, 15, 16), 1)


def test_bad_config():
    with pytest.raises(ValueError, match="high_ratios.*one value in \\[0, 1\\] per stage \\(2\\)"):
        IUNet2DModel(block_out_channels=(8, 16), norm_num_groups=8, high_ratios=(0.5,))
    with pytest.raises(ValueError, match="norm_num_groups"):
        IUNet2DModel(block_out_channels=(12, 16), norm_num_groups=8)
    with pytest.raises(ValueError, match="high_ratio"):
        split_channels(16, 1.5, 8)


def test_iformer_channel_split_and_extremes():
    assert split_channels(64, 0.75, 16) == (48, 16)
    assert split_channels(64, 1.0, 16) == (64, 0)
    assert split_channels(64, 0.0, 16) == (0, 64)
    assert split_channels(16, 0.75) == (12, 4)  # 4 attention channels: one head, not zero heads of 16
    assert split_channels(8, 0.99) == (7, 1) and split_channels(8, 0.01) == (1, 7)  # both mixers keep a channel
    with pytest.raises(ValueError, match=r"`high_ratio`=0.5.*`channels`=1"):
        split_channels(1, 0.5)
    temb = torch.randn(2, 32)
    x = torch.randn(2, 16, 8, 8)
    for ratio in (0.0, 0.5, 1.0):
        block = IFormerBlock(16, 32, ratio, attention_head_dim=8, pool_size=2, norm_num_groups=8)
        assert block(x, temb).shape == x.shape
    conv_only = IFormerBlock(16, 32, 1.0, attention_head_dim=8, norm_num_groups=8)
    assert conv_only.low_mixer is None


def test_meme_high_ratios_follow_the_paper_rule():
    table = [meme_high_ratios(4, k, 4) for k in range(4)]
    for ratios in table:
        assert all(a > b for a, b in zip(ratios, ratios[1:]))  # more attention with depth
    for k in range(3):  # decreases faster for experts on larger t
        assert all(lo >= hi for lo, hi in zip(table[k], table[k + 1]))
        assert table[k][-1] > table[k + 1][-1]
    assert table[0] == (0.75, 0.5625, 0.4219, 0.3164)
    assert table[3] == (0.75, 0.375, 0.1875, 0.0938)
    config = meme_expert_config(3, 4, block_out_channels=(16, 32), norm_num_groups=8)
    assert config["high_ratios"] == (0.75, 0.375)
    with pytest.raises(ValueError, match=r"expert.*\[0, 3\]"):
        meme_high_ratios(4, 4, 4)


def test_lora_through_peft_adapter_mixin():
    from peft import LoraConfig

    model = tiny_iunet()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    with torch.no_grad():
        before = model(x, t).sample
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_qkv", "to_out", "fuse_proj"], init_lora_weights=True)
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t).sample, before)  # LoRA B starts at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
        assert not torch.allclose(model(x, t).sample, before)
    model.disable_adapters()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t).sample, before)


# ---------------------------------------------------------------------------------------------- split rules (MEME)


def _iformer_blocks(model):
    return [m for m in model.modules() if isinstance(m, IFormerBlock)]


def _stage_splits(model):
    """`(C_h, C_l)` of the last iFormer block of each encoder stage."""
    blocks = [b for name, b in model.named_modules() if isinstance(b, IFormerBlock) and name.startswith("down_layers")]
    per_stage = len(blocks) // len(model.config.block_out_channels)
    return [(b.high_channels, b.low_channels) for b in blocks[per_stage - 1 :: per_stage]]


@pytest.mark.parametrize("channels", [2, 3, 4, 5, 8, 12, 16, 24, 32, 64, 128, 384, 512])
@pytest.mark.parametrize("head_dim", [4, 8, 16, 32, 64])
def test_attention_never_disappears_and_heads_follow_from_the_split(channels, head_dim):
    for ratio in (0.001, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999):
        high, low = split_channels(channels, ratio)
        assert high >= 1 and low >= 1 and high + low == channels
        assert low == min(max(math.floor(channels * (1 - ratio) + 0.5), 1), channels - 1)
        heads, head_size = attention_heads(low, head_dim)
        assert heads == max(1, math.floor(low / head_dim + 0.5)) and heads * head_size >= low > heads * (head_size - 1)
        mixer = MultiHeadSelfAttention2D(low, head_dim)
        assert mixer.to_qkv.in_features == low and mixer.to_qkv.out_features == 3 * heads * head_size


def test_narrow_model_keeps_attention_in_every_iformer_block():
    # v0.1 rounded C_l to whole heads of 32 channels: this model had no attention module at all
    model = IUNet2DModel(block_out_channels=(16, 32), norm_num_groups=8)
    blocks = _iformer_blocks(model)
    assert blocks and all(b.low_mixer is not None for b in blocks)
    assert [(b.low_channels, b.low_mixer.num_heads, b.low_mixer.head_size) for b in blocks] == [(4, 1, 4), (17, 1, 17)]


def _demo_config(name="meme_mnist_demo.json"):
    with open(os.path.join(ROOT, "examples", "configs", name)) as f:
        return json.load(f)


# the widths whose experts must differ: the demo's, benchmarks/quality.py's small experts (width 8, head dim 8;
# --quick: head dim 4; model_configs(): (w // 2, 3 * w // 2, 2 * w) with 4 groups below width 16) and MEME-S
EXPERT_WIDTHS = {
    "demo-width": _demo_config(),
    "demo": _demo_config("meme_mnist_small.json"),  # the small experts `make demo` trains
    "benchmark": dict(block_out_channels=(4, 12, 16), layers_per_block=1, attention_head_dim=8, norm_num_groups=4),
    "benchmark-quick": dict(
        block_out_channels=(4, 12, 16), layers_per_block=1, attention_head_dim=4, norm_num_groups=4
    ),
    "meme-s": dict(block_out_channels=(128, 256, 384, 512), layers_per_block=2, attention_head_dim=32),
}


@pytest.mark.parametrize("name", list(EXPERT_WIDTHS))
def test_convolution_share_strictly_decreases_with_the_expert_where_the_ratios_differ(name):
    config = EXPERT_WIDTHS[name]
    with torch.device("meta"):
        experts = [IUNet2DModel(**meme_expert_config(k, 4, in_channels=1, out_channels=1, **config)) for k in range(4)]
    ratios = [e.config.high_ratios for e in experts]
    splits = [_stage_splits(e) for e in experts]
    for stage in range(len(config["block_out_channels"])):
        for k in range(3):
            high, next_high = splits[k][stage][0], splits[k + 1][stage][0]
            if ratios[k][stage] > ratios[k + 1][stage]:
                assert high > next_high, (name, stage, k, splits)
            else:
                assert high == next_high
    for expert_splits in splits:  # and within each expert, attention grows with depth
        shares = [low / (high + low) for high, low in expert_splits]
        assert shares == sorted(shares)
    # 4 experts, 4 architectures
    assert len({tuple(s) for s in splits}) == 4
    assert len({count_parameters(e) for e in experts}) == 4


def test_demo_experts_realised_splits():
    with torch.device("meta"):
        experts = [IUNet2DModel(**meme_expert_config(k, 4, **_demo_config())) for k in range(4)]
    assert [_stage_splits(e) for e in experts] == [
        [(12, 4), (18, 14), (27, 37)],
        [(12, 4), (16, 16), (21, 43)],
        [(12, 4), (14, 18), (16, 48)],
        [(12, 4), (12, 20), (12, 52)],
    ]


# -------------------------------------------------------------------------------------------- layout (MEME Table 4)

PAPER_TABLE_4_M = (82.56, 82.85, 83.11, 83.32)  # iU-LDM-S experts 0..3 (MEME appendix, Table 4)
MEME_S = dict(sample_size=64, block_out_channels=(128, 256, 384, 512), layers_per_block=2, attention_head_dim=32)


def test_meme_s_parameter_counts_reproduce_table_4():
    with torch.device("meta"):  # no memory, no initialisation: ~0.1 s for four 83 M-parameter models
        counts = [count_parameters(IUNet2DModel(**meme_expert_config(k, 4, **MEME_S))) / 1e6 for k in range(4)]
    for count, paper in zip(counts, PAPER_TABLE_4_M):
        assert abs(count / paper - 1) < 0.03, (counts, PAPER_TABLE_4_M)
    assert counts == sorted(counts) and len(set(counts)) == 4  # more attention, more parameters, as in the paper
    assert [round(c, 2) for c in counts] == [82.77, 82.99, 83.19, 83.36]


def test_ldm_s_baseline_is_the_papers_89_5_m():
    # the same LDM-S U-Net with ResNet + attention encoder stages (MEME Table 3: 89.5 M)
    from diffusers import UNet2DModel

    with torch.device("meta"):
        unet = UNet2DModel(
            sample_size=64,
            block_out_channels=(128, 256, 384, 512),
            layers_per_block=2,
            down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
            up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",),
            attention_head_dim=32,
        )
    assert round(count_parameters(unet) / 1e6, 1) == 89.5


def _kinds(layer):
    return [type(block).__name__ for block in layer]


def test_layout_one_iformer_and_one_resnet_per_encoder_stage():
    with torch.device("meta"):
        model = IUNet2DModel(**MEME_S)
    assert [_kinds(layer) for layer in model.down_layers] == [["ResnetBlock2D"], ["IFormerBlock"]] * 4
    assert _kinds(model.mid_block) == ["ResnetBlock2D", "AttentionBlock2D", "ResnetBlock2D"]
    assert [_kinds(layer) for layer in model.up_layers] == [["ResnetBlock2D", "AttentionBlock2D"]] * 9 + [
        ["ResnetBlock2D"]
    ] * 3
    assert model.config.up_block_types == ("AttnUpBlock2D",) * 3 + ("UpBlock2D",)
    # one-layer stages hold both blocks, so every stage keeps its iFormer block
    small = tiny_iunet(up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type="IFormerMidBlock2D")
    assert [_kinds(layer) for layer in small.down_layers] == [["ResnetBlock2D", "IFormerBlock"]] * 2
    assert _kinds(small.mid_block) == ["ResnetBlock2D", "IFormerBlock", "ResnetBlock2D"]
    assert all(_kinds(layer) == ["ResnetBlock2D"] for layer in small.up_layers)
    with torch.no_grad():
        assert small(torch.randn(1, 3, 16, 16), 3).sample.shape == (1, 3, 16, 16)


def test_layout_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"`up_block_types`.*'UpBlock2D', 'AttnUpBlock2D'.*\('CrossAttnUpBlock2D',"):
        tiny_iunet(up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="`mid_block_type`.*'UNetMidBlock2D', 'IFormerMidBlock2D'"):
        tiny_iunet(mid_block_type="UNetMidBlock2DCrossAttn")
    with pytest.raises(ValueError, match="`mid_high_ratio`=0.5.*IFormerMidBlock2D"):
        tiny_iunet(mid_high_ratio=0.5)
    with pytest.raises(ValueError, match="`layers_per_block`"):
        tiny_iunet(layers_per_block=0)


def test_configs_saved_by_v0_1_raise_a_clear_error(tmp_path):
    tiny_iunet().save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("up_block_types", "mid_block_type"):
        config.pop(key)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="saved by diffusers-experts 0.1.*Table 4"):
        IUNet2DModel.from_pretrained(tmp_path)
    # a hand-written model config (no `_diffusers_version`) still loads, with the new defaults
    partial = {"block_out_channels": [16, 32], "norm_num_groups": 8, "layers_per_block": 1}
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    assert IUNet2DModel.load_config(tmp_path / "partial.json") == partial


# ------------------------------------------------------------------------------------------ iFormer block equations


def _reference_iformer(block, x, temb):
    """MEME Eqs. 4-8 written plainly on NCHW maps with the block's own weights."""
    conv1x1 = lambda t, linear: F.conv2d(t, linear.weight[:, :, None, None], linear.bias)  # noqa: E731
    scale, shift = block.time_emb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
    h = block.norm1(x) * (1 + scale) + shift
    x_h1, x_h2, x_l = torch.split(h, [block.high_channels_1, block.high_channels_2, block.low_channels], dim=1)
    outputs = []
    if block.high_channels_1:
        outputs.append(conv1x1(F.max_pool2d(x_h1, 3, 1, 1), block.max_pool_proj))  # Eq. 4
    if block.high_channels_2:
        outputs.append(block.dw_conv(conv1x1(x_h2, block.dw_proj)))  # Eq. 5
    if block.low_channels:  # Eq. 6
        mixer = block.low_mixer
        pooled = F.avg_pool2d(x_l, mixer.pool_size) if mixer.pool_size > 1 else x_l
        b, c, ph, pw = pooled.shape
        q, k, v = (
            mixer.to_qkv(pooled.flatten(2).transpose(1, 2))
            .view(b, ph * pw, 3, mixer.num_heads, mixer.head_size)
            .permute(2, 0, 3, 1, 4)
        )
        weights = (q @ k.transpose(-1, -2) / math.sqrt(mixer.head_size)).softmax(-1)
        attended = mixer.to_out((weights @ v).transpose(1, 2).flatten(2)).transpose(1, 2).reshape(b, c, ph, pw)
        outputs.append(F.interpolate(attended, size=x_l.shape[-2:], mode="bilinear", align_corners=False))
    y_c = torch.cat(outputs, dim=1)  # Eq. 7
    x = x + conv1x1(y_c + block.fuse_dw_conv(y_c), block.fuse_proj)  # Eq. 8
    hidden = F.gelu(conv1x1(block.norm2(x), block.ff[0]))
    return x + conv1x1(hidden, block.ff[3])


@pytest.mark.parametrize(
    "channels, size, ratio, pool", [(16, 16, 0.75, 2), (24, 8, 0.375, 1), (16, 8, 0.0, 2), (16, 8, 1.0, 1)]
)
def test_iformer_block_computes_the_papers_equations(channels, size, ratio, pool):
    torch.manual_seed(0)
    block = IFormerBlock(channels, 32, ratio, attention_head_dim=8, pool_size=pool, norm_num_groups=8).double()
    x, temb = torch.randn(2, channels, size, size, dtype=torch.double), torch.randn(2, 32, dtype=torch.double)
    expected = _reference_iformer(block, x, temb)
    torch.testing.assert_close(block(x, temb), expected)
    # without autograd too (the block then sums in place into its own intermediates, never into its input)
    x_before = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(block(x, temb), expected)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)
    # gradients too (the block runs on channels-last tokens inside)
    x.requires_grad_(True)
    grads = [
        torch.autograd.grad(f(block, x, temb).square().sum(), [x, block.fuse_proj.weight])
        for f in (
            lambda b, x, t: b(x, t),
            _reference_iformer,
        )
    ]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_attention_block_is_ldm_self_attention():
    torch.manual_seed(0)
    block = AttentionBlock2D(32, attention_head_dim=8, norm_num_groups=8)
    x = torch.randn(2, 32, 4, 4)
    n = block.group_norm(x).flatten(2).transpose(1, 2)
    q, k, v = block.attention.to_qkv(n).view(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected = block.attention.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(block(x), x + expected.transpose(1, 2).reshape(2, 32, 4, 4))


def test_max_pool_without_autograd_equals_torch_max_pool():
    x = torch.randn(3, 5, 7, 6)
    x[0, 0] = 0.0  # flat regions (ties)
    x[1, 1, 2:5, 1:4] = float("-inf")
    with torch.no_grad():
        torch.testing.assert_close(max_pool_3x3(x), F.max_pool2d(x, 3, 1, 1), rtol=0, atol=0)
    torch.testing.assert_close(max_pool_3x3(x.requires_grad_()), F.max_pool2d(x, 3, 1, 1))


def test_max_pool_branch_with_autograd_equals_torch_max_pool_values_and_gradients():
    """With autograd the max-pool branch pools with the batch folded into the channels: same values, and the gradient
    goes to the same (first) maximum of each window, ties included."""
    torch.manual_seed(0)
    tokens = torch.randn(3, 7, 6, 16)
    tokens[0, :3, :3, :] = 0.5  # flat regions: ties in every window
    tokens[1, 2:5, 1:4, 6] = float("-inf")  # a window of -inf only
    proj = torch.nn.Linear(5, 5)
    grad = torch.randn(3, 7, 6, 5)
    x = tokens.clone().requires_grad_(True)
    ours = _max_pool_proj(x[..., 4:9], proj)
    ours.backward(grad)
    y = tokens.clone().requires_grad_(True)
    reference = proj(F.max_pool2d(y[..., 4:9].permute(0, 3, 1, 2), 3, 1, 1).permute(0, 2, 3, 1))
    reference.backward(grad)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)
    assert (x.grad[..., :4] == 0).all() and (x.grad[..., 9:] == 0).all()


@pytest.mark.parametrize("up_block_types", [None, ("AttnUpBlock2D", "AttnUpBlock2D")])
def test_memory_formats_change_speed_not_values(up_block_types):
    """The blocks return channels-last memory where it is faster (attention blocks always, iFormer blocks without
    autograd); the model's output is NCHW-contiguous and the same with and without autograd."""
    torch.manual_seed(0)
    model = IUNet2DModel(
        sample_size=8,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        attention_head_dim=8,
        layers_per_block=1,
        up_block_types=up_block_types,
    ).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        no_grad = model(x, t).sample
    with_grad = model(x, t).sample
    assert no_grad.is_contiguous() and with_grad.is_contiguous()
    torch.testing.assert_close(no_grad, with_grad.detach())

    channels_last = lambda t: t.is_contiguous(memory_format=torch.channels_last)  # noqa: E731
    iformer, attention = model.down_layers[1][-1], model.mid_block[1]
    h, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 64)
    assert channels_last(attention(h)) and not h.is_contiguous(memory_format=torch.channels_last)
    assert iformer(h, emb).is_contiguous()
    with torch.no_grad():
        assert channels_last(iformer(h, emb))
