"""Model cards: rendered from the packaged templates, filled from configs and training metadata."""

import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import tiny_iunet, tiny_text_unet, tiny_unet, tiny_wan_transformer
from diffusers_experts import ExpertMixtureUNet
from diffusers_experts.hub import expert_model_card, mixture_model_card, save_model_cards


ROOT = Path(__file__).resolve().parents[1]


def _mixed_mixture(routing="linear"):
    return ExpertMixtureUNet.from_experts([tiny_unet(0), tiny_iunet(1)], boundaries=[300], routing=routing).eval()


def test_packaged_templates_are_identical_to_model_cards_folder():
    canonical = sorted(p.name for p in (ROOT / "model_cards").glob("*.md"))
    packaged_dir = ROOT / "src" / "diffusers_experts" / "model_card_templates"
    assert canonical == ["expert_card.md", "mixture_card.md"]
    assert sorted(p.name for p in packaged_dir.glob("*.md")) == canonical
    for name in canonical:
        assert (packaged_dir / name).read_bytes() == (ROOT / "model_cards" / name).read_bytes(), (
            f"src/diffusers_experts/model_card_templates/{name} differs from model_cards/{name}: copy it over."
        )


def test_save_model_cards_writes_mixture_and_expert_cards(tmp_path):
    mixture = _mixed_mixture()
    mixture.save_pretrained(tmp_path)
    metadata = {
        "repo_id": "org/mnist-mixture",
        "license": "apache-2.0",
        "datasets": ["ylecun/mnist"],
        "training_steps": 4000,
        "metrics": {"fid": 12.3456},
        "hyperparameters": {"learning_rate": 1e-4, "lora_rank": None, "expertization_probs": [0.8, 0.4]},
        "experts": [{"training_steps": 2500, "metrics": {"loss": 0.0412}, "macs": 3_000_000}, None],
    }
    written = save_model_cards(tmp_path, mixture, metadata)
    assert written == [str(tmp_path / "README.md"), *(str(tmp_path / f"expert_{k}" / "README.md") for k in (0, 1))]

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers-experts"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"diffusers", "mixture-of-experts", "diffusers-experts"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0" and card.data.datasets == ["ylecun/mnist"]
    text = card.text
    n0 = sum(p.numel() for p in mixture.experts[0].parameters())
    n1 = sum(p.numel() for p in mixture.experts[1].parameters())
    assert f"| 0 | [0, 300) | `diffusers.UNet2DModel` | {n0:,}" in text
    assert f"| 1 | [300, 1000) | `diffusers_experts.IUNet2DModel` | {n1:,}" in text
    assert "2,500" in text and "loss: 0.0412" in text and "| fid | 12.35 |" in text and "4,000" in text
    assert "mode: `linear`" in text and "[300]" in text
    assert "- learning_rate: 0.0001" in text and "- expertization_probs: [0.8, 0.4]" in text
    assert "lora_rank" not in text  # None = not used: left out
    assert 'ExpertMixtureUNet.from_pretrained("org/mnist-mixture")' in text

    expert0 = ModelCard.load(tmp_path / "expert_0" / "README.md")
    assert expert0.data.library_name == "diffusers"  # a UNet2DModel expert loads with diffusers alone
    assert "[org/mnist-mixture](https://huggingface.co/org/mnist-mixture)" in expert0.text
    assert "**[0, 300)**" in expert0.text and "3,000,000" in expert0.text and "2,500" in expert0.text
    assert 'UNet2DModel.from_pretrained("org/mnist-mixture", subfolder="expert_0")' in expert0.text
    expert1 = ModelCard.load(tmp_path / "expert_1" / "README.md")
    assert expert1.data.library_name == "diffusers-experts"  # needs this package for IUNet2DModel
    assert "**[300, 1000)**" in expert1.text and "high_ratios" in expert1.text
    assert "training steps" not in expert1.text  # nothing invented when metadata has none

    # the cards do not disturb loading
    loaded = ExpertMixtureUNet.from_pretrained(tmp_path)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, mixture(x, t).sample)


def test_cards_without_metadata_and_with_referenced_expert(tmp_path):
    mixture = _mixed_mixture(routing="hard")
    sources = [None, {"repo_id": "org/high-noise-expert", "revision": "v1", "subfolder": None}]
    mixture.register_to_config(expert_sources=sources)
    mixture.save_pretrained(tmp_path)
    assert not (tmp_path / "expert_1").exists()
    written = save_model_cards(tmp_path, mixture)
    assert [os.path.relpath(p, tmp_path) for p in written] == ["README.md", os.path.join("expert_0", "README.md")]
    card = ModelCard.load(tmp_path / "README.md")
    assert "[org/high-noise-expert](https://huggingface.co/org/high-noise-expert) @ `v1`" in card.text
    assert card.data.base_model == ["org/high-noise-expert"]
    assert "## Training" not in card.text
    assert "the mixture in the parent folder" in ModelCard.load(tmp_path / "expert_0" / "README.md").text


def test_card_metadata_errors(tmp_path):
    mixture = _mixed_mixture()
    with pytest.raises(ValueError, match=r"Unknown `metadata` key\(s\) \['fid'\]; valid keys: .*'metrics'"):
        mixture_model_card(mixture, {"fid": 3.0})
    with pytest.raises(ValueError, match=r"one dict \(or None\) per expert \(2\)"):
        mixture_model_card(mixture, {"experts": [{}]})
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['steps'\] in `metadata\['experts'\]\[1\]`"):
        mixture_model_card(mixture, {"experts": [None, {"steps": 3}]})
    with pytest.raises(TypeError, match=r"`metadata\['metrics'\]` must be a dict"):
        mixture_model_card(mixture, {"metrics": [1.0]})
    with pytest.raises(ValueError, match=r"`k` must be an expert index in \[0, 1\], got 2"):
        expert_model_card(mixture, 2)
    with pytest.raises(TypeError, match="must be an ExpertMixtureUNet or a pipeline"):
        mixture_model_card(tiny_unet())
    with pytest.raises(ValueError, match="save the model first"):
        save_model_cards(tmp_path / "nothing", mixture)


def test_pipeline_card_usage_runs_for_a_class_conditional_pipeline(tmp_path):
    import re

    from diffusers import DDPMScheduler

    from diffusers_experts import MultiExpertPipeline

    experts = [tiny_unet(k, num_class_embeds=11) for k in range(2)]  # 10 classes + the null class
    pipe = MultiExpertPipeline(unet=ExpertMixtureUNet.from_experts(experts), scheduler=DDPMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    card = str(mixture_model_card(pipe, {"hyperparameters": {"guidance_scale": 1.5}}))
    assert "10 classes (class index 10 is the null class" in card and "11 classes" not in card
    usage = re.search(r"```py(?:thon)?\n(.*?)```", card, re.S).group(1)
    assert "class_labels=[0, 1, 2, 3], guidance_scale=1.5" in usage
    namespace = {}
    exec(
        usage.replace('"path/to/model"', repr(str(tmp_path / "pipe"))).replace(
            "batch_size=4", "batch_size=4, num_inference_steps=2"
        ),
        namespace,
    )
    assert len(namespace["images"]) == 4


def test_cards_of_text_conditional_experts_name_their_task(tmp_path):
    from diffusers_experts.model_card import pipeline_tag

    wan = ExpertMixtureUNet.from_experts([tiny_wan_transformer(0), tiny_wan_transformer(1)], boundaries=[875])
    assert pipeline_tag(wan) == "text-to-video"
    assert pipeline_tag(ExpertMixtureUNet.from_experts([tiny_text_unet(0)])) == "text-to-image"
    wan.save_pretrained(tmp_path / "wan")
    save_model_cards(tmp_path / "wan", wan)
    card = (tmp_path / "wan" / "README.md").read_text()
    assert "pipeline_tag: text-to-video" in card and "None px" not in card and "Samples: 16 channels" in card
    assert "pipeline_tag: text-to-video" in (tmp_path / "wan" / "expert_1" / "README.md").read_text()
