"""MultiExpertPipeline: routing under every scheduler, CFG, latent experts, offload, bulk generation, split runs."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMPipeline, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_mixture, tiny_unet
from diffusers_experts import BlendedScheduler, ExpertMixtureUNet, MultiExpertPipeline
from diffusers_experts.pipelines import bulk_generation
from diffusers_experts.routing import timestep_from_sigma
from diffusers_experts.schedulers import SCHEDULER_NAMES, scheduler_from_name


MATRIX = ["ddpm", "ddim", "dpmpp", "dpmpp-karras", "euler", "heun", "lms", "unipc"]


def make_pipe(mixture, scheduler=None, **kwargs):
    pipe = MultiExpertPipeline(unet=mixture, scheduler=scheduler or DDIMScheduler(), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def mixture4():
    return tiny_mixture(4)  # hard routing, boundaries [250, 500, 750]


def record_calls(pipe):
    """Wrap every expert's forward: record (expert, model timestep, training timestep of the input's noise level)."""
    calls = []
    for k, expert in enumerate(pipe.unet.experts):
        original = expert.forward

        def forward(sample, timestep, *args, _k=k, _original=original, **kwargs):
            scheduler = pipe.scheduler.base if isinstance(pipe.scheduler, BlendedScheduler) else pipe.scheduler
            if getattr(scheduler, "sigmas", None) is not None:
                index = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
                noise_t = noise_timestep(float(scheduler.sigmas[index]), scheduler.alphas_cumprod)
            else:
                noise_t = float(timestep)
            resident = sorted(pipe.expert_offload.resident) if pipe.expert_offload is not None else None
            calls.append(dict(expert=_k, t=float(timestep), noise_t=noise_t, batch=sample.shape[0], resident=resident))
            return _original(sample, timestep, *args, **kwargs)

        expert.forward = forward
    return calls


def noise_timestep(sigma, alphas_cumprod):
    """Training timestep of noise level `sigma` (float32 sigmas may exceed the float64 table end by rounding)."""
    table = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()) ** 0.5
    return timestep_from_sigma(min(max(sigma, table[0].item()), table[-1].item()), alphas_cumprod)


def owner(mixture, t):
    """The expert owning timestep `t`: boundaries passed, a boundary within 1e-4 above `t` counting as passed."""
    return sum(t >= b - 1e-4 for b in mixture.config.boundaries)


@pytest.mark.parametrize("name", MATRIX)
def test_every_model_call_goes_to_the_expert_that_owns_its_timestep(mixture4, name):
    mixture = copy.deepcopy(mixture4)
    steps = 4
    for blended in (False, True):
        scheduler = scheduler_from_name(name)
        if blended:
            scheduler = BlendedScheduler.from_scheduler(scheduler)
        pipe = make_pipe(mixture, scheduler)
        calls = record_calls(pipe)
        images = pipe(batch_size=1, num_inference_steps=steps, generator=torch.manual_seed(0), output_type="np").images
        assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
        expected_calls = 2 * steps - 1 if name == "heun" else steps
        assert len(calls) == expected_calls
        for call in calls:
            # model timesteps are training timesteps up to rounding (DPM/UniPC round t(sigma) with Karras sigmas)
            assert abs(call["t"] - call["noise_t"]) <= 0.5 + 1e-3, call
            # routed by the timestep the call is conditioned on, with or without BlendedScheduler
            assert call["expert"] == owner(mixture, call["t"]), (name, blended, call)
        # the schedule spans the noise range: it starts with the highest-noise expert and visits most experts
        assert calls[0]["expert"] == 3 and len({c["expert"] for c in calls}) >= 3
    if name == "heun":  # second order: the corrector call of a step is routed by its own (lower) noise level
        assert any(a["expert"] != b["expert"] and a["t"] != b["t"] for a, b in zip(calls, calls[1:]))


@pytest.mark.parametrize("name", ["ddpm", "dpmpp", "euler", "euler-karras", "heun"])
def test_aligned_schedules_route_every_call_and_give_each_expert_its_steps(mixture4, name):
    scheduler = BlendedScheduler.from_scheduler(scheduler_from_name(name), steps_per_expert=[1, 1, 2, 2])
    pipe = make_pipe(copy.deepcopy(mixture4), scheduler)
    calls = record_calls(pipe)
    pipe(batch_size=1, num_inference_steps=6, generator=torch.manual_seed(0), output_type="latent")
    assert all(c["expert"] == owner(mixture4, c["t"]) for c in calls)
    first_calls = calls[::2] if name == "heun" else calls  # Heun: the first call of each step
    assert [c["expert"] for c in first_calls] == [3, 3, 2, 2, 1, 0]


def test_identical_experts_give_the_images_of_ddim_pipeline():
    expert = tiny_unet(3)
    mixture = ExpertMixtureUNet.from_experts([copy.deepcopy(expert) for _ in range(4)])
    ours = make_pipe(mixture, DDIMScheduler())(
        batch_size=2, num_inference_steps=4, generator=torch.manual_seed(7), output_type="np"
    ).images
    reference = DDIMPipeline(unet=expert, scheduler=DDIMScheduler())
    reference.set_progress_bar_config(disable=True)
    theirs = reference(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(7), output_type="np").images
    assert np.array_equal(ours, theirs)


def test_output_types_and_generator_list(mixture4):
    pipe = make_pipe(mixture4)
    pil = pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert len(pil) == 2 and pil[0].size == (16, 16)
    pt = pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    assert pt.shape == (2, 3, 16, 16) and 0 <= pt.min() and pt.max() <= 1
    latent = pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent").images
    assert torch.allclose((latent / 2 + 0.5).clamp(0, 1), pt)
    # a list of generators seeds each image on its own: image 1 of a batch equals image 0 of a batch with its seed
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    pair = pipe(batch_size=2, num_inference_steps=2, generator=gens, output_type="pt").images
    single = pipe(batch_size=1, num_inference_steps=2, generator=[torch.Generator().manual_seed(6)], output_type="pt")
    assert torch.allclose(pair[1], single.images[0], atol=1e-5)
    seen = []
    pipe(
        batch_size=1,
        num_inference_steps=3,
        callback_on_step_end=lambda p, i, t, kw: seen.append((i, kw["latents"].shape)),
    )
    assert [i for i, _ in seen] == [0, 1, 2] and seen[0][1] == (1, 3, 16, 16)


def conditional_mixture(num_classes=3):
    experts = [tiny_unet(k, num_class_embeds=num_classes + 1) for k in range(2)]
    return ExpertMixtureUNet.from_experts(experts).eval()


def test_classifier_free_guidance_equals_manual_computation():
    mixture = conditional_mixture()
    pipe = make_pipe(mixture, DDIMScheduler())
    scales = [1.0, 3.0]  # expert 0 unguided, expert 1 guided (one value per expert)
    labels = torch.tensor([0, 2])
    calls = record_calls(pipe)
    out = pipe(2, 4, torch.manual_seed(1), class_labels=labels, guidance_scale=scales, output_type="latent").images
    calls = list(calls)

    # manual: uncond + s * (cond - uncond) with the owning expert, null class = num_class_embeds - 1
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    x = torch.randn((2, 3, 16, 16), generator=torch.manual_seed(1))
    null = torch.full((2,), 3)
    with torch.no_grad():
        for t in scheduler.timesteps:
            k = owner(mixture, float(t))
            expert = mixture.experts[k]
            cond = expert(x, t, class_labels=labels).sample
            if scales[k] != 1.0:
                uncond = expert(x, t, class_labels=null).sample
                cond = uncond + scales[k] * (cond - uncond)
            x = scheduler.step(cond, t, x).prev_sample
    assert torch.allclose(out, x, atol=1e-4)
    # cond and uncond in one batched call, and only where the expert's scale is != 1
    assert [c["batch"] for c in calls] == [4 if c["expert"] == 1 else 2 for c in calls]
    assert {c["expert"] for c in calls} == {0, 1}


def test_latent_experts_decode_with_the_vae():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,
    ).eval()
    experts = [tiny_unet(k, in_channels=4, out_channels=4, sample_size=8) for k in range(2)]
    mixture = ExpertMixtureUNet.from_experts(experts).eval()
    pipe = make_pipe(mixture, DDIMScheduler(), vae=vae)
    latents = pipe(2, 2, torch.manual_seed(0), output_type="latent").images
    assert latents.shape == (2, 4, 8, 8)
    images = pipe(2, 2, torch.manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 16, 16)
    with torch.no_grad():
        expected = (vae.decode(latents / 0.5).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(images, expected, atol=1e-5)
    with pytest.raises(ValueError, match="latent_channels"):
        MultiExpertPipeline(unet=tiny_mixture(2), scheduler=DDIMScheduler(), vae=vae)


@pytest.mark.parametrize("routing, most", [("hard", 1), ("linear", 2)])
def test_offload_keeps_only_the_called_experts_on_the_device(routing, most):
    mixture = tiny_mixture(4, routing=routing, blend_width=100.0) if routing == "linear" else tiny_mixture(4)
    pipe = make_pipe(mixture)
    offload = pipe.enable_expert_offload("cpu")
    calls = record_calls(pipe)
    pipe(batch_size=1, num_inference_steps=8, generator=torch.manual_seed(0), output_type="latent")
    assert calls and all(c["expert"] in c["resident"] and len(c["resident"]) <= most for c in calls)
    if routing == "hard":
        assert offload.load_counts == [1, 1, 1, 1]  # each expert moved in once per call
    else:
        assert max(len(c["resident"]) for c in calls) == 2  # a blend step holds two experts
    pipe.disable_expert_offload()
    assert pipe.expert_offload is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an accelerator to see real device moves")
def test_offload_moves_experts_on_cuda():
    pipe = make_pipe(tiny_mixture(4))
    pipe.enable_expert_offload("cuda")
    devices = []
    for k, expert in enumerate(pipe.unet.experts):
        original = expert.forward

        def forward(sample, timestep, *args, _k=k, _original=original, **kwargs):
            devices.append([e.device.type for e in pipe.unet.experts])
            return _original(sample, timestep, *args, **kwargs)

        expert.forward = forward
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images
    assert np.isfinite(images).all()
    assert all(d.count("cuda") == 1 for d in devices)


def per_image_generators(indices, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in indices]


@pytest.mark.parametrize("name", ["ddpm", "dpmpp"])  # stochastic steps; multistep solver state
def test_generate_many_equals_call_and_loads_each_expert_once(mixture4, name, tmp_path):
    pipe = make_pipe(copy.deepcopy(mixture4), scheduler_from_name(name))
    offload = pipe.enable_expert_offload("cpu")
    bulk = pipe.generate_many(5, batch_size=2, seed=10, num_inference_steps=4, output_type="latent")
    used = [int(n > 0) for n in bulk.expert_loads]
    assert bulk.expert_loads == used and sum(used) >= 3  # each expert the schedule uses is loaded once
    expected = []
    offload.reset_counts()
    for indices in ([0, 1], [2, 3], [4]):  # batch-major: every batch loads every expert
        gens = per_image_generators(indices, 10)
        expected.append(pipe(len(indices), 4, gens, output_type="latent").images)
    assert offload.load_counts == [3 * n for n in used]
    assert torch.equal(bulk.images, torch.cat(expected))
    # and independent of the batch size (up to float rounding of batched convolutions)
    other = pipe.generate_many(5, batch_size=5, seed=10, num_inference_steps=4, output_type="latent").images
    assert torch.allclose(other, bulk.images, rtol=1e-4, atol=1e-4)


def test_generate_many_writes_pngs_resumes_and_spills_to_disk(mixture4, tmp_path):
    pipe = make_pipe(mixture4)
    out = pipe.generate_many(3, batch_size=2, seed=0, output_dir=tmp_path, num_inference_steps=3)
    assert [os.path.basename(p) for p in out.paths] == ["000000.png", "000001.png", "000002.png"]
    first = [np.asarray(Image.open(p)) for p in out.paths]
    os.remove(out.paths[1])
    calls = record_calls(pipe)
    again = pipe.generate_many(
        3, batch_size=2, seed=0, output_dir=tmp_path, num_inference_steps=3, intermediates="disk"
    )
    assert {c["batch"] for c in calls} == {1} and len(calls) == 3  # only image 1 is redone
    assert np.array_equal(np.asarray(Image.open(again.paths[1])), first[1])
    assert not os.path.exists(tmp_path / ".intermediates")


def test_disk_intermediates_carry_the_multistep_solver_state(mixture4, tmp_path, monkeypatch):
    pipe = make_pipe(mixture4, scheduler_from_name("dpmpp"))
    in_memory = pipe.generate_many(3, batch_size=2, seed=4, num_inference_steps=4).images
    spilled = []
    park = bulk_generation._park

    def spy(batch, spill, j, offload):
        park(batch, spill, j, offload)
        spilled.append(sorted(load_file(os.path.join(spill, f"batch_{j}.safetensors"))))

    monkeypatch.setattr(bulk_generation, "_park", spy)
    on_disk = pipe.generate_many(
        3, batch_size=2, seed=4, num_inference_steps=4, output_dir=tmp_path, intermediates="disk"
    )
    assert all(np.array_equal(np.asarray(a), np.asarray(Image.open(p))) for a, p in zip(in_memory, on_disk.paths))
    # after the first step the DPM-Solver history is spilled with the latents
    assert any(key.startswith("state.model_outputs.") for keys in spilled for key in keys)


@pytest.mark.parametrize("name", ["heun", "lms", "unipc"])
def test_disk_intermediates_equal_the_call_for_solvers_with_state(mixture4, name, tmp_path):
    # Heun's two calls of a step often go to different experts: its first-order state is parked between them
    pipe = make_pipe(mixture4, scheduler_from_name(name))
    on_disk = pipe.generate_many(
        3, batch_size=2, seed=1, num_inference_steps=4, output_dir=tmp_path, intermediates="disk"
    )
    expected = [pipe(len(i), 4, per_image_generators(i, 1), output_type="pil").images for i in ([0, 1], [2])]
    expected = [image for chunk in expected for image in chunk]
    assert all(np.array_equal(np.asarray(a), np.asarray(Image.open(p))) for a, p in zip(expected, on_disk.paths))


@pytest.mark.parametrize("name", sorted(SCHEDULER_NAMES))
def test_solver_state_fields_name_every_batch_shaped_tensor_a_scheduler_keeps(name):
    scheduler = scheduler_from_name(name)
    assert type(scheduler).__name__ in bulk_generation.SOLVER_STATE_FIELDS
    scheduler.set_timesteps(5)
    latents = torch.randn(2, 3, 4, 4, generator=torch.manual_seed(0))
    generator = torch.manual_seed(1)
    for t in scheduler.timesteps:
        extra = {"generator": generator} if name in ("ddpm", "euler-a") else {}
        eps = torch.randn(latents.shape, generator=generator)
        latents = scheduler.step(eps, t, scheduler.scale_model_input(latents, t), **extra).prev_sample
        # what a scan of the scheduler finds shaped like the batch is exactly what the table takes away
        state = bulk_generation.take_solver_state(scheduler)
        leftover = [
            key
            for key, value in vars(scheduler).items()
            if (torch.is_tensor(value) and value.shape == latents.shape)
            or (isinstance(value, list) and any(torch.is_tensor(v) and v.shape == latents.shape for v in value))
        ]
        assert leftover == [], (name, leftover)
        bulk_generation.put_solver_state(scheduler, state)


@pytest.mark.parametrize("scheduler", [DDIMScheduler(), EulerDiscreteScheduler(), scheduler_from_name("heun")])
def test_split_run_equals_full_run(mixture4, scheduler):
    pipe = make_pipe(mixture4, scheduler)
    full = pipe(2, 6, torch.manual_seed(3), output_type="latent").images
    calls = record_calls(pipe)
    handover = pipe(2, 6, torch.manual_seed(3), denoising_end=0.5, output_type="latent").images
    assert {c["expert"] for c in calls} == {2, 3}  # the high-noise experts only
    calls.clear()
    rest = pipe(2, 6, latents=handover, denoising_start=0.5, output_type="latent").images
    if scheduler.order == 1:
        assert {c["expert"] for c in calls} == {0, 1}
    assert torch.allclose(rest, full, atol=1e-5)


@pytest.mark.parametrize("name", ["dpmpp", "unipc", "dpmpp-karras", "heun", "ddim", "blended-dpmpp"])
def test_split_run_with_the_handed_over_solver_state_equals_the_full_run(mixture4, name):
    base = scheduler_from_name(name.removeprefix("blended-"))
    pipe = make_pipe(mixture4, BlendedScheduler.from_scheduler(base) if name.startswith("blended-") else base)
    kwargs = dict(batch_size=2, num_inference_steps=7, output_type="latent")
    full = pipe(generator=torch.manual_seed(3), **kwargs).images
    first = pipe(generator=torch.manual_seed(3), denoising_end=0.5, **kwargs)
    assert first.solver_state is not None and first.solver_state is not pipe.scheduler
    rest = pipe(latents=first.images, denoising_start=0.5, solver_state=first.solver_state, **kwargs).images
    assert torch.equal(rest, full), (name, (rest - full).abs().max())
    # the handed-over state is copied, not consumed: a second continuation gives the same result
    again = pipe(latents=first.images, denoising_start=0.5, solver_state=first.solver_state, **kwargs).images
    assert torch.equal(again, full)
    # a tuple output carries the state too (diffusers' to_tuple: the fields that are not None)
    images, state = pipe(generator=torch.manual_seed(3), denoising_end=0.5, return_dict=False, **kwargs)
    assert torch.equal(images, first.images) and type(state) is type(pipe.scheduler)


def test_solver_state_errors_name_the_argument(mixture4):
    pipe = make_pipe(mixture4, scheduler_from_name("dpmpp"))
    first = pipe(batch_size=1, num_inference_steps=6, denoising_end=0.5, output_type="latent")
    latents = first.images
    with pytest.raises(ValueError, match="`solver_state`.*with `denoising_start`"):
        pipe(batch_size=1, num_inference_steps=6, latents=latents, solver_state=first.solver_state)
    with pytest.raises(ValueError, match="`solver_state` comes from a 6-step run, but num_inference_steps=8"):
        pipe(
            batch_size=1, num_inference_steps=8, latents=latents, denoising_start=0.5, solver_state=first.solver_state
        )
    with pytest.raises(
        ValueError, match=r"`solver_state` stopped at step 4 of 6, but denoising_start=0.75 starts at step 5"
    ):
        pipe(
            batch_size=1, num_inference_steps=6, latents=latents, denoising_start=0.75, solver_state=first.solver_state
        )
    with pytest.raises(TypeError, match="`solver_state` must be .*DPMSolverMultistepScheduler.*got DDIMScheduler"):
        pipe(batch_size=1, num_inference_steps=6, latents=latents, denoising_start=0.5, solver_state=DDIMScheduler())


def test_pipeline_round_trip_with_blended_scheduler_and_vae(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=3, norm_num_groups=8, sample_size=16).eval()
    scheduler = BlendedScheduler.from_scheduler(DPMSolverMultistepScheduler(), steps_per_expert=[1, 2])
    pipe = make_pipe(tiny_mixture(2), scheduler, vae=vae)
    before = pipe(2, 3, torch.manual_seed(0), output_type="np").images
    pipe.save_pretrained(tmp_path)
    loaded = MultiExpertPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, BlendedScheduler) and loaded.scheduler.config.steps_per_expert == [1, 2]
    assert isinstance(loaded.vae, AutoencoderKL)
    assert np.array_equal(loaded(2, 3, torch.manual_seed(0), output_type="np").images, before)
    # a model_index.json naming another library is refused before anything is imported
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["vae"] = ["os", "system"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="Component `vae`.*library 'os'"):
        MultiExpertPipeline.from_pretrained(tmp_path)


def test_bad_input_raises_value_errors_naming_the_argument(mixture4):
    pipe = make_pipe(mixture4)
    cases = [
        (dict(output_type="jpeg"), "output_type"),
        (dict(class_labels=1), "class_labels"),
        (dict(guidance_scale=2.0), "guidance_scale"),
        (dict(guidance_scale=[1.0, 2.0]), "guidance_scale"),
        (dict(denoising_start=0.6, denoising_end=0.4, latents=torch.zeros(1, 3, 16, 16)), "denoising_start"),
        (dict(denoising_start=0.5), "latents"),
        (dict(denoising_end=1.5), "denoising_end"),
        (dict(latents=torch.zeros(1, 3, 8, 8)), "latents"),
        (dict(batch_size=2, generator=[torch.Generator()]), "generator"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=f"`{name}`"):
            pipe(num_inference_steps=2, **kwargs)
    conditional = make_pipe(conditional_mixture(num_classes=3))
    with pytest.raises(ValueError, match=r"`class_labels` must lie in \[0, 2\]"):
        conditional(num_inference_steps=2, class_labels=3, guidance_scale=2.0)
    with pytest.raises(ValueError, match="`class_labels` must be given"):
        conditional(num_inference_steps=2)
    with pytest.raises(ValueError, match="Unknown scheduler name 'dpm\\+\\+'"):
        scheduler_from_name("dpm++")
    with pytest.raises(ValueError, match="`intermediates`"):
        pipe.generate_many(2, intermediates="cloud")
    with pytest.raises(TypeError, match="`unet`"):
        MultiExpertPipeline(unet=tiny_unet(), scheduler=DDIMScheduler())
    with pytest.raises(ValueError, match="num_train_timesteps"):
        MultiExpertPipeline(unet=mixture4, scheduler=DDIMScheduler(num_train_timesteps=500))
