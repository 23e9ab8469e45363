"""Boundaries in any unit, the split preview (`steps_per_expert`) and the Wan 2.2 converters.

- Boundaries given as sigma or SNR are converted once, by the noise schedule they refer to (DDPM family or flow
  matching), into the units of the timestep the experts are conditioned on.
- `steps_per_expert` agrees with the experts a pipeline actually calls, for every scheduler of the matrix (DDPM-family
  samplers through `MultiExpertPipeline`, flow-matching ones through diffusers' `WanPipeline`).
- A Wan 2.2 pipeline's two transformers and `boundary_ratio` make a mixture that samples bit-identically in
  `WanPipeline(transformer=mixture)`; `wan_components` gives them back.
"""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
)

from conftest import tiny_unet, tiny_wan_transformer, tiny_wan_vae
from diffusers_experts import (
    ExpertMixtureUNet,
    MultiExpertPipeline,
    boundary_from_denoising_end,
    mixture_from_wan,
    mixture_from_wan_pipeline,
    timestep_from_sigma,
    wan_components,
)
from diffusers_experts.routing import expert_index


# ---------------------------------------------------------------------------------------------------- units


def test_sigma_and_snr_boundaries_follow_the_ddpm_schedule():
    scheduler = DDPMScheduler()
    experts = [tiny_unet(0), tiny_unet(1), tiny_unet(2)]
    sigmas = [0.5, 4.0]
    by_sigma = ExpertMixtureUNet.from_experts(experts, sigmas, boundary_units="sigma", scheduler=scheduler)
    expected = [timestep_from_sigma(s, scheduler.alphas_cumprod) for s in sigmas]
    assert by_sigma.config.boundaries == pytest.approx(expected, abs=1e-9)
    # the noise level at the converted boundary is the sigma asked for
    table = ((1 - scheduler.alphas_cumprod.double()) / scheduler.alphas_cumprod.double()).sqrt()
    for t, sigma in zip(by_sigma.config.boundaries, sigmas):
        low = int(t)
        assert table[low].item() <= sigma <= table[low + 1].item()
    # SNR = 1 / sigma^2: the same boundaries, listed expert by expert (SNR descends with t)
    by_snr = ExpertMixtureUNet.from_experts(
        experts, [1 / s**2 for s in sigmas], boundary_units="snr", scheduler=scheduler
    )
    assert by_snr.config.boundaries == pytest.approx(by_sigma.config.boundaries, abs=1e-6)


def test_sigma_and_snr_boundaries_follow_a_flow_matching_schedule():
    experts = [tiny_unet(0), tiny_unet(1)]
    for scheduler in (
        FlowMatchEulerDiscreteScheduler(shift=3.0),
        UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    ):
        by_sigma = ExpertMixtureUNet.from_experts(experts, [0.875], boundary_units="sigma", scheduler=scheduler)
        assert by_sigma.config.boundaries == pytest.approx([875.0])
        # x_t = (1 - s) x_0 + s noise: SNR 1 is sigma 1/2
        by_snr = ExpertMixtureUNet.from_experts(experts, [1.0], boundary_units="snr", scheduler=scheduler)
        assert by_snr.config.boundaries == pytest.approx([500.0])


def test_noise_level_boundaries_need_a_schedule_and_valid_values():
    experts = [tiny_unet(0), tiny_unet(1)]
    with pytest.raises(ValueError, match="`boundary_units`='sigma' needs `scheduler=`"):
        ExpertMixtureUNet.from_experts(experts, [0.5], boundary_units="sigma")
    with pytest.raises(ValueError, match="flow-matching sigma lies in"):
        ExpertMixtureUNet.from_experts(
            experts, [1.5], boundary_units="sigma", scheduler=FlowMatchEulerDiscreteScheduler()
        )
    with pytest.raises(ValueError, match="outside the schedule's range"):
        ExpertMixtureUNet.from_experts(experts, [1e6], boundary_units="sigma", scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="`boundary_units` must be one of"):
        ExpertMixtureUNet.from_experts(experts, [0.5], boundary_units="percent")


def test_sdxl_and_wan_split_conventions_are_opposite():
    # SDXL: denoising_end = fraction of the denoising done by the base (high-noise) model; its cutoff in diffusers is
    # round(T - denoising_end * T), and the base runs while t >= cutoff
    assert boundary_from_denoising_end(0.8) == 200.0
    assert boundary_from_denoising_end(0.8, num_train_timesteps=1000) == round(1000 - 0.8 * 1000)
    # Wan: boundary_ratio = fraction of T; the high-noise transformer runs while t >= boundary_ratio * T
    mixture = mixture_from_wan(tiny_unet(0), tiny_unet(1), boundary_ratio=0.875)
    assert mixture.config.boundaries == [875.0]
    with pytest.raises(ValueError, match="`denoising_end` must lie in"):
        boundary_from_denoising_end(1.2)


# ---------------------------------------------------------------------------------------------------- split preview


def _count_calls(mixture: ExpertMixtureUNet) -> tuple[list[int], list]:
    """Per-expert call counters (forward pre-hooks) and their handles."""
    counts = [0] * mixture.num_experts
    handles = []
    for k, expert in enumerate(mixture.experts):

        def hook(module, args, kwargs, k=k):
            counts[k] += 1

        handles.append(expert.register_forward_pre_hook(hook, with_kwargs=True))
    return counts, handles


DDPM_FAMILY = {
    "ddpm": lambda: DDPMScheduler(),
    "ddim-trailing": lambda: DDIMScheduler(timestep_spacing="trailing"),
    "dpm++-karras": lambda: DPMSolverMultistepScheduler(use_karras_sigmas=True),
    "euler": lambda: EulerDiscreteScheduler(),
    "euler-karras": lambda: EulerDiscreteScheduler(use_karras_sigmas=True),
    "heun": lambda: HeunDiscreteScheduler(),
    "unipc": lambda: UniPCMultistepScheduler(),
}


@pytest.mark.parametrize("routing", ["hard", "linear"])
@pytest.mark.parametrize("name", sorted(DDPM_FAMILY))
def test_steps_per_expert_matches_the_experts_called(name, routing):
    experts = [tiny_unet(k) for k in range(4)]
    kwargs = {"blend_width": 100.0} if routing == "linear" else {}
    mixture = ExpertMixtureUNet.from_experts(experts, boundaries=[120, 400, 730], routing=routing, **kwargs)
    scheduler = DDPM_FAMILY[name]()
    before = scheduler.timesteps.clone()
    preview = mixture.steps_per_expert(scheduler, 13)
    assert torch.equal(scheduler.timesteps, before)  # the preview works on a copy
    pipe = MultiExpertPipeline(unet=mixture, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    counts, handles = _count_calls(mixture)
    pipe(batch_size=1, num_inference_steps=13, generator=torch.Generator().manual_seed(0), output_type="pt")
    for handle in handles:
        handle.remove()
    assert preview == counts
    if routing == "hard":
        assert sum(preview) == len(pipe.scheduler.timesteps)


def test_steps_per_expert_rejects_bad_step_counts():
    mixture = ExpertMixtureUNet.from_experts([tiny_unet(0), tiny_unet(1)])
    with pytest.raises(ValueError, match="`num_inference_steps` must be a positive integer"):
        mixture.steps_per_expert(DDIMScheduler(), 0)


# ---------------------------------------------------------------------------------------------------- Wan 2.2


@pytest.fixture(scope="module")
def wan_vae():
    return tiny_wan_vae()


def _wan_pipeline(vae, scheduler, **denoisers) -> WanPipeline:
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, **denoisers)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _wan_video(pipe: WanPipeline, steps: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 6, 32, generator=generator)
    negative = torch.randn(1, 6, 32, generator=generator)
    return pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        guidance_scale=4.0,
        height=16,
        width=16,
        num_frames=5,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(1),
        output_type="pt",
    ).frames


def test_wan_two_expert_pipeline_converts_to_a_bit_identical_mixture(wan_vae):
    high, low = tiny_wan_transformer(0), tiny_wan_transformer(1)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    native = _wan_pipeline(wan_vae, scheduler, transformer=high, transformer_2=low, boundary_ratio=0.875)
    mixture = mixture_from_wan_pipeline(native)
    assert mixture.experts[0] is low and mixture.experts[1] is high and mixture.config.boundaries == [875.0]
    converted = _wan_pipeline(wan_vae, scheduler, transformer=mixture)
    expected = _wan_video(native)
    counts, handles = _count_calls(mixture)
    assert torch.equal(expected, _wan_video(converted))
    for handle in handles:
        handle.remove()
    # both experts ran (the split at t = 875 falls inside this 6-step schedule), cond + uncond per step
    assert counts == [2 * n for n in mixture.steps_per_expert(scheduler, 6)] and min(counts) > 0

    components = wan_components(mixture)
    assert components == {"transformer": high, "transformer_2": low, "boundary_ratio": 0.875}
    back = _wan_pipeline(wan_vae, scheduler, **components)
    assert torch.equal(_wan_video(back), _wan_video(native))


def test_wan_converters_refuse_what_wan_cannot_hold():
    with pytest.raises(ValueError, match="`transformer` and `transformer_2` are both required"):
        mixture_from_wan(tiny_wan_transformer(0), None, 0.875)
    with pytest.raises(ValueError, match="`boundary_ratio` must lie in"):
        mixture_from_wan(tiny_wan_transformer(0), tiny_wan_transformer(1), 875)
    three = ExpertMixtureUNet.from_experts([tiny_wan_transformer(k) for k in range(3)])
    with pytest.raises(ValueError, match="Wan 2.2 has two hard-switched experts"):
        wan_components(three)


@pytest.mark.parametrize(
    "scheduler",
    [
        FlowMatchEulerDiscreteScheduler(shift=5.0),
        UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    ],
    ids=["flow-euler-shift5", "unipc-flow-shift3"],
)
def test_steps_per_expert_under_flow_shift_matches_wan_calls(wan_vae, scheduler):
    mixture = ExpertMixtureUNet.from_experts(
        [tiny_wan_transformer(k) for k in range(3)],
        boundaries=[0.3, 0.8],
        boundary_units="sigma",
        scheduler=scheduler,
    )
    preview = mixture.steps_per_expert(scheduler, 7)
    pipe = _wan_pipeline(wan_vae, scheduler, transformer=mixture)
    counts, handles = _count_calls(mixture)
    _wan_video(pipe, steps=7)
    for handle in handles:
        handle.remove()
    assert counts == [2 * n for n in preview]  # cond + uncond
    # the owners are those of the scheduler's timesteps (sigma * 1000)
    owners = [expert_index(float(t), mixture.config.boundaries) for t in pipe.scheduler.timesteps]
    assert preview == [owners.count(k) for k in range(3)]
