"""SD3 transformers as experts in diffusers' StableDiffusion3Pipeline (flow matching: the timestep is sigma * 1000).

The same properties as the other families (tests/test_conditional_pipelines.py): a one-expert mixture is
bit-identical, a hard mixture calls the owner of every timestep, a blend of identical experts equals one expert, and
pooled projections are split with the rows they belong to.
"""

import copy

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from diffusers_experts import ExpertMixtureUNet
from diffusers_experts.routing import expert_index


STEPS = 6
BLEND_ATOL = 1e-5  # N identical experts blended: float sums reordered only


def sd3_transformer(seed: int) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,), latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=0.0,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    ).eval()  # fmt: skip


def _generate(vae, transformer) -> tuple[torch.Tensor, StableDiffusion3Pipeline]:
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    pooled, negative_pooled = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    images = pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled, guidance_scale=4.0, num_inference_steps=STEPS, height=16,
        width=16, generator=torch.Generator().manual_seed(1), output_type="pt",
    ).images  # fmt: skip
    return images, pipe


def test_one_expert_mixture_is_bit_identical(vae):
    expert = sd3_transformer(0)
    plain, _ = _generate(vae, expert)
    mixed, _ = _generate(vae, ExpertMixtureUNet.from_experts([expert]))
    assert torch.equal(plain, mixed)


def test_hard_mixture_calls_the_owner_of_every_timestep(vae):
    mixture = ExpertMixtureUNet.from_experts([sd3_transformer(k) for k in range(3)], boundaries=[0.5, 0.9])
    calls = []
    for k, expert in enumerate(mixture.experts):
        expert.register_forward_pre_hook(
            lambda module, args, kwargs, k=k: calls.append((k, kwargs["timestep"].tolist())), with_kwargs=True
        )
    _, pipe = _generate(vae, mixture)
    owners = [expert_index(float(t), mixture.config.boundaries) for t in pipe.scheduler.timesteps]
    assert [k for k, _ in calls] == owners and len(set(owners)) == 3
    assert all(len(t) == 2 for _, t in calls)  # the guidance batch (uncond + cond) goes to one expert together
    assert mixture.steps_per_expert(pipe.scheduler, STEPS) == [owners.count(k) for k in range(3)]


def test_blend_of_identical_experts_equals_one_expert(vae):
    expert = sd3_transformer(0)
    plain, _ = _generate(vae, expert)
    blend = ExpertMixtureUNet.from_experts([expert, copy.deepcopy(expert)], routing="linear")
    blended, _ = _generate(vae, blend)
    torch.testing.assert_close(blended, plain, rtol=0, atol=BLEND_ATOL)


def test_rows_and_pooled_projections_split_per_expert():
    mixture = ExpertMixtureUNet.from_experts([sd3_transformer(k) for k in range(2)], boundaries=[0.5])
    g = torch.Generator().manual_seed(2)
    inputs = dict(
        hidden_states=torch.randn(3, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(3, 5, 16, generator=g),
        pooled_projections=torch.randn(3, 8, generator=g),
    )
    timesteps = torch.tensor([800.0, 100.0, 600.0])
    with torch.no_grad():
        out = mixture(**inputs, timestep=timesteps).sample
        for row, owner in enumerate([1, 0, 1]):
            alone = mixture.experts[owner](
                **{name: value[row : row + 1] for name, value in inputs.items()}, timestep=timesteps[row : row + 1]
            ).sample
            torch.testing.assert_close(out[row : row + 1], alone, rtol=0, atol=1e-5)
