"""examples/sample.py end to end on a tiny saved pipeline."""

import importlib.util
import os

import pytest
from diffusers import DDPMScheduler

from conftest import tiny_mixture
from diffusers_experts import MultiExpertPipeline


def load_example():
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "sample.py")
    spec = importlib.util.spec_from_file_location("sample_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_script_writes_pngs_and_grid(tmp_path):
    sample = load_example()
    MultiExpertPipeline(unet=tiny_mixture(2), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "samples"
    argv = ["--model", str(tmp_path / "pipe"), "--num_images", "3", "--batch_size", "2", "--steps", "2"]
    sample.main(sample.parse_args([*argv, "--scheduler", "dpmpp", "--out", str(out)]))
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png", "000002.png", "grid.png"]
    bulk = tmp_path / "bulk"
    sample.main(sample.parse_args([*argv, "--scheduler", "dpmpp", "--bulk", "--offload", "cpu", "--out", str(bulk)]))
    # expert-major generation gives the same images as the per-batch loop
    assert (bulk / "000002.png").read_bytes() == (out / "000002.png").read_bytes()
    with pytest.raises(ValueError, match="Unknown scheduler name 'fast'"):
        sample.main(sample.parse_args([*argv, "--scheduler", "fast", "--out", str(out)]))
