"""examples/evaluate.py and examples/analyze_frequency.py, run in-process (benchmarks/quality.py: test_benchmark_quality.py)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_mixture
from diffusers_experts.evaluation import ReferenceClassifier


ROOT = Path(__file__).resolve().parents[1]


def _load(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny mixture (3 x 16 x 16), a folder of 12 real-looking images and a saved tiny classifier."""
    root = tmp_path_factory.mktemp("evaluation-examples")
    tiny_mixture(2, routing="linear").save_pretrained(root / "mixture")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=generator)
    (root / "real").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "real" / f"{i:02d}.png")
    labels = torch.arange(12) % 2
    classifier = ReferenceClassifier.fit(
        images, labels, steps=2, batch_size=12, block_out_channels=(8,), feature_dim=8, sample_size=16
    )
    classifier.save_pretrained(root / "classifier")
    return root


def test_evaluate_generates_and_scores_a_saved_mixture(saved, tmp_path, capsys):
    evaluate = _load("examples/evaluate.py")
    args = evaluate.parse_args(
        [
            "--model", str(saved / "mixture"), "--num_images", "6", "--batch_size", "3", "--steps", "2",
            "--reference", str(saved / "real"), "--metrics", "fid", "kid", "--kid_subset_size", "5",
            "--classifier_dir", str(saved / "classifier"), "--out", str(tmp_path), "--device", "cpu",
            "--min_classifier_accuracy", "0",  # a 2-step classifier: the plumbing is tested, not the figures
        ]
    )  # fmt: skip
    result = evaluate.main(args)
    assert sorted(os.listdir(tmp_path / "samples")) == [f"{i:06d}.png" for i in range(6)]
    saved_result = json.loads((tmp_path / "metrics.json").read_text())
    assert saved_result["fid"] == pytest.approx(result["fid"]) and result["fid"] > 0
    assert result["num_samples"] == 6 and result["num_reference"] == 12
    assert result["params"] > 0 and result["macs_per_step"] > 0
    assert "fid" in capsys.readouterr().out


def test_evaluate_refuses_to_train_a_classifier_without_labels(saved, tmp_path):
    evaluate = _load("examples/evaluate.py")
    args = evaluate.parse_args(
        ["--samples", str(saved / "real"), "--reference", str(saved / "real"), "--classifier_dir", str(tmp_path / "c")]
    )
    with pytest.raises(ValueError, match="no labels"):
        evaluate.main(args)
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--samples", "x", "--reference", "y", "--extractor", "inception"])  # no weights file


def test_evaluate_stops_on_an_untrained_classifier_and_does_not_cache_it(saved, tmp_path):
    evaluate = _load("examples/evaluate.py")
    argv = ["--samples", str(saved / "real"), "--reference", "mnist", "--metrics", "fid", "--out", str(tmp_path)]
    folder = tmp_path / "clf"
    # 2 training steps stay near chance: evaluation stops before scoring, and nothing is cached
    with pytest.raises(evaluate.UsageError, match=r"held-out accuracy 0\.\d+ is below --min_classifier_accuracy 0\.9"):
        evaluate.main(evaluate.parse_args([*argv, "--classifier_dir", str(folder), "--classifier_steps", "2"]))
    assert not folder.exists() and not (tmp_path / "metrics.json").exists()
    # a cached classifier below the threshold (here the saved 2-step one of the fixture) is refused too
    with pytest.raises(evaluate.UsageError, match="below --min_classifier_accuracy"):
        evaluate.main(evaluate.parse_args([*argv, "--classifier_dir", str(saved / "classifier")]))
    # the command line prints it as one usage line naming the flag
    with pytest.raises(SystemExit) as exit_info:
        evaluate.build_parser().error("--classifier_dir x: ...")
    assert exit_info.value.code == 2


def test_evaluate_scores_class_conditional_models_per_class(tmp_path):
    from diffusers import DDPMScheduler

    from conftest import tiny_unet
    from diffusers_experts import ExpertMixtureUNet, MultiExpertPipeline

    experts = [tiny_unet(k, num_class_embeds=11) for k in range(2)]
    pipe = MultiExpertPipeline(unet=ExpertMixtureUNet.from_experts(experts), scheduler=DDPMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    evaluate = _load("examples/evaluate.py")
    argv = ["--model", str(tmp_path / "pipe"), "--num_images", "4", "--steps", "2", "--reference", "mnist"]
    argv += ["--classifier_dir", str(tmp_path / "clf"), "--out", str(tmp_path / "eval")]
    with pytest.raises(evaluate.UsageError, match="--class_label is required.*10 classes"):
        evaluate.generate(evaluate.parse_args(argv))
    samples, info = evaluate.generate(evaluate.parse_args([*argv, "--class_label", "all", "--guidance_scale", "2.0"]))
    assert sorted(os.listdir(samples)) == [f"{i:06d}.png" for i in range(4)] and info["macs_per_step"] > 0


def test_analyze_frequency_on_a_saved_mixture(saved, tmp_path):
    analyze = _load("examples/analyze_frequency.py")
    args = analyze.parse_args(
        [
            "--model", str(saved / "mixture"), "--images", str(saved / "real"), "--num_images", "4",
            "--timesteps", "100", "900", "--out", str(tmp_path), "--device", "cpu",
        ]
    )  # fmt: skip
    result = analyze.main(args)
    assert set(result["experts"]) == {"expert 0", "expert 1"}
    assert json.loads((tmp_path / "fourier.json").read_text())["timesteps"] == [100, 900]
    for name in ("fourier_experts.png", "fourier_expert_0.png", "fourier_expert_1.png", "routing.png"):
        assert (tmp_path / name).stat().st_size > 1000
