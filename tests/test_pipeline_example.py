"""examples/sample.py end to end on a tiny saved pipeline."""

import importlib.util
import os

import pytest
from diffusers import DDPMScheduler

from conftest import tiny_mixture, tiny_unet
from diffusers_experts import ExpertMixtureUNet, MultiExpertPipeline


def load_example():
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "sample.py")
    spec = importlib.util.spec_from_file_location("sample_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_script_writes_pngs_and_grid(tmp_path, capsys):
    sample = load_example()
    MultiExpertPipeline(unet=tiny_mixture(2), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "samples"
    argv = ["--model", str(tmp_path / "pipe"), "--num_images", "3", "--batch_size", "2", "--steps", "2"]
    sample.main(sample.parse_args([*argv, "--scheduler", "dpmpp", "--out", str(out)]))
    # the split preview: denoiser calls per expert under the chosen scheduler, before sampling
    assert "denoiser calls per expert (DPMSolverMultistepScheduler, 2 steps): expert 0 [0, 500): 1, expert 1 " in (
        capsys.readouterr().out
    )
    # the folder holds the samples only (evaluate.py --samples reads it); the grid sits next to it
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png", "000002.png"]
    assert (tmp_path / "samples_grid.png").is_file()
    bulk = tmp_path / "bulk"
    sample.main(sample.parse_args([*argv, "--scheduler", "dpmpp", "--bulk", "--offload", "cpu", "--out", str(bulk)]))
    # expert-major generation gives the same images as the per-batch loop
    assert (bulk / "000002.png").read_bytes() == (out / "000002.png").read_bytes()
    with pytest.raises(SystemExit):  # argparse: invalid choice 'fast' (choose from ...)
        sample.parse_args([*argv, "--scheduler", "fast", "--out", str(out)])


def test_sample_script_class_labels_and_guidance_errors_name_the_flag(tmp_path, capsys):
    sample = load_example()
    experts = [tiny_unet(k, num_class_embeds=4) for k in range(4)]  # 3 classes + the null class
    conditional = ExpertMixtureUNet.from_experts(experts)
    MultiExpertPipeline(unet=conditional, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    argv = ["--model", str(tmp_path / "pipe"), "--num_images", "4", "--steps", "2", "--out", str(tmp_path / "s")]
    # several labels, or all classes, cycled over the images
    sample.main(sample.parse_args([*argv, "--class_label", "all", "--guidance_scale", "1.0", "1.0", "2.0", "2.0"]))
    assert len(os.listdir(tmp_path / "s")) == 4
    for extra, message in [
        ([], "--class_label is required: the model is class-conditional with 3 classes"),
        (["--class_label", "3"], "--class_label 3 is out of range: the model has 3 classes"),
        (["--class_label", "two"], "--class_label takes integers in 0..2 or .all., got two"),
        (
            ["--class_label", "1", "--guidance_scale", "1.0", "3.0"],
            "--guidance_scale takes one value or one per expert (4",
        ),
    ]:
        with pytest.raises(sample.UsageError, match=message.replace("(", r"\(")):
            sample.main(sample.parse_args([*argv, *extra]))
