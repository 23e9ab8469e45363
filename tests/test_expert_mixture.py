"""ExpertMixtureUNet: routing decisions, cost, drop-in behaviour, save/load and errors."""

import json
import os

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from conftest import tiny_iunet, tiny_mixture, tiny_text_unet, tiny_unet
from diffusers_experts import ExpertMixtureUNet, IUNet2DModel, register_expert_class


class CallCounter:
    """Records, per expert, the timesteps each call received."""

    def __init__(self, mixture):
        self.calls = {k: [] for k in range(mixture.num_experts)}
        for k, expert in enumerate(mixture.experts):
            expert.register_forward_pre_hook(self._hook(k), with_kwargs=True)

    def _hook(self, k):
        def hook(module, args, kwargs):
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            self.calls[k].append(torch.as_tensor(t).reshape(-1).tolist())

        return hook

    def counts(self):
        return [len(v) for v in self.calls.values()]


def test_mixed_architectures_and_sizes():
    experts = [tiny_iunet(0), tiny_unet(1), tiny_iunet(2, block_out_channels=(32, 64))]
    mixture = ExpertMixtureUNet.from_experts(experts, boundaries=[300, 600])
    assert isinstance(mixture.experts, torch.nn.ModuleList)
    assert mixture.config.expert_classes == [
        "diffusers_experts.IUNet2DModel",
        "diffusers.UNet2DModel",
        "diffusers_experts.IUNet2DModel",
    ]
    assert (mixture.config.sample_size, mixture.config.in_channels, mixture.config.out_channels) == (16, 3, 3)
    assert mixture.expert_intervals == [(0.0, 300.0), (300.0, 600.0), (600.0, 1000.0)]
    out = mixture(torch.randn(3, 3, 16, 16), torch.tensor([0, 450, 999])).sample
    assert out.shape == (3, 3, 16, 16)


def test_hard_routing_calls_the_owner_of_each_timestep():
    mixture = tiny_mixture(4)
    counter = CallCounter(mixture)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        for t, owner in [(0, 0), (249, 0), (250, 1), (499, 1), (500, 2), (749, 2), (750, 3), (999, 3)]:
            before = counter.counts()
            out = mixture(x, t).sample
            after = counter.counts()
            assert [a - b for a, b in zip(after, before)] == [int(k == owner) for k in range(4)]
            assert torch.equal(out, mixture.experts[owner](x, t).sample)


def test_scalar_fast_path_agrees_with_tensor_routing_near_boundaries():
    mixture = tiny_mixture(3)  # boundaries 333.33.., 666.66..
    for b in mixture.config.boundaries:
        near = torch.tensor([b - 1e-3, b - 1e-5, b, b + 1e-5, b + 1e-3], dtype=torch.float32)
        near = torch.cat([near, near.double(), torch.tensor([round(b) - 1.0, round(b) + 0.0])])
        for t in near:
            expected = int(mixture.expert_weights(t.reshape(1)).argmax())
            assert mixture._hard_owner(t) == expected, (float(t), t.dtype)
            assert mixture._hard_owner(t.item()) == expected
    assert mixture._hard_owner(torch.tensor([1, 2])) is None
    assert tiny_mixture(2, routing="linear")._hard_owner(5) is None


def test_mixed_batch_runs_each_expert_on_its_own_samples_only():
    mixture = tiny_mixture(3)
    counter = CallCounter(mixture)
    x = torch.randn(5, 3, 16, 16)
    t = torch.tensor([10, 900, 400, 20, 700])
    with torch.no_grad():
        out = mixture(x, t).sample
    assert counter.calls == {0: [[10, 20]], 1: [[400]], 2: [[900, 700]]}
    with torch.no_grad():
        for i in range(5):
            owner = int(t[i]) * 3 // 1000
            expected = mixture.experts[owner](x[i : i + 1], t[i : i + 1]).sample
            torch.testing.assert_close(out[i : i + 1], expected, atol=1e-5, rtol=1e-5)


def test_blend_is_weighted_sum_and_skips_zero_weight_experts():
    mixture = tiny_mixture(3, routing="linear", blend_width=200.0)
    counter = CallCounter(mixture)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([333.0, 340.0])  # around boundary 333.3: experts 0 and 1 only
    w = mixture.expert_weights(t)
    assert w[:, 2].eq(0).all() and w[:, :2].gt(0).all()
    with torch.no_grad():
        out = mixture(x, t).sample
        manual = sum(w[:, k].view(-1, 1, 1, 1) * mixture.experts[k](x, t).sample for k in range(2))
    assert counter.counts() == [2, 2, 0]  # 1 call each inside the mixture, 1 each for the manual sum
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", ["hard", "linear", "sigmoid", "learned"])
@pytest.mark.parametrize("num_experts", [1, 2, 4])
def test_weights_sum_to_one_in_every_mode(routing, num_experts):
    mixture = tiny_mixture(num_experts, routing=routing)
    t = torch.linspace(0, 999, 200)
    w = mixture.expert_weights(t).detach()
    assert w.shape == (200, num_experts) and (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(200))
    scalar = mixture.expert_weights(500, batch_size=3)
    assert scalar.shape == (3, num_experts)


def test_weight_threshold_drops_far_experts():
    mixture = tiny_mixture(4, routing="sigmoid", weight_threshold=0.01)
    w = mixture.expert_weights(torch.tensor([100.0]))
    assert w[0, 3] == 0 and w[0, 2] > 0.01  # sigmoid(-6.5) - 0 < 0.01 is dropped, 0.0165 is kept
    torch.testing.assert_close(w.sum(1), torch.ones(1))
    assert mixture.active_experts(torch.tensor([100.0])) == [0, 1, 2]
    assert tiny_mixture(4, routing="sigmoid").active_experts(torch.tensor([100.0])) == [0, 1, 2, 3]


@pytest.mark.parametrize("expert_factory", [tiny_unet, tiny_iunet])
def test_one_expert_mixture_is_bit_identical(expert_factory):
    expert = expert_factory()
    mixture = ExpertMixtureUNet.from_experts([expert])
    x = torch.randn(3, 3, 16, 16)
    for t in (0, 999, torch.tensor([1, 500, 998])):
        with torch.no_grad():
            assert torch.equal(mixture(x, t).sample, expert(x, t).sample)
    pipe_kwargs = dict(batch_size=2, num_inference_steps=3, output_type="np")
    a = DDIMPipeline(unet=mixture, scheduler=DDIMScheduler())(generator=torch.manual_seed(0), **pipe_kwargs).images
    b = DDIMPipeline(unet=expert, scheduler=DDIMScheduler())(generator=torch.manual_seed(0), **pipe_kwargs).images
    assert (a == b).all()


def test_drop_in_for_diffusers_pipelines():
    mixture = tiny_mixture(2, routing="linear")
    assert mixture.dtype == torch.float32 and mixture.device.type == "cpu"
    ddim = DDIMPipeline(unet=mixture, scheduler=DDIMScheduler())
    images = ddim(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and (images >= 0).all() and (images <= 1).all()
    ddpm = DDPMPipeline(unet=mixture, scheduler=DDPMScheduler(num_train_timesteps=1000))
    images = ddpm(batch_size=1, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_identical_experts_equal_one_expert_in_ddim():
    expert = tiny_unet()
    twin = tiny_unet()
    mixture = ExpertMixtureUNet.from_experts([expert, twin], routing="sigmoid")
    kwargs = dict(batch_size=2, num_inference_steps=4, output_type="np")
    a = DDIMPipeline(unet=mixture, scheduler=DDIMScheduler())(generator=torch.manual_seed(1), **kwargs).images
    b = DDIMPipeline(unet=expert, scheduler=DDIMScheduler())(generator=torch.manual_seed(1), **kwargs).images
    assert abs(a - b).max() < 1e-4


def test_learned_routing_gets_gradients_and_survives_save_load(tmp_path):
    mixture = tiny_mixture(2, routing="learned", num_knots=5).train()
    assert mixture.routing_logits.shape == (5, 2)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([100, 800])
    mixture(x, t).sample.pow(2).mean().backward()
    assert mixture.routing_logits.grad is not None and mixture.routing_logits.grad.abs().sum() > 0
    assert mixture.experts[0].conv_in.weight.grad is not None
    with torch.no_grad():
        mixture.routing_logits.add_(torch.randn(5, 2))
    mixture.save_pretrained(tmp_path)
    assert (tmp_path / "routing.safetensors").is_file()
    loaded = ExpertMixtureUNet.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.routing_logits, mixture.routing_logits)
    mixture.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, mixture(x, t).sample)


def test_save_layout_and_experts_load_alone(tmp_path):
    mixture = ExpertMixtureUNet.from_experts([tiny_iunet(0), tiny_unet(1)], boundaries=[0.4])
    mixture.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "expert_0", "expert_1"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "ExpertMixtureUNet" and config["boundaries"] == [400.0]
    alone0 = IUNet2DModel.from_pretrained(tmp_path, subfolder="expert_0")
    alone1 = UNet2DModel.from_pretrained(tmp_path, subfolder="expert_1")
    x = torch.randn(1, 3, 16, 16)
    close = dict(atol=1e-5, rtol=1e-5)  # same weights; separately allocated modules may pick other kernels
    with torch.no_grad():
        torch.testing.assert_close(alone0.eval()(x, 5).sample, mixture.experts[0](x, 5).sample, **close)
        torch.testing.assert_close(alone1.eval()(x, 5).sample, mixture.experts[1](x, 5).sample, **close)
    loaded = ExpertMixtureUNet.from_pretrained(tmp_path)
    for k in range(2):
        for name, value in mixture.experts[k].state_dict().items():
            assert torch.equal(loaded.experts[k].state_dict()[name], value), name
    with torch.no_grad():
        for t in (5, 400, 900):
            torch.testing.assert_close(loaded(x, t).sample, mixture(x, t).sample, **close)


def test_from_experts_accepts_paths(tmp_path):
    tiny_iunet(0).save_pretrained(tmp_path / "a")
    tiny_unet(1).save_pretrained(tmp_path / "b")
    mixture = ExpertMixtureUNet.from_experts([str(tmp_path / "a"), tmp_path / "b"])
    assert [type(e).__name__ for e in mixture.experts] == ["IUNet2DModel", "UNet2DModel"]


def test_resave_over_existing_folder_replaces_experts(tmp_path):
    tiny_mixture(3).save_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("user file")
    two = tiny_mixture(2, routing="learned")
    two.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "expert_0", "expert_1", "notes.txt", "routing.safetensors"]
    assert ExpertMixtureUNet.from_pretrained(tmp_path).num_experts == 2
    assert not [p for p in os.listdir(tmp_path.parent) if ".tmp-" in p]


def test_interrupted_save_leaves_previous_content(tmp_path, monkeypatch):
    mixture = tiny_mixture(2)
    mixture.save_pretrained(tmp_path)
    before = (tmp_path / "expert_1" / "diffusion_pytorch_model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(mixture.experts[1]), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny_mixture(2, seed=5).save_pretrained(tmp_path)
    assert (tmp_path / "expert_1" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path.parent) if ".tmp-" in p]


def test_custom_expert_class_needs_registration(tmp_path):
    class MyUNet(UNet2DModel):
        pass

    mixture = ExpertMixtureUNet.from_experts([MyUNet(**tiny_unet().config)])
    mixture.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Unknown expert class 'test_expert_mixture.MyUNet'.*register_expert_class"):
        ExpertMixtureUNet.from_pretrained(tmp_path)
    register_expert_class(MyUNet)
    assert type(ExpertMixtureUNet.from_pretrained(tmp_path).experts[0]) is MyUNet


# ---------------------------------------------------------------- errors


def test_error_mismatched_experts():
    with pytest.raises(ValueError, match=r"share `in_channels`, got \[3, 1\]"):
        ExpertMixtureUNet.from_experts([tiny_unet(), tiny_unet(in_channels=1)])
    with pytest.raises(ValueError, match=r"share `sample_size`, got \[16, 32\]"):
        ExpertMixtureUNet.from_experts([tiny_unet(), tiny_unet(sample_size=32)])
    with pytest.raises(ValueError, match="share `out_channels`"):
        ExpertMixtureUNet.from_experts([tiny_unet(), tiny_unet(out_channels=6)])
    with pytest.raises(ValueError, match="share `num_class_embeds`"):
        ExpertMixtureUNet.from_experts([tiny_iunet(), tiny_iunet(num_class_embeds=3)])


def test_error_bad_experts_and_arguments():
    with pytest.raises(ValueError, match="at least one expert"):
        ExpertMixtureUNet.from_experts([])
    with pytest.raises(TypeError, match=r"experts\[1\].*ModelMixin.*Conv2d"):
        ExpertMixtureUNet.from_experts([tiny_unet(), torch.nn.Conv2d(3, 3, 1)])
    with pytest.raises(TypeError, match="list of expert models"):
        ExpertMixtureUNet.from_experts(tiny_unet())
    with pytest.raises(ValueError, match=r"routing.*\['hard', 'linear', 'sigmoid', 'learned'\].*'soft'"):
        tiny_mixture(2, routing="soft")
    with pytest.raises(ValueError, match="strictly ascending"):
        tiny_mixture(3, boundaries=[600, 300])
    with pytest.raises(ValueError, match=r"open interval \(0, 1000\)"):
        tiny_mixture(2, boundaries=[1000])
    with pytest.raises(ValueError, match="num_experts - 1 = 1"):
        tiny_mixture(2, boundaries=[300, 600])
    with pytest.raises(TypeError, match="Unknown routing argument.*'blend'"):
        tiny_mixture(2, blend=3)
    with pytest.raises(ValueError, match="experts` is required.*from_experts"):
        ExpertMixtureUNet.from_config(tiny_mixture(2).config)


def test_error_expert_weights_and_class_labels():
    mixture = tiny_mixture(2)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"expert_weights.*\(2, 2\), got \(2, 3\)"):
        mixture(x, 5, expert_weights=torch.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="sum to 1"):
        mixture(x, 5, expert_weights=torch.tensor([[0.5, 0.6], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="sum to 1"):
        mixture(x, 5, expert_weights=torch.tensor([[1.5, -0.5], [1.0, 0.0]]))
    out = mixture(x, 5, expert_weights=torch.tensor([[0.0, 1.0], [0.25, 0.75]])).sample
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="class_labels.*unconditional"):
        mixture(x, 5, class_labels=torch.tensor([0, 1]))
    conditional = ExpertMixtureUNet.from_experts([tiny_iunet(num_class_embeds=3)])
    with pytest.raises(ValueError, match="class_labels.*must be given"):
        conditional(x, 5)
    with pytest.raises(ValueError, match="one value per sample"):
        mixture(x, torch.tensor([1, 2, 3]))


def test_error_loading(tmp_path):
    tiny_mixture(2).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["expert_classes"][1] = "os.system"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unknown expert class 'os.system'"):
        ExpertMixtureUNet.from_pretrained(tmp_path)
    config["expert_classes"][1] = "diffusers.UNet2DModel"
    (tmp_path / "config.json").write_text(json.dumps(config))
    import shutil

    shutil.rmtree(tmp_path / "expert_1")
    with pytest.raises(ValueError, match="Expert 1 .*missing: no folder 'expert_1'"):
        ExpertMixtureUNet.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither a model folder nor a Hub repo id"):
        ExpertMixtureUNet.from_pretrained(str(tmp_path / "nope" / "deeper" / "x"))


def test_soft_expert_sampler_on_the_mixture():
    mixture = tiny_mixture(4)
    g = torch.Generator().manual_seed(0)
    t = mixture.sample_training_timesteps(4000, 0, generator=g)
    share = ((t >= 0) & (t < 250)).float().mean().item()
    assert abs(share - (0.8 + 0.2 * 0.25)) < 0.03
    t = mixture.sample_training_timesteps(1000, 3, strategy="hard", generator=g)
    assert t.min() >= 750
    with pytest.raises(ValueError, match="one probability per expert"):
        mixture.sample_training_timesteps(4, 0, expertization_probs=[0.5])
    with pytest.raises(ValueError, match=r"expert.*\[0, 3\]"):
        mixture.sample_training_timesteps(4, 7)


def test_gradient_checkpointing_reaches_experts():
    mixture = tiny_mixture(2, kind="iunet").train()
    mixture.enable_gradient_checkpointing()
    assert all(e.gradient_checkpointing for e in mixture.experts)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    mixture(x, t).sample.mean().backward()
    assert all(e.conv_in.weight.grad is not None for e in mixture.experts)


def test_saved_folders_get_normal_permissions(tmp_path):
    from diffusers_experts.hub import save_model_cards

    old = os.umask(0o022)
    try:
        mixture = tiny_mixture(2)
        mixture.save_pretrained(tmp_path / "mix")
        save_model_cards(tmp_path / "mix", mixture)
    finally:
        os.umask(old)
    assert (tmp_path / "mix").stat().st_mode & 0o777 == 0o755  # not tempfile's 0700
    assert (tmp_path / "mix" / "README.md").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert (tmp_path / "mix" / "expert_0").stat().st_mode & 0o777 == 0o755


# --- diffusers model conventions: pipelines, save/load arguments, variants, shards, dtypes


def _images(pipeline_cls, scheduler, unet, **kwargs):
    pipe = pipeline_cls(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2, generator=torch.manual_seed(0), output_type="np", **kwargs).images


@pytest.mark.parametrize(
    "pipeline_cls, scheduler", [(DDPMPipeline, DDPMScheduler()), (DDIMPipeline, DDIMScheduler())], ids=["ddpm", "ddim"]
)
def test_one_expert_and_hard_mixtures_are_bit_identical_to_the_plain_model(pipeline_cls, scheduler):
    import copy

    expert = tiny_unet()
    one = ExpertMixtureUNet.from_experts([expert])
    hard = ExpertMixtureUNet.from_experts([copy.deepcopy(expert) for _ in range(3)], boundaries=[250.5, 600])
    plain = _images(pipeline_cls, scheduler, expert, num_inference_steps=5)
    assert (plain == _images(pipeline_cls, scheduler, one, num_inference_steps=5)).all()
    assert (plain == _images(pipeline_cls, scheduler, hard, num_inference_steps=5)).all()


def test_pipeline_save_load_both_ways(tmp_path):
    from diffusers import DiffusionPipeline

    from diffusers_experts import MultiExpertPipeline

    mixture = tiny_mixture(3, routing="learned", num_knots=4)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = mixture(x, torch.tensor([100, 700])).sample
    # a diffusers pipeline saves it (pickle weights too, as diffusers writes them); ours and diffusers' load it
    DDIMPipeline(unet=mixture, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "ddim", safe_serialization=False)
    assert (tmp_path / "ddim/unet/expert_0/diffusion_pytorch_model.bin").is_file()
    assert (tmp_path / "ddim/unet/routing.safetensors").is_file()  # our own tensors: safetensors always
    # ours saves it; a diffusers pipeline class loads it (DiffusionPipeline itself resolves class names in diffusers)
    MultiExpertPipeline(unet=mixture, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "ours")
    for loaded in (
        DiffusionPipeline.from_pretrained(tmp_path / "ddim"),
        MultiExpertPipeline.from_pretrained(tmp_path / "ddim"),
        DDIMPipeline.from_pretrained(tmp_path / "ours"),
    ):
        assert isinstance(loaded.unet, ExpertMixtureUNet) and loaded.unet.config.routing == "learned"
        with torch.no_grad():
            torch.testing.assert_close(loaded.unet(x, torch.tensor([100, 700])).sample, expected)


def test_variant_and_sharded_round_trips(tmp_path):
    from diffusers import DiffusionPipeline

    from diffusers_experts import MultiExpertPipeline

    mixture = tiny_mixture(2, routing="learned", num_knots=4)
    state = mixture.state_dict()

    def assert_same(loaded):
        assert sorted(loaded.state_dict()) == sorted(state)
        for name, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, state[name]), name

    # variant: file names carry it; the mixture, our pipeline and diffusers' pipeline load it back
    mixture.save_pretrained(tmp_path / "variant", variant="fp16")
    assert (tmp_path / "variant/expert_1/diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (tmp_path / "variant/routing.fp16.safetensors").is_file()
    assert not (tmp_path / "variant/routing.safetensors").exists()
    assert_same(ExpertMixtureUNet.from_pretrained(tmp_path / "variant", variant="fp16"))
    with pytest.raises((OSError, ValueError), match="diffusion_pytorch_model"):
        ExpertMixtureUNet.from_pretrained(tmp_path / "variant")  # no non-variant weights: an error, not a guess
    DDIMPipeline(unet=mixture, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe", variant="fp16")
    assert (tmp_path / "pipe/unet/expert_0/diffusion_pytorch_model.fp16.safetensors").is_file()
    assert_same(DiffusionPipeline.from_pretrained(tmp_path / "pipe", variant="fp16").unet)
    assert_same(MultiExpertPipeline.from_pretrained(tmp_path / "pipe", variant="fp16").unet)

    # shards: each expert is split into files no larger than max_shard_size, with diffusers' index
    DDIMPipeline(unet=mixture, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "shards", max_shard_size="100KB")
    expert_0 = tmp_path / "shards/unet/expert_0"
    shards = sorted(p.name for p in expert_0.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1 and (expert_0 / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert all((expert_0 / name).stat().st_size < 200_000 for name in shards)
    assert_same(DiffusionPipeline.from_pretrained(tmp_path / "shards").unet)


def test_half_precision_keeps_the_routing_logits_in_float32_and_runs_in_pipelines(tmp_path):
    mixture = tiny_mixture(3, routing="learned", num_knots=4)
    logits = mixture.routing_logits.detach().clone()
    mixture.save_pretrained(tmp_path)
    for half in (
        ExpertMixtureUNet.from_pretrained(tmp_path, torch_dtype=torch.bfloat16),
        tiny_mixture(3, routing="learned", num_knots=4).to(torch.bfloat16),
        tiny_mixture(3, routing="learned", num_knots=4).half().float().bfloat16(),
    ):
        assert half.dtype == torch.bfloat16 and half.experts[0].dtype == torch.bfloat16
        assert half.routing_logits.dtype == torch.float32 and torch.equal(half.routing_logits, logits)
        pipe = DDIMPipeline(unet=half, scheduler=DDIMScheduler())
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images
        assert images.dtype == torch.bfloat16 and torch.isfinite(images.float()).all()
    assert mixture.dtype == torch.float32


def test_save_pretrained_names_unknown_arguments(tmp_path):
    with pytest.raises(TypeError, match=r"Unknown argument\(s\) \['shard_size'\].*repo_id"):
        tiny_mixture(2).save_pretrained(tmp_path, shard_size="1MB")


def test_experts_must_share_one_call_signature_and_calls_are_checked_against_it():
    with pytest.raises(TypeError, match=r"one call signature: expert 0 \(UNet2DModel\) takes \['sample', 'timestep'"):
        ExpertMixtureUNet.from_experts([tiny_unet(0, in_channels=4, out_channels=4, sample_size=8), tiny_text_unet(0)])
    mixture = ExpertMixtureUNet.from_experts([tiny_text_unet(0), tiny_text_unet(1)])
    assert mixture.call_parameters[:3] == ("sample", "timestep", "encoder_hidden_states")
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16)
    with pytest.raises(TypeError, match="missing a required argument: 'encoder_hidden_states'"):
        mixture(sample, 10)
    with pytest.raises(TypeError, match="got an unexpected keyword argument 'bogus'"):
        mixture(sample, 10, text, bogus=1)
    with pytest.raises(ValueError, match="`timestep` is required"):
        mixture(sample, None, text)


def test_attention_api_reaches_every_expert_and_layerwise_casting_follows_each_expert():
    import copy

    from conftest import tiny_wan_transformer

    experts = [tiny_text_unet(0), tiny_text_unet(1)]
    mixture = ExpertMixtureUNet.from_experts([copy.deepcopy(e) for e in experts], boundaries=[500])
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16)
    timesteps = torch.tensor([100, 900])
    with torch.no_grad():
        before = mixture(sample, timesteps, text).sample
        mixture.set_default_attn_processor()  # broadcast to every expert
        for expert in mixture.experts:
            assert {type(p).__name__ for p in expert.attn_processors.values()} == {"AttnProcessor"}
        mixture.set_attention_slice("auto")
        for expert in mixture.experts:
            assert {type(p).__name__ for p in expert.attn_processors.values()} == {"SlicedAttnProcessor"}
        after = mixture(sample, timesteps, text).sample
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert mixture.attn_processors.keys() == experts[0].attn_processors.keys()
    # layerwise casting: each expert keeps in the compute dtype what its own class keeps (Wan's embedder, proj_out)
    plain, mixed = tiny_wan_transformer(0), ExpertMixtureUNet.from_experts([tiny_wan_transformer(0)])
    plain.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    mixed.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    expected = {name: p.dtype for name, p in plain.named_parameters()}
    assert {name: p.dtype for name, p in mixed.experts[0].named_parameters()} == expected
    assert {torch.float32, torch.float8_e4m3fn} <= set(expected.values())
