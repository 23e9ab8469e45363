"""BlendedScheduler: delegation, config round trips, boundary-aligned schedules, steps per expert."""

import json
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from conftest import tiny_mixture
from diffusers_experts import BlendedScheduler
from diffusers_experts.routing import timesteps_from_sigmas
from diffusers_experts.schedulers.scheduling_blended import aligned_timesteps, allocate_steps


@pytest.fixture(scope="module")
def mixture():
    return tiny_mixture(4)  # boundaries [250, 500, 750]


def owner(boundaries, t):
    return sum(t >= b for b in boundaries)


def test_delegates_to_the_base_scheduler():
    base = EulerDiscreteScheduler(use_karras_sigmas=True)
    blended = BlendedScheduler.from_scheduler(base)
    blended.set_timesteps(5)
    base.set_timesteps(5)
    assert torch.equal(blended.timesteps, base.timesteps)
    assert blended.init_noise_sigma == base.init_noise_sigma and blended.order == base.order == 1
    assert torch.equal(blended.sigmas, base.sigmas)  # any other attribute comes from the base
    x = torch.randn(1, 3, 4, 4, generator=torch.manual_seed(0))
    t = blended.timesteps[0]
    assert torch.equal(blended.scale_model_input(x, t), base.scale_model_input(x, t))
    eps = torch.randn(1, 3, 4, 4, generator=torch.manual_seed(1))
    assert torch.equal(blended.step(eps, t, x).prev_sample, base.step(eps, t, x).prev_sample)
    noise = torch.randn(1, 3, 4, 4)
    assert torch.equal(blended.add_noise(x, noise, t.reshape(1)), base.add_noise(x, noise, t.reshape(1)))
    assert HeunDiscreteScheduler in blended.compatibles and BlendedScheduler in blended.compatibles


def test_config_round_trips(tmp_path):
    base = DPMSolverMultistepScheduler(use_karras_sigmas=True, solver_order=3, beta_schedule="scaled_linear")
    blended = BlendedScheduler.from_scheduler(base, steps_per_expert=[2, 3])
    blended.save_pretrained(tmp_path)
    for loaded in (BlendedScheduler.from_pretrained(tmp_path), BlendedScheduler.from_config(blended.config)):
        assert isinstance(loaded.base, DPMSolverMultistepScheduler)
        assert loaded.base.config.solver_order == 3 and loaded.base.config.use_karras_sigmas
        assert loaded.base.config.beta_schedule == "scaled_linear"
        assert loaded.config.steps_per_expert == [2, 3]
    # boundaries are never stored in the scheduler config (the mixture owns them)
    # the diffusers way to swap schedulers wraps the scheduler another config describes
    base.save_config(tmp_path / "dpm")
    wrapped = BlendedScheduler.from_config(BlendedScheduler.load_config(tmp_path / "dpm"), align_to_boundaries=True)
    assert isinstance(wrapped.base, DPMSolverMultistepScheduler) and wrapped.base.config.solver_order == 3
    assert wrapped.config.align_to_boundaries
    with pytest.raises(ValueError, match="`config` describes another scheduler"):
        BlendedScheduler.from_config(EulerDiscreteScheduler().config)  # no class name in it: nothing is guessed
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert "boundaries" not in saved and "boundaries" not in saved["base_scheduler_config"]


@pytest.mark.parametrize("base_cls", [DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_aligned_schedule_keeps_every_step_inside_one_expert(mixture, base_cls):
    boundaries = mixture.config.boundaries
    scheduler = BlendedScheduler.from_scheduler(base_cls(), align_to_boundaries=True)
    scheduler.set_timesteps(10, mixture=mixture)
    points = [float(t) for t in scheduler.timesteps] + [-1.0]  # -1: the clean sample
    for t, t_next in zip(points, points[1:]):
        # a step from t lands at t_next >= the bottom of t's expert minus one timestep (the next expert's top)
        k = owner(boundaries, t)
        bottom = 0 if k == 0 else math.ceil(boundaries[k - 1])
        assert t_next >= bottom - 1, (t, t_next)
    per_expert = [sum(owner(boundaries, float(t)) == k for t in scheduler.timesteps) for k in range(4)]
    assert per_expert == allocate_steps(10, [250, 250, 250, 250]) and sum(per_expert) == 10


def test_steps_per_expert_and_heun_alignment(mixture):
    scheduler = BlendedScheduler.from_scheduler(HeunDiscreteScheduler(), steps_per_expert=[1, 1, 2, 4])
    scheduler.set_timesteps(8, mixture=mixture)
    unique = sorted({float(t) for t in scheduler.timesteps}, reverse=True)
    assert [owner(mixture.config.boundaries, t) for t in unique] == [3, 3, 3, 3, 2, 2, 1, 0]
    assert aligned_timesteps([range(0, 500), range(500, 1000)], [2, 2]) == [999, 749, 499, 249]


def test_karras_alignment_spaces_sigmas_inside_each_expert(mixture):
    base = EulerDiscreteScheduler(use_karras_sigmas=True)
    scheduler = BlendedScheduler.from_scheduler(base, steps_per_expert=[2, 2, 3, 3])
    scheduler.set_timesteps(10, mixture=mixture)
    routed = [float(t) for t in scheduler.timesteps]  # Euler conditions the model on the noise-level timestep
    assert [owner(mixture.config.boundaries, t) for t in routed] == [3, 3, 3, 2, 2, 2, 1, 1, 0, 0]
    # each expert's last step lands on the next expert's top timestep
    assert [round(t) for t in routed if t in (999.0, 749.0, 499.0, 249.0)] == [999, 749, 499, 249]
    assert float(scheduler.sigmas[-1]) == 0.0 and torch.all(scheduler.sigmas[:-1] > scheduler.sigmas[1:])


def test_the_model_is_given_the_timesteps_of_the_base_scheduler(mixture):
    # routing is the mixture's: the wrapper hands the model the base scheduler's own timesteps and routes nothing
    for base in (DPMSolverMultistepScheduler(use_karras_sigmas=True), DDIMScheduler(), EulerDiscreteScheduler()):
        scheduler = BlendedScheduler.from_scheduler(base)
        scheduler.set_timesteps(7, mixture=mixture)
        base.set_timesteps(7)
        assert torch.equal(scheduler.timesteps, base.timesteps)
        assert not hasattr(scheduler, "routing_timestep")
    # DPM++ with Karras sigmas gives the model the rounded noise-level timestep (the mixture routes by that one)
    karras = BlendedScheduler.from_scheduler(DPMSolverMultistepScheduler(use_karras_sigmas=True))
    karras.set_timesteps(7, mixture=mixture)
    noise_t = timesteps_from_sigmas(karras.sigmas[:-1], karras.alphas_cumprod)
    assert torch.all((karras.timesteps.double() - noise_t).abs() <= 0.5)


def test_routing_source_of_an_old_config_is_dropped_with_a_warning(tmp_path):
    BlendedScheduler.from_scheduler(DDPMScheduler(), steps_per_expert=[1, 2]).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert "routing_source" not in saved
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**saved, "routing_source": "sigma"}))
    with pytest.warns(FutureWarning, match="`routing_source`='sigma' in this BlendedScheduler config is ignored"):
        loaded = BlendedScheduler.from_pretrained(tmp_path)
    assert "routing_source" not in loaded.config and loaded.config.steps_per_expert == [1, 2]
    loaded.save_pretrained(tmp_path / "again")
    assert "routing_source" not in json.loads((tmp_path / "again" / "scheduler_config.json").read_text())


def test_bad_input(mixture):
    with pytest.raises(ValueError, match="`base_scheduler_class`.*Valid choices"):
        BlendedScheduler(base_scheduler_class="os.system")
    with pytest.raises(ValueError, match="`steps_per_expert`"):
        BlendedScheduler.from_scheduler(DDPMScheduler(), steps_per_expert=[0, 2])
    scheduler = BlendedScheduler.from_scheduler(DDPMScheduler(), steps_per_expert=[1, 2, 3])
    with pytest.raises(ValueError, match=r"one step count per expert \(4\)"):
        scheduler.set_timesteps(6, mixture=mixture)
    scheduler = BlendedScheduler.from_scheduler(DDPMScheduler(), steps_per_expert=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="sums to 10 steps, but num_inference_steps=8"):
        scheduler.set_timesteps(8, mixture=mixture)
    with pytest.raises(ValueError, match="`mixture` is required"):
        scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=r"`steps_per_expert\[0\]` = 300 is more than the 250"):
        BlendedScheduler.from_scheduler(DDPMScheduler(), steps_per_expert=[300, 1, 1, 1]).set_timesteps(
            303, mixture=mixture
        )
    for base in (DDIMScheduler(), LMSDiscreteScheduler(), UniPCMultistepScheduler()):
        with pytest.raises(ValueError, match="cannot take a custom schedule"):
            BlendedScheduler.from_scheduler(base, align_to_boundaries=True).set_timesteps(8, mixture=mixture)
    with pytest.raises(ValueError, match="refused the boundary-aligned schedule"):
        karras = DPMSolverMultistepScheduler(use_karras_sigmas=True)
        BlendedScheduler.from_scheduler(karras, align_to_boundaries=True).set_timesteps(8, mixture=mixture)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        BlendedScheduler.from_scheduler(DDPMScheduler(num_train_timesteps=500)).set_timesteps(4, mixture=mixture)
    with pytest.raises(ValueError, match="`num_inference_steps` \\(3\\) must be >= the number of experts"):
        BlendedScheduler.from_scheduler(DDPMScheduler(), align_to_boundaries=True).set_timesteps(3, mixture=mixture)
    with pytest.raises(TypeError, match=r"Unknown BlendedScheduler option\(s\) \['routing_source'\]"):
        BlendedScheduler.from_scheduler(DDPMScheduler(), routing_source="sigma")
    with pytest.raises(TypeError, match="already a BlendedScheduler"):
        BlendedScheduler.from_scheduler(BlendedScheduler())
    with pytest.raises(TypeError, match="Unknown BlendedScheduler option"):
        BlendedScheduler.from_scheduler(DDPMScheduler(), boundaries=[500])
