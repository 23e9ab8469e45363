"""LoRAExpert: a named LoRA adapter on a shared frozen base, adapter-only saving, use inside ExpertMixtureUNet."""

import json
import os

import pytest
import torch

from diffusers_experts import ExpertMixtureUNet, LoRAExpert
from diffusers_experts.models.lora_expert import ADAPTER_WEIGHTS_NAME


def _perturb(expert: LoRAExpert, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in expert.adapter_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture
def base_folder(tmp_path, make_unet):
    base = make_unet(0)
    path = tmp_path / "base"
    base.save_pretrained(path)
    return base, str(path)


def test_new_adapter_matches_base_and_experts_stay_independent(base_folder):
    base, path = base_folder
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        reference = base(x, t).sample
    experts = [LoRAExpert.from_base(base, path, adapter_name=f"expert_{k}", rank=4) for k in range(2)]
    assert experts[0].base_model is experts[1].base_model
    with torch.no_grad():
        torch.testing.assert_close(experts[0](x, t).sample, reference)  # LoRA B starts at zero
        _perturb(experts[1], 1)
        torch.testing.assert_close(experts[0](x, t).sample, reference)
        assert not torch.allclose(experts[1](x, t).sample, reference)
    # trainable: both adapters, never the base
    assert all(p.requires_grad for e in experts for p in e.adapter_parameters())
    assert not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
    assert {id(p) for p in experts[0].adapter_parameters()}.isdisjoint(id(p) for p in experts[1].adapter_parameters())


def test_save_is_adapter_only_and_round_trips(base_folder, tmp_path):
    base, path = base_folder
    expert = LoRAExpert.from_base(base, path, adapter_name="expert_0", rank=2)
    _perturb(expert, 0)
    expert.save_pretrained(tmp_path / "lora")
    files = sorted(os.listdir(tmp_path / "lora"))
    assert files == [ADAPTER_WEIGHTS_NAME, "config.json"]
    base_bytes = os.path.getsize(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    assert os.path.getsize(tmp_path / "lora" / ADAPTER_WEIGHTS_NAME) < base_bytes / 2
    config = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert config["base_model_class"] == "diffusers.UNet2DModel" and config["rank"] == 2
    assert config["base_model_name_or_path"] == os.path.abspath(path)

    loaded = LoRAExpert.from_pretrained(tmp_path / "lora")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, expert(x, t).sample)


def test_mixture_of_lora_experts_saves_loads_and_shares_the_base(base_folder, tmp_path):
    base, path = base_folder
    experts = [LoRAExpert.from_base(base, path, adapter_name=f"expert_{k}", rank=2) for k in range(2)]
    for k, expert in enumerate(experts):
        _perturb(expert, k)
    mixture = ExpertMixtureUNet.from_experts(experts, routing="linear").eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    with torch.no_grad():
        expected = mixture(x, t).sample
    mixture.save_pretrained(tmp_path / "mixture")
    loaded = ExpertMixtureUNet.from_pretrained(tmp_path / "mixture")
    assert loaded.experts[0].base_model is loaded.experts[1].base_model  # one base in memory
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, expected)


def test_relative_base_reference_and_iunet_base(tmp_path, make_iunet):
    base = make_iunet(0)
    base.save_pretrained(tmp_path / "bundle" / "base")
    expert = LoRAExpert(
        base_model_name_or_path="../base", base_model_class="diffusers_experts.IUNet2DModel", rank=2, base_model=base
    )
    # grouped (depth-wise) convolutions are not adapted by default
    assert not any(name.endswith(("dw_conv", "fuse_dw_conv")) for name in expert.config.target_modules)
    assert any(name.endswith("fuse_proj") for name in expert.config.target_modules)
    _perturb(expert, 3)
    expert.save_pretrained(tmp_path / "bundle" / "expert_0")
    loaded = LoRAExpert.from_pretrained(tmp_path / "bundle" / "expert_0")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 50).sample, expert(x, 50).sample)


def test_errors(base_folder):
    base, path = base_folder
    with pytest.raises(ValueError, match="`rank`"):
        LoRAExpert.from_base(base, path, rank=0)
    LoRAExpert.from_base(base, path, adapter_name="a", rank=2)
    with pytest.raises(ValueError, match="already holds an adapter named 'a'"):
        LoRAExpert.from_base(base, path, adapter_name="a", rank=2)
    with pytest.raises(ValueError, match="`sample_size`=32 does not match"):
        LoRAExpert.from_base(base, path, adapter_name="b", rank=2, sample_size=32)
    with pytest.raises(ValueError, match="`base_model_class`"):
        LoRAExpert(
            base_model_name_or_path=path,
            base_model_class="diffusers_experts.IUNet2DModel",
            base_model=base,
            adapter_name="c",
        )
