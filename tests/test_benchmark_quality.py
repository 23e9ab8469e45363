"""benchmarks/quality.py and its protocol (benchmarks/quality_protocol.py): budgets of the two arms, identical data and
noise streams across models, the EMA of learned routing, the claim verdicts, and one tiny end-to-end run."""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]


def _load(relative: str):
    """Import a benchmark script as a module (registered, so that dataclasses and pickling find it)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    name = Path(relative).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


P = _load("benchmarks/quality_protocol.py")


# ------------------------------------------------------------------------------------------------ budgets


def test_arm_budgets_single_models():
    large, small = P.MODEL_SPECS["unet-large"], P.MODEL_SPECS["unet-small"]
    ref = P.arm_budgets(large, [80.0], reference_macs=80.0, steps=100, batch_size=8)
    assert ref["A"] == ref["B"] and ref["A"].updates_per_expert == 100 and ref["A"].train_macs == 100 * 8 * 80.0
    b = P.arm_budgets(small, [20.0], reference_macs=80.0, steps=100, batch_size=8)
    assert b["A"].updates_per_expert == 100  # per-expert parity: as many updates as the reference
    assert b["B"].updates_per_expert == 400 and b["B"].train_macs == ref["B"].train_macs  # 4x cheaper: 4x the steps


def test_arm_budgets_experts_and_blends():
    experts = P.MODEL_SPECS["meme-soft"]
    b = P.arm_budgets(experts, [20.0, 21.0, 22.0, 23.0], reference_macs=80.0, steps=100, batch_size=8)
    assert b["A"].updates_per_expert == 100 and b["A"].optimizer_steps == 400  # one expert per loop step
    compute = 100 * 8 * 80.0
    assert b["B"].updates_per_expert == math.floor(compute / (8 * 86.0))
    assert b["B"].optimizer_steps == 4 * b["B"].updates_per_expert
    assert compute - 8 * 86.0 < b["B"].train_macs <= compute  # within one round of the reference's compute
    blend = P.MODEL_SPECS["blend-linear"]
    b = P.arm_budgets(blend, [20.0, 20.0], reference_macs=80.0, steps=100, batch_size=8, activity=[1.0, 1.0])
    assert b["A"].updates_per_expert == 100 and b["B"].updates_per_expert == 200  # both experts run: 40 per sample
    hard = P.arm_budgets(P.MODEL_SPECS["blend-hard"], [20.0, 20.0], 80.0, 100, 8, activity=[0.5, 0.5])
    assert hard["B"].updates_per_expert == 400  # one expert per sample
    with pytest.raises(ValueError, match="activity"):
        P.arm_budgets(blend, [20.0, 20.0], 80.0, 100, 8)


def test_learning_rate_is_constant_after_warmup():
    assert [P.constant_lr_factor(u, 4) for u in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------------ streams


def test_streams_are_identical_per_seed_and_independent_of_timestep_draws():
    a, b, c = P.TrainingStreams(0), P.TrainingStreams(0), P.TrainingStreams(1)
    a.timesteps.manual_seed(99)  # another model drawing expert timesteps differently must not shift data or noise
    torch.randint(0, 10, (50,), generator=a.timesteps)
    for _ in range(3):
        (ia, na), (ib, nb), (ic, _) = (
            a.batch(100, 4, (1, 4, 4)),
            b.batch(100, 4, (1, 4, 4)),
            c.batch(100, 4, (1, 4, 4)),
        )
        assert torch.equal(ia, ib) and torch.equal(na, nb)
        labels = torch.arange(4)
        assert torch.equal(a.drop_labels(labels, 0.5, 10), b.drop_labels(labels, 0.5, 10))
    assert not torch.equal(ia, ic)


# ------------------------------------------------------------------------------------------------ verdicts


def test_verdicts():
    better = P.verdict([1.0, 1.1], [2.0, 2.1], "<")
    assert better["verdict"] == P.SUPPORTED and better["a_mean"] == pytest.approx(1.05)
    assert P.verdict([2.0, 2.1], [1.0, 1.1], "<")["verdict"] == P.NOT_SUPPORTED
    assert P.verdict([1.0, 2.0], [1.5, 1.6], "<")["verdict"] == P.CANT_TELL  # seeds disagree
    assert P.verdict([1.0, 1.6], [1.1, 1.7], "<")["verdict"] == P.CANT_TELL  # gap below the spread
    assert P.verdict([1.01, 1.015], [1.0, 1.0], "<=", margin=0.02)["verdict"] == P.SUPPORTED  # within the margin
    assert P.verdict([1.2, 1.21], [1.0, 1.0], "<=", margin=0.02)["verdict"] == P.NOT_SUPPORTED
    assert P.verdict([1.0], [2.0], "<")["verdict"] == P.CANT_TELL  # one seed
    rows = P.claim_rows({"A": {"meme-soft": [1.0, 1.1], "meme-hard": [2.0, 2.1]}})
    assert [(r["a"], r["b"], r["arm"], r["verdict"]) for r in rows] == [("meme-soft", "meme-hard", "A", P.SUPPORTED)]


def test_guidance_choices():
    fids = {"x": {1.0: 10.0, 2.0: 5.0}, "y": {1.0: 100.0, 2.0: 120.0}, "z": {1.0: 8.0, 2.0: 4.0}}
    assert P.best_guidance_scale(fids["y"]) == 1.0
    assert P.shared_guidance_scale(fids) == 2.0  # mean log-FID: one bad model does not decide
    assert P.mean_spread([1.0, 3.0, None]) == (2.0, 1.0)


# ------------------------------------------------------------------------------------------------ training loop


@pytest.fixture(scope="module")
def quality():
    return _load("benchmarks/quality.py")


def _settings(quality, **overrides):
    args = quality.parse_args(["--quick", "--batch-size", "4"])
    settings = {k: getattr(args, k) for k in ("batch_size", "learning_rate", "routing_lr", "warmup", "ema_max_decay")}
    settings |= {k: getattr(args, k) for k in ("class_dropout", "prediction_type")}
    return settings | overrides


def test_every_model_of_a_seed_sees_the_same_batches_and_noise(quality, monkeypatch):
    seen = {}
    real_loss = quality.denoising_loss

    def recording_loss(net, scheduler, clean, noise, timesteps, labels, prediction_type):
        seen.setdefault(current, []).append((clean, noise, timesteps, labels))
        return real_loss(net, scheduler, clean, noise, timesteps, labels, prediction_type)

    monkeypatch.setattr(quality, "denoising_loss", recording_loss)
    configs = quality.model_configs(16)
    data, labels = torch.rand(20, 1, 16, 16) * 2 - 1, torch.arange(20) % 10
    for current in ("unet-small", "meme-soft", "blend-learned"):
        spec = quality.P.MODEL_SPECS[current]
        trainer = quality.Trainer(spec, quality.build_model(spec, configs, 0), _settings(quality), seed=0)
        for _ in range(3):
            trainer.step(data, labels)
    for k in range(3):
        single, experts, blend = (seen[m][k] for m in ("unet-small", "meme-soft", "blend-learned"))
        for i in (0, 1, 3):  # clean images, noise, dropped labels
            assert torch.equal(single[i], experts[i]) and torch.equal(single[i], blend[i])
        assert torch.equal(single[2], blend[2])  # uniform timesteps agree too
    # expert k of the MEME mixture draws its own interval's timesteps (soft: mostly)
    assert seen["meme-soft"][0][2].float().mean() < seen["meme-soft"][2][2].float().mean()


def test_blend_trains_learned_routing_with_its_own_lr_and_averages_it(quality):
    configs = quality.model_configs(16)
    spec = quality.P.MODEL_SPECS["blend-learned"]
    model = quality.build_model(spec, configs, 0)
    settings = _settings(quality, warmup=1, routing_lr=0.05, learning_rate=1e-3)
    trainer = quality.Trainer(spec, model, settings, seed=0)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["params"] == [model.routing_logits] and groups[1]["weight_decay"] == 0.0
    initial = model.routing_logits.detach().clone()
    data, labels = torch.rand(20, 1, 16, 16) * 2 - 1, torch.arange(20) % 10
    for _ in range(3):
        trainer.step(data, labels)
    assert [g["lr"] for g in groups] == [1e-3, 0.05]
    assert not torch.equal(model.routing_logits, initial)
    averaged = trainer.averaged_model()
    # the EMA covers the logits: the averaged ones lie between the start and the trained ones, not equal to either
    assert not torch.equal(averaged.routing_logits, model.routing_logits)
    assert not torch.equal(averaged.routing_logits, initial)
    assert len(trainer.emas[0].shadow_params) == len(list(model.parameters()))


def test_untrained_extractor_is_refused(quality):
    from diffusers_experts.evaluation import ReferenceClassifier

    images = torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    weak = ReferenceClassifier.fit(images, labels, num_classes=10, steps=2, block_out_channels=(8,), progress=False)
    assert "below" in quality.extractor_refusal(weak, 0.95, 0.9)
    assert quality.extractor_refusal(weak, 0.2, 0.0) is None


def test_npz_digits_load_like_the_bundled_ones(quality, tmp_path):
    import numpy as np

    from diffusers_experts.evaluation import mnist_digits

    digits, labels = mnist_digits(28, seed=None)  # file order: the loader shuffles with the data seed
    np.savez(tmp_path / "digits.npz", images=digits[:, 0].numpy(), labels=labels.numpy())
    for size in (16, 32):
        loaded = quality.load_data(size, 1000, 256, str(tmp_path / "digits.npz"))
        bundled = quality.load_data(size, 1000, 256)
        assert all(torch.equal(loaded[k], bundled[k]) for k in bundled)
    assert len(bundled["train"]) == 4000 and len(bundled["reference"]) == 1000
    np.savez(tmp_path / "bad.npz", images=digits[:, 0].numpy(), targets=labels.numpy())
    with pytest.raises(ValueError, match="`images` and `labels`"):
        quality.load_data(16, 1000, 256, str(tmp_path / "bad.npz"))


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_tiny_run_writes_results_table_plots_and_claims(quality, tmp_path):
    argv = ["--quick", "--output-dir", str(tmp_path), "--models", "unet-small,meme-soft,blend-learned"]
    argv += ["--seeds", "0,1", "--jobs", "1", "--steps", "2", "--warmup", "1", "--batch-size", "4"]
    argv += ["--num-samples", "8", "--heldout-images", "8", "--inference-steps", "2", "--guidance-scales", "1.0,2.0"]
    argv += ["--num-reference", "20", "--classifier-steps", "3", "--min-classifier-accuracy", "0"]  # plumbing only
    payload = quality.main(quality.parse_args(argv))
    summary = payload["summary"]
    assert set(summary["arms"]["A"]) == {"unet-large", "unet-small", "meme-soft", "blend-learned"}
    small = payload["models"]["unet-small"]["budgets"]
    assert small["A"]["updates_per_expert"] == 2 and small["B"]["updates_per_expert"] > 2  # cheaper: more steps
    row = summary["arms"]["B"]["meme-soft"]
    assert row["seeds"] == 2 and len(row["heldout_per_t_mean"]) == len(quality.timestep_grid(True))
    assert set(row["guidance"]) == {"1", "2"} and row["guidance"]["2"]["fid"][0] is not None
    assert summary["shared_scale"] in (1.0, 2.0)
    claims = {(c["a"], c["b"], c["arm"]) for c in summary["claims"]}
    assert ("meme-soft", "unet-large", "B") in claims and ("blend-learned", "unet-small", "A") in claims
    per_seed = json.loads((tmp_path / "seed-1" / "blend-learned.json").read_text())
    assert len(per_seed["arms"]["B"]["learned_routing_logits"]) == 11
    table = (tmp_path / "table.md").read_text()
    assert "### Arm A: per-expert parity" in table and "| meme-soft | MEME |" in table and "### Claims" in table
    plots = set(os.listdir(tmp_path / "plots"))
    assert {"heldout_loss_arm-A.png", "heldout_loss_arm-B.png", "samples_A_meme-soft.png"} <= plots
    assert "samples_B_blend-learned_best.png" in plots and "routing_A_blend-learned.png" in plots
