"""IUNet2DModel: MEME's iU-Net behaves like a native diffusers model."""

import pytest
import torch

from conftest import tiny_iunet
from diffusers_experts import IUNet2DModel, meme_expert_config, meme_high_ratios
from diffusers_experts.models.iformer import IFormerBlock, split_channels


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
