"""benchmarks/train_step.py: the fused-q/k/v baseline computes the same function, and one tiny `architecture` run."""

import importlib.util
import sys
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]


def _train_step():
    if "train_step" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks" / "train_step.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_step"] = module
        spec.loader.exec_module(module)
    return sys.modules["train_step"]


def _args(**overrides):
    ts = _train_step()
    argv = sys.argv
    try:
        sys.argv = ["train_step.py"]
        args = ts.parse_args()
    finally:
        sys.argv = argv
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_fused_qkv_baseline_is_the_same_unet():
    ts = _train_step()
    args = _args(widths=[8, 16], resolution=8)
    _, unet = ts.architecture_models(args)
    _, fused = ts.architecture_models(_args(widths=[8, 16], resolution=8, unet_fused_qkv=True))
    sample, timesteps = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        # same seed, same weights; the fused projection is the concatenation of the separate ones
        torch.testing.assert_close(fused(sample, timesteps).sample, unet(sample, timesteps).sample, rtol=0, atol=1e-5)
    count = ts.count_parameters
    assert count(fused, trainable_only=True) == count(unet)  # the separate projections no longer run: frozen
    fused.train()
    fused(sample, timesteps).sample.square().mean().backward()
    frozen = [p for p in fused.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_architecture_run_prints_both_ratios(capsys):
    ts = _train_step()
    args = _args(
        what="architecture", widths=[8, 16], resolution=8, batch_size=2, steps=1, malloc="default", unet_fused_qkv=True
    )
    ts.main(args)
    out = capsys.readouterr().out
    assert "baseline UNet2DModel, fused q/k/v" in out
    for kind in ("training", "inference"):
        line = next(line for line in out.splitlines() if line.strip().startswith(f"{kind}:"))
        ratio = float(line.split("ratio iU-Net / UNet2DModel: ")[1].split()[0])
        assert ratio > 0
