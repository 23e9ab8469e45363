"""Held-out denoising loss per timestep: deterministic, routed like sampling, per condition, checked input."""

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffusers_experts import ExpertMixtureUNet
from diffusers_experts.evaluation import DEFAULT_HELDOUT_TIMESTEPS, HeldoutLoss, heldout_digits, heldout_loss


def _unet(seed: int, num_class_embeds=None) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )


def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_default_grid_is_16_timesteps_from_5_to_995():
    assert len(DEFAULT_HELDOUT_TIMESTEPS) == 16
    assert DEFAULT_HELDOUT_TIMESTEPS[0] == 5 and DEFAULT_HELDOUT_TIMESTEPS[-1] == 995


def test_deterministic_and_independent_of_batch_size():
    model, scheduler = _unet(0), DDPMScheduler()
    first = heldout_loss(model, scheduler, _images(), timesteps=[10, 500, 990], batch_size=4)
    second = heldout_loss(model, scheduler, _images(), timesteps=[10, 500, 990], batch_size=6)
    assert list(first.losses) == ["uncond"]
    assert first.losses["uncond"] == pytest.approx(second.losses["uncond"], rel=1e-5)
    assert model.training  # the model's mode is restored


def test_mixture_is_scored_by_the_expert_owning_each_timestep():
    """The loss of a hard-routed mixture at t equals the loss of the expert that owns t, with the same noise."""
    low, high, scheduler = _unet(0), _unet(1), DDPMScheduler()
    grid = [5, 200, 600, 995]
    mixture = ExpertMixtureUNet.from_experts([low, high], boundaries=[500], routing="hard")
    mixed = heldout_loss(mixture, scheduler, _images(), timesteps=grid).losses["uncond"]
    alone_low = heldout_loss(low, scheduler, _images(), timesteps=grid).losses["uncond"]
    alone_high = heldout_loss(high, scheduler, _images(), timesteps=grid).losses["uncond"]
    assert mixed == pytest.approx(alone_low[:2] + alone_high[2:], rel=1e-5)
    assert alone_low != pytest.approx(alone_high, rel=1e-3)


def test_class_conditional_scores_true_labels_and_null_class():
    model = _unet(0, num_class_embeds=4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    result = heldout_loss(model, DDPMScheduler(), _images(), labels, timesteps=[100, 900])
    assert set(result.losses) == {"cond", "null"}
    assert result.losses["cond"] != pytest.approx(result.losses["null"], rel=1e-4)
    only = heldout_loss(model, DDPMScheduler(), _images(), labels, timesteps=[100, 900], conditions=["null"])
    assert only.losses["null"] == pytest.approx(result.losses["null"], rel=1e-5)


def test_perfect_epsilon_predictor_scores_zero_and_v_target():
    class Oracle(torch.nn.Module):
        """Predicts the noise it was given: the noise is known because the test reuses the seed."""

        config = type("C", (), {"num_class_embeds": None})()

        def __init__(self, noise):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.noise, self.i = noise, 0

        def forward(self, x, t, class_labels=None):
            out = self.noise[self.i]
            self.i += 1
            return (out,)

    images, grid = _images(), [50, 700]
    noise = torch.randn((len(grid), *images.shape), generator=torch.Generator().manual_seed(0))
    result = heldout_loss(Oracle(noise), DDPMScheduler(), images, timesteps=grid, seed=0)
    assert result.losses["uncond"] == pytest.approx([0.0, 0.0], abs=1e-12)


def test_bins_and_table():
    result = HeldoutLoss([5, 300, 700, 995], {"cond": [4.0, 3.0, 2.0, 1.0]})
    assert result.bins([0, 500, 1000]) == [3.5, 1.5]
    assert result.mean() == 2.5
    assert "| 995 | 1.0000 |" in result.table()
    with pytest.raises(ValueError, match="No grid timestep"):
        result.mean(low=400, high=500)


def test_errors_name_the_argument():
    model = _unet(0)
    with pytest.raises(ValueError, match="timesteps"):
        heldout_loss(model, DDPMScheduler(), _images(), timesteps=[1000])
    with pytest.raises(ValueError, match="unconditional"):
        heldout_loss(model, DDPMScheduler(), _images(), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="pass labels"):
        heldout_loss(_unet(0, num_class_embeds=3), DDPMScheduler(), _images())
    with pytest.raises(ValueError, match="conditions"):
        heldout_loss(_unet(0, num_class_embeds=3), DDPMScheduler(), _images(), torch.zeros(6).long(), conditions=["x"])


def test_heldout_digits_are_the_ones_after_the_training_split():
    from diffusers_experts.evaluation import mnist_digits

    images, labels = heldout_digits(16, num_train=4000, num_heldout=10)
    digits, all_labels = mnist_digits(16, seed=0)
    assert torch.equal(labels, all_labels[4000:4010])
    assert torch.allclose(images, digits[4000:4010].float() / 127.5 - 1)
    assert images.min() >= -1 and images.max() <= 1
    with pytest.raises(ValueError, match="num_heldout"):
        heldout_digits(16, num_train=4990, num_heldout=20)
