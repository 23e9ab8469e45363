"""examples/demo_report.py (what `make demo` prints) on two tiny untrained class-conditional pipelines."""

import importlib.util
import json
from pathlib import Path

import pytest
from diffusers import DDPMScheduler

from conftest import tiny_unet
from diffusers_experts import ExpertMixtureUNet, MultiExpertPipeline
from diffusers_experts.evaluation import ReferenceClassifier


ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("demo_report", ROOT / "examples" / "demo_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(path, num_experts):
    experts = [tiny_unet(k, num_class_embeds=11, in_channels=1, out_channels=1) for k in range(num_experts)]
    MultiExpertPipeline(unet=ExpertMixtureUNet.from_experts(experts), scheduler=DDPMScheduler()).save_pretrained(path)


def test_demo_report_scores_each_model_on_held_out_digits(tmp_path, monkeypatch, capsys):
    report = _load()
    _save(tmp_path / "mix", 2)
    _save(tmp_path / "one", 1)
    real_fit = ReferenceClassifier.fit

    def quick_fit(images, labels, **kwargs):  # a 5-step judge, marked as accurate: the plumbing is tested here
        classifier = real_fit(images[:200], labels[:200], steps=5, progress=False, block_out_channels=(8,))
        classifier.register_to_config(heldout_accuracy=0.95)
        return classifier

    monkeypatch.setattr(ReferenceClassifier, "fit", staticmethod(quick_fit))
    argv = ["--model", f"mixture={tmp_path / 'mix'}", "--model", f"single={tmp_path / 'one'}", "--num_images", "20"]
    argv += ["--guidance_scale", "1.0", "2.0", "--steps", "2", "--out", str(tmp_path / "report")]
    results = report.main(report.parse_args(argv))
    assert [r["name"] for r in results] == ["mixture", "single"] and results[0]["experts"] == 2
    for r in results:
        assert [row["guidance_scale"] for row in r["sweep"]] == [1.0, 2.0]
        assert 0 <= r["best"]["class_accuracy"] <= 1 and r["best"]["fid"] >= 0
        assert len(r["heldout_loss_bins"]) == 4 and r["macs_per_step"] > 0
        assert (tmp_path / "report" / f"grid_{r['name']}.png").stat().st_size > 500
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["shared_guidance_scale"] in (1.0, 2.0) and len(saved["models"]) == 2
    out = capsys.readouterr().out
    assert "| single | 1 |" not in out and "\nsingle | 1 |" in out and "real digits" in out


def test_demo_report_flag_errors():
    report = _load()
    with pytest.raises(SystemExit):
        report.parse_args(["--model", "no-equals-sign"])
    with pytest.raises(SystemExit):
        report.parse_args(["--model", "a=x", "--model", "a=y"])
