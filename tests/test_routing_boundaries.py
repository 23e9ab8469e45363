"""Routing by the conditioned timestep: every expert call runs the expert that owns the `t` the call is given.

The owner expected here is computed independently of the package, in exact rational arithmetic: the number of
boundaries `b` with `t >= b - 1e-4` (a timestep on a boundary, or within 1e-4 below it, belongs to the upper expert),
with `t` the exact value of the float the call received.
"""

import copy
from fractions import Fraction

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from conftest import tiny_mixture
from diffusers_experts import BlendedScheduler, MultiExpertPipeline
from diffusers_experts.routing import noise_sigmas, timestep_from_sigma, timesteps_from_sigmas
from diffusers_experts.schedulers import scheduler_from_name


BOUNDARIES = [250, 500, 750]  # DDPM/DDIM at 4 steps land exactly on them, aligned schedules one below them
TOLERANCE = Fraction(1, 10_000)
MATRIX = ["ddpm", "ddim", "dpmpp", "dpmpp-karras", "euler", "euler-karras", "heun", "lms", "unipc"]
ALIGNABLE = {"ddpm", "dpmpp", "euler", "euler-karras", "heun"}  # bases that take a custom schedule


def expected_owner(t) -> int:
    exact = Fraction(float(t))  # a float32 value converts to float64 exactly
    return sum(exact >= b - TOLERANCE for b in BOUNDARIES)


@pytest.fixture(scope="module")
def mixture():
    mixture = tiny_mixture(4)  # hard routing
    assert mixture.config.boundaries == BOUNDARIES
    return mixture


def record_calls(mixture):
    """Wrap the mixture's and the experts' forwards: per mixture call, its timestep and the (expert, timestep, batch)
    of every expert that ran."""
    calls = []
    mixture_forward = mixture.forward

    def forward(sample, timestep, *args, **kwargs):
        calls.append({"t": timestep, "experts": []})
        return mixture_forward(sample, timestep, *args, **kwargs)

    mixture.forward = forward
    for k, expert in enumerate(mixture.experts):

        def expert_forward(sample, timestep, *args, _k=k, _forward=expert.forward, **kwargs):
            calls[-1]["experts"].append((_k, timestep, sample.shape[0]))
            return _forward(sample, timestep, *args, **kwargs)

        expert.forward = expert_forward
    return calls


def schedulers(name):
    """The scheduler alone, wrapped in a BlendedScheduler, and (where the base takes one) with an aligned schedule."""
    yield "plain", scheduler_from_name(name)
    yield "blended", BlendedScheduler.from_scheduler(scheduler_from_name(name))
    if name in ALIGNABLE:
        yield "aligned", BlendedScheduler.from_scheduler(scheduler_from_name(name), align_to_boundaries=True)


@pytest.mark.parametrize("steps", [4, 12, 37])
@pytest.mark.parametrize("name", MATRIX)
def test_every_expert_call_runs_the_owner_of_its_conditioned_timestep(mixture, name, steps):
    for variant, scheduler in schedulers(name):
        pipe = MultiExpertPipeline(unet=copy.deepcopy(mixture), scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        calls = record_calls(pipe.unet)
        pipe(batch_size=1, num_inference_steps=steps, generator=torch.manual_seed(0), output_type="latent")
        model_calls = 2 * steps - 1 if name == "heun" else steps
        assert len(calls) == model_calls, (name, variant, steps)
        for call in calls:
            # one expert call per model call (hard routing), given the very timestep the mixture was given
            assert len(call["experts"]) == 1, (name, variant, call)
            expert, t, _ = call["experts"][0]
            assert t is call["t"]
            assert expert == expected_owner(t), (name, variant, steps, float(t), expert)
        given = {float(call["t"]) for call in calls}
        if name in ("ddpm", "ddim") and steps == 4 and variant != "aligned":
            assert set(BOUNDARIES) <= given  # exactly on every boundary: the upper expert
        if variant == "aligned" and name != "euler-karras":
            assert {b - 1 for b in BOUNDARIES} <= given  # each expert's last step: the lower expert's top timestep


def expert_calls(mixture, sample, timestep):
    calls = record_calls(mixture)
    with torch.no_grad():
        mixture(sample, timestep)
    del mixture.forward
    for expert in mixture.experts:
        del expert.forward
    assert len(calls) == 1
    return calls[0]["experts"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_timestep_on_a_boundary_up_to_float_noise_goes_to_the_upper_expert(mixture, dtype):
    sample = torch.randn(4, 3, 16, 16, generator=torch.manual_seed(0))
    for upper, boundary in enumerate(BOUNDARIES, start=1):
        for offset in (-1e-6, 0.0, 1e-6):
            t = torch.tensor(boundary + offset, dtype=dtype)
            assert expected_owner(t) == upper
            # a shared timestep, 0-d, one per sample or a Python number: one call of the upper expert
            for timestep in (t, t.expand(4), t.item()):
                assert [(k, n) for k, _, n in expert_calls(mixture, sample, timestep)] == [(upper, 4)]
            assert mixture.active_experts(t) == [upper]
            assert torch.equal(mixture.expert_weights(t)[0], torch.eye(4)[upper])
        # per-sample timesteps: 1e-3 below a boundary is the lower expert's, 1e-6 below is the upper one's
        mixed = torch.tensor([boundary - 1e-3, boundary - 1e-6, boundary, boundary + 1e-6], dtype=dtype)
        calls = expert_calls(mixture, sample, mixed)
        assert [(k, n) for k, _, n in calls] == [(upper - 1, 1), (upper, 3)]
        assert all(expected_owner(t) == k for k, ts, _ in calls for t in ts)


def test_a_boundary_through_a_sigma_round_trip_goes_to_the_upper_expert(mixture):
    sample = torch.randn(1, 3, 16, 16, generator=torch.manual_seed(0))
    alphas_cumprod = DDPMScheduler().alphas_cumprod
    sigmas = noise_sigmas(alphas_cumprod)
    log_sigmas32 = np.log(sigmas.float().numpy())  # the float32 table Euler-type schedulers interpolate in
    for upper, boundary in enumerate(BOUNDARIES, start=1):
        for sigma in (sigmas[boundary], sigmas[boundary].float()):
            round_trips = [
                timesteps_from_sigmas(sigma, alphas_cumprod),
                timesteps_from_sigmas(sigma, alphas_cumprod).float(),
                timestep_from_sigma(sigma.item(), alphas_cumprod),
                torch.from_numpy(EulerDiscreteScheduler()._sigma_to_t(sigma.float().numpy(), log_sigmas32)),
            ]
            for t in round_trips:
                assert abs(float(t) - boundary) < 1e-4  # float noise only
                assert expected_owner(t) == upper
                assert [k for k, _, _ in expert_calls(mixture, sample, t)] == [upper]


@pytest.mark.parametrize("blended", [False, True])
def test_dpmpp_karras_routes_by_the_rounded_timestep_it_is_given(mixture, blended):
    scheduler = scheduler_from_name("dpmpp-karras")
    if blended:
        scheduler = BlendedScheduler.from_scheduler(scheduler)
    pipe = MultiExpertPipeline(unet=copy.deepcopy(mixture), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    calls = record_calls(pipe.unet)
    pipe(batch_size=1, num_inference_steps=37, generator=torch.manual_seed(0), output_type="latent")
    noise_level_t = timesteps_from_sigmas(scheduler.sigmas[:-1], scheduler.alphas_cumprod)
    assert len(calls) == len(noise_level_t) == 37
    differ = [(c, n) for c, n in zip(calls, noise_level_t) if expected_owner(c["t"]) != expected_owner(n)]
    # the call conditioned on t = 750 (noise level t = 749.69) runs the expert trained on [750, 1000)
    assert [(float(c["t"]), round(float(n), 2), c["experts"][0][0]) for c, n in differ] == [(750.0, 749.69, 3)]
