"""MultiExpertPipeline with conditional experts: text (UNet2DConditionModel, PixArt), class (DiT), CLIP prompts."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import tiny_dit, tiny_mixture, tiny_pixart, tiny_text_unet
from diffusers_experts import ExpertMixtureUNet, MultiExpertPipeline


EMBED_DIM = 12


def text_mixture(num_experts: int = 2, **overrides):
    experts = [tiny_text_unet(k, cross_attention_dim=EMBED_DIM, **overrides) for k in range(num_experts)]
    return ExpertMixtureUNet.from_experts(experts).eval()


def make_pipe(mixture, scheduler=None, **components):
    pipe = MultiExpertPipeline(unet=mixture, scheduler=scheduler or DDIMScheduler(), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(num_prompts: int, seed: int, length: int = 5) -> torch.Tensor:
    return torch.randn((num_prompts, length, EMBED_DIM), generator=torch.Generator().manual_seed(seed))


def owner(mixture, t) -> int:
    return sum(float(t) >= b - 1e-4 for b in mixture.config.boundaries)


@torch.no_grad()
def guided_by_hand(mixture, num_inference_steps: int, scales, cond: dict, uncond: dict) -> torch.Tensor:
    """DDIM by hand from the latents of seed 0: at each step the owner expert k predicts with `cond` and, where
    scales[k] != 1, also with `uncond`, mixed as uncond + scales[k] * (cond - uncond). Only the first 4 channels are
    the noise (DiT's learned sigma adds 4 more)."""
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(num_inference_steps)
    x = torch.randn((2, 4, 8, 8), generator=torch.manual_seed(0))
    for t in scheduler.timesteps:
        k = owner(mixture, t)
        expert = mixture.experts[k]
        timestep = t.expand(len(x))  # one per sample: DiT takes no scalar timestep
        eps = expert(x, timestep, **cond).sample[:, :4]
        if scales[k] != 1.0:
            uncond_eps = expert(x, timestep, **uncond).sample[:, :4]
            eps = uncond_eps + scales[k] * (eps - uncond_eps)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def record_batches(mixture):
    """Wrap the experts' forward: record (expert, batch size) of every call."""
    calls = []
    for k, expert in enumerate(mixture.experts):
        original = expert.forward

        def forward(*args, _k=k, _original=original, **kwargs):
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            calls.append((_k, sample.shape[0]))
            return _original(*args, **kwargs)

        expert.forward = forward
    return calls


def tiny_clip(folder):
    """A CLIP tokenizer from a vocabulary written here (letters and two merged words) and a tiny CLIP text model."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 6}))
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=EMBED_DIM,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=6,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    return CLIPTextModel(config).eval(), tokenizer


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip"))


# ---------------------------------------------------------------------------------------------------- text experts


def test_prompt_embeds_with_per_expert_guidance_equal_a_manual_loop():
    mixture = text_mixture(3)
    pipe = make_pipe(mixture)
    scales = [1.0, 3.0, 5.0]  # expert 0 unguided, experts 1 and 2 guided differently (Wan's guidance_scale_2, for N)
    embeds, negative = embeddings(2, 1), embeddings(2, 2)
    calls = record_batches(mixture)
    out = pipe(
        num_inference_steps=6,
        generator=torch.manual_seed(0),
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        guidance_scale=scales,
        output_type="latent",
    ).images
    calls = list(calls)
    x = guided_by_hand(mixture, 6, scales, dict(encoder_hidden_states=embeds), dict(encoder_hidden_states=negative))
    assert torch.allclose(out, x, atol=1e-4)
    # every expert ran; cond and uncond in one batched call where the expert's scale is != 1
    assert {k for k, _ in calls} == {0, 1, 2}
    assert all(batch == (2 if k == 0 else 4) for k, batch in calls)


def test_per_expert_scales_equal_one_expert_mixtures_with_that_scale():
    mixture = text_mixture(2)
    embeds, negative = embeddings(1, 3), embeddings(1, 4)
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, output_type="latent")
    latents = torch.randn((1, 4, 8, 8), generator=torch.manual_seed(5))
    # the high-noise half with expert 1 at scale 4 ...
    high = make_pipe(mixture)(
        num_inference_steps=4, latents=latents, denoising_end=0.5, guidance_scale=[2.0, 4.0], **kwargs
    )
    alone = make_pipe(ExpertMixtureUNet.from_experts([mixture.experts[1]]))
    expected = alone(num_inference_steps=4, latents=latents, denoising_end=0.5, guidance_scale=4.0, **kwargs)
    assert torch.equal(high.images, expected.images)
    # ... then the low-noise half with expert 0 at scale 2
    rest = dict(num_inference_steps=4, latents=high.images, denoising_start=0.5, solver_state=high.solver_state)
    low = make_pipe(mixture)(guidance_scale=[2.0, 4.0], **rest, **kwargs).images
    alone = make_pipe(ExpertMixtureUNet.from_experts([mixture.experts[0]]))
    assert torch.equal(low, alone(guidance_scale=2.0, **rest, **kwargs).images)


def test_num_images_per_prompt_repeats_each_prompt_and_generate_many_matches():
    pipe = make_pipe(text_mixture(2))
    embeds, negative = embeddings(2, 6), embeddings(2, 7)
    latents = torch.randn((4, 4, 8, 8), generator=torch.manual_seed(1))
    common = dict(num_inference_steps=3, guidance_scale=[1.5, 3.0], output_type="latent")
    repeated = pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, num_images_per_prompt=2, latents=latents, **common
    ).images
    expected = pipe(
        prompt_embeds=embeds.repeat_interleave(2, 0),
        negative_prompt_embeds=negative.repeat_interleave(2, 0),
        latents=latents,
        **common,
    ).images
    assert repeated.shape == (4, 4, 8, 8) and torch.equal(repeated, expected)
    # expert-major bulk generation: image i with seed i and the embeddings of its prompt
    bulk = pipe.generate_many(
        4, batch_size=3, prompt_embeds=embeds, negative_prompt_embeds=negative, num_images_per_prompt=2, **common
    ).images
    single = pipe(
        generator=[torch.Generator().manual_seed(i) for i in range(4)],
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        num_images_per_prompt=2,
        **common,
    ).images
    assert torch.allclose(bulk, single, atol=1e-5)


def test_prompt_strings_are_encoded_with_the_text_encoder(clip):
    text_encoder, tokenizer = clip
    pipe = make_pipe(text_mixture(2), text_encoder=text_encoder, tokenizer=tokenizer)
    ids = tokenizer(["a cat", "dog", "", "no dog"], padding="max_length", max_length=6, return_tensors="pt").input_ids
    assert ids[0].tolist() == [0, 3, 55, 1, 1, 1] and ids[2].tolist() == [0, 1, 1, 1, 1, 1]  # "a</w>", "cat</w>"
    with torch.no_grad():
        encoded = text_encoder(ids)[0]
    common = dict(num_inference_steps=3, generator=torch.manual_seed(0), output_type="latent")

    # negative prompt "" by default, as StableDiffusionPipeline
    ours = pipe(prompt=["a cat", "dog"], guidance_scale=[1.0, 3.0], **common).images
    common["generator"] = torch.manual_seed(0)
    theirs = pipe(
        prompt_embeds=encoded[:2], negative_prompt_embeds=encoded[[2, 2]], guidance_scale=[1.0, 3.0], **common
    ).images
    assert torch.allclose(ours, theirs, atol=1e-6)
    # a negative prompt for all prompts; one prompt string, several images
    common["generator"] = torch.manual_seed(0)
    ours = pipe(prompt="a cat", negative_prompt="no dog", num_images_per_prompt=2, guidance_scale=2.0, **common)
    common["generator"] = torch.manual_seed(0)
    theirs = pipe(
        prompt_embeds=encoded[[0, 0]], negative_prompt_embeds=encoded[[3, 3]], guidance_scale=2.0, **common
    ).images
    assert torch.allclose(ours.images, theirs, atol=1e-6)
    assert pipe.encode_prompt("dog", "cpu")[1] is None and pipe.encode_prompt("dog", "cpu", 3)[0].shape == (3, 6, 12)


def test_text_and_class_conditional_experts_drop_both_conditions_for_guidance():
    mixture = text_mixture(2, num_class_embeds=4)  # 3 classes and the null class 3
    pipe = make_pipe(mixture)
    embeds, negative = embeddings(2, 8), embeddings(2, 9)
    labels = torch.tensor([0, 2])
    out = pipe(
        num_inference_steps=2,
        generator=torch.manual_seed(0),
        class_labels=labels,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        guidance_scale=2.0,
        output_type="latent",
    ).images
    x = guided_by_hand(
        mixture,
        2,
        [2.0, 2.0],
        dict(encoder_hidden_states=embeds, class_labels=labels),
        dict(encoder_hidden_states=negative, class_labels=torch.full((2,), 3)),
    )
    assert torch.allclose(out, x, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- transformers


def test_dit_experts_take_hidden_states_class_labels_and_drop_learned_sigma():
    # learned sigma (out_channels = 2 x in_channels), 5 classes + DiT's null class 5
    mixture = ExpertMixtureUNet.from_experts([tiny_dit(k, num_embeds_ada_norm=5) for k in range(2)]).eval()
    assert mixture.call_parameters[0] == "hidden_states"
    pipe = make_pipe(mixture)
    labels = torch.tensor([0, 4])
    out = pipe(2, 3, torch.manual_seed(0), class_labels=labels, guidance_scale=[1.0, 4.0], output_type="latent")
    # DiT's null class is num_embeds_ada_norm
    x = guided_by_hand(mixture, 3, [1.0, 4.0], dict(class_labels=labels), dict(class_labels=torch.full((2,), 5)))
    assert torch.allclose(out.images, x, atol=1e-4)
    # DDPM with a learned variance gets the variance channels
    learned = make_pipe(mixture, DDPMScheduler(variance_type="learned_range"))
    assert learned(2, 2, class_labels=labels, guidance_scale=2.0, output_type="latent").images.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"`class_labels` must lie in \[0, 4\] \(num_embeds_ada_norm=5, the null"):
        pipe(num_inference_steps=2, class_labels=5, guidance_scale=2.0)
    with pytest.raises(ValueError, match="`class_labels` must be given.*null class 5"):
        pipe(num_inference_steps=2)


def test_pixart_experts_take_prompt_embeds_as_encoder_hidden_states():
    mixture = ExpertMixtureUNet.from_experts([tiny_pixart(k, caption_channels=EMBED_DIM) for k in range(2)]).eval()
    pipe = make_pipe(mixture)
    calls = record_batches(mixture)
    images = pipe(
        num_inference_steps=3,
        prompt_embeds=embeddings(1, 0),
        negative_prompt_embeds=embeddings(1, 1),
        num_images_per_prompt=2,
        guidance_scale=3.0,
        output_type="latent",
    ).images
    assert images.shape == (2, 4, 8, 8) and torch.isfinite(images).all()
    assert calls and all(batch == 4 for _, batch in calls)  # cond + uncond of 2 images, one call per step


# ---------------------------------------------------------------------------------------------------- saving


def test_save_and_load_with_and_without_text_components(clip, tmp_path):
    text_encoder, tokenizer = clip
    pipe = make_pipe(text_mixture(2), text_encoder=text_encoder, tokenizer=tokenizer)
    common = dict(prompt=["a cat"], num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    before = pipe(generator=torch.manual_seed(0), **common).images
    pipe.save_pretrained(tmp_path / "text")
    index = json.loads((tmp_path / "text" / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    loaded = MultiExpertPipeline.from_pretrained(tmp_path / "text")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.text_encoder, CLIPTextModel) and isinstance(loaded.tokenizer, CLIPTokenizer)
    assert torch.equal(loaded(generator=torch.manual_seed(0), **common).images, before)

    # without text components: None entries, and prompt_embeds still work
    plain = make_pipe(text_mixture(2))
    plain.save_pretrained(tmp_path / "plain")
    index = json.loads((tmp_path / "plain" / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    loaded = MultiExpertPipeline.from_pretrained(tmp_path / "plain")
    assert loaded.text_encoder is None and loaded.tokenizer is None
    embeds = embeddings(1, 0)
    assert loaded(num_inference_steps=1, prompt_embeds=embeds, output_type="latent").images.shape == (1, 4, 8, 8)

    # transformers only for the text components, only model / tokenizer classes, text encoders as safetensors
    folder = tmp_path / "text"
    original = (folder / "model_index.json").read_text()
    for component, value, message in [
        ("vae", ["transformers", "CLIPTextModel"], "Component `vae`.*library 'transformers'"),
        ("text_encoder", ["transformers", "pipeline"], "Component `text_encoder`.*'pipeline'.*PreTrainedModel"),
        ("tokenizer", ["transformers", "CLIPTextModel"], "Component `tokenizer`.*PreTrainedTokenizerBase"),
        ("text_encoder", ["transformers.models", "CLIPTextModel"], "Component `text_encoder`.*library"),
    ]:
        (folder / "model_index.json").write_text(json.dumps({**json.loads(original), component: value}))
        with pytest.raises(ValueError, match=message):
            MultiExpertPipeline.from_pretrained(folder)
    (folder / "model_index.json").write_text(original)
    with pytest.raises(ValueError, match="`use_safetensors=False`"):
        MultiExpertPipeline.from_pretrained(folder, use_safetensors=False)
    (folder / "text_encoder" / "model.safetensors").rename(folder / "text_encoder" / "weights.bak")
    with pytest.raises(ValueError, match="`text_encoder`.*no safetensors weights"):
        MultiExpertPipeline.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------- errors


def test_bad_text_inputs_raise_errors_naming_the_argument(clip):
    text_encoder, tokenizer = clip
    pipe = make_pipe(text_mixture(2))
    embeds = embeddings(2, 0)
    cases = [
        (dict(), "`prompt` or `prompt_embeds` must be given"),
        (dict(prompt="a cat", prompt_embeds=embeds), "either `prompt` or `prompt_embeds`"),
        (dict(prompt="a cat"), "`prompt` needs the pipeline's `text_encoder`"),
        (dict(prompt_embeds=embeds, negative_prompt="dog"), "`negative_prompt` needs the pipeline's"),
        (dict(prompt_embeds=embeds[0]), r"`prompt_embeds` must be a tensor of shape \(batch, sequence, dim\)"),
        (
            dict(prompt_embeds=embeds, negative_prompt_embeds=embeds[:1]),
            "`negative_prompt_embeds` must have the shape",
        ),
        (dict(prompt_embeds=embeds, guidance_scale=[1.0, 2.0]), "`negative_prompt_embeds`"),
        (dict(prompt_embeds=embeds, batch_size=3), r"`batch_size`=3 does not match the prompts: 2 prompt\(s\)"),
        (dict(prompt_embeds=embeds, num_images_per_prompt=0), "`num_images_per_prompt`"),
        (dict(prompt_embeds=embeds, class_labels=1), "`class_labels`.*experts are unconditional"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(num_inference_steps=1, **kwargs)
    with_text = make_pipe(text_mixture(2), text_encoder=text_encoder, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="`negative_prompt` has 1 entries, but there are 2 prompts"):
        with_text(num_inference_steps=1, prompt=["a", "b"], negative_prompt=["c"], guidance_scale=2.0)
    with pytest.raises(TypeError, match="`prompt` must be a string or a list of strings"):
        with_text(num_inference_steps=1, prompt=3)
    with pytest.raises(ValueError, match=r"`num_images`=3 does not match the prompts: 2 prompt\(s\)"):
        pipe.generate_many(3, prompt_embeds=embeds, num_inference_steps=1)

    # text conditioning for experts that take none
    unconditional = make_pipe(tiny_mixture(2))
    for kwargs, name in [
        (dict(prompt_embeds=embeds), "prompt_embeds"),
        (dict(prompt="a cat"), "prompt"),
        (dict(num_images_per_prompt=2), "num_images_per_prompt"),
    ]:
        with pytest.raises(ValueError, match=f"`{name}`.* not text-conditional"):
            unconditional(num_inference_steps=1, **kwargs)
    with pytest.raises(ValueError, match="`text_encoder` was given, but the experts are not text-conditional"):
        MultiExpertPipeline(unet=tiny_mixture(2), scheduler=DDIMScheduler(), text_encoder=text_encoder)
    with pytest.raises(ValueError, match="`guidance_scale`.*unconditional"):
        unconditional(num_inference_steps=1, guidance_scale=2.0)
