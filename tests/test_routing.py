"""Routing: partitions, blend schedules, soft-expert timestep sampling (diffusers_experts.routing)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_experts import routing as R


T = 1000


def test_default_boundaries_are_equal_intervals():
    assert R.normalize_boundaries(None, 4, T) == [250.0, 500.0, 750.0]
    assert R.normalize_boundaries(None, 1, T) == []


def test_fractions_and_timesteps():
    assert R.normalize_boundaries([0.25, 0.5], 3, T) == [250.0, 500.0]
    assert R.normalize_boundaries([250, 500], 3, T) == [250.0, 500.0]
    assert R.normalize_boundaries([0.5], 2, T, boundary_units="timestep") == [0.5]
    assert R.normalize_boundaries([0.3], 2, 10, boundary_units="fraction") == [3.0]


@pytest.mark.parametrize(
    "boundaries, match",
    [
        ([500, 250, 750], "strictly ascending"),
        ([250, 250, 750], "strictly ascending"),
        ([0, 500, 750], r"open interval \(0, 1000\)"),
        ([250, 500, 1000], r"open interval \(0, 1000\)"),
        ([250, 500], "num_experts - 1 = 3"),
        ([100.2, 100.7, 500], "holds no integer"),
    ],
)
def test_bad_boundaries(boundaries, match):
    with pytest.raises(ValueError, match=match):
        R.normalize_boundaries(boundaries, 4, T)


def test_bad_boundary_types_and_units():
    with pytest.raises(TypeError, match="boundaries"):
        R.normalize_boundaries("250", 2, T)
    with pytest.raises(TypeError, match="finite"):
        R.normalize_boundaries([float("nan")], 2, T)
    with pytest.raises(ValueError, match="boundary_units.*'sigma'"):
        R.normalize_boundaries([0.5], 2, T, boundary_units="sigma")
    with pytest.raises(ValueError, match=r"fractions of T must lie in \(0, 1\)"):
        R.normalize_boundaries([1.5], 2, T, boundary_units="fraction")


def test_hard_routing_at_and_around_every_boundary():
    boundaries = torch.tensor([250.0, 500.0, 750.0])
    for k, b in enumerate([250.0, 500.0, 750.0]):
        t = torch.tensor([b - 1, b - 1e-3, b, b + 1e-3])
        assert R.expert_index(t, boundaries).tolist() == [k, k, k + 1, k + 1]
    assert R.expert_index(torch.tensor([0.0, 999.0, 999.9]), boundaries).tolist() == [0, 3, 3]


@pytest.mark.parametrize("routing", ["hard", "linear", "sigmoid"])
@pytest.mark.parametrize("num_experts", [1, 2, 3, 5])
def test_weights_nonnegative_and_sum_to_one(routing, num_experts):
    boundaries = torch.tensor(R.default_boundaries(num_experts, T))
    t = torch.linspace(0, T - 1, 301)
    w = R.schedule_weights(t, boundaries, routing, T, blend_width=T / max(num_experts - 1, 1), sharpness=10.0)
    assert w.shape == (301, num_experts)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(301))


def test_two_expert_linear_and_sigmoid_are_the_paper_ratio_schedules():
    t = torch.linspace(0, T - 1, 50)
    b = torch.tensor([T / 2])
    linear = R.linear_weights(t, b, blend_width=T)
    torch.testing.assert_close(linear[:, 1], t / T)  # r(t) = t / T for the high-noise expert
    sigmoid = R.sigmoid_weights(t, b, sharpness=10.0, num_train_timesteps=T)
    torch.testing.assert_close(sigmoid[:, 1], torch.sigmoid(10 * (t / T - 0.5)))


def test_blend_is_centered_on_the_boundary():
    b = torch.tensor([300.0, 600.0])
    w = R.linear_weights(torch.tensor([300.0, 600.0]), b, blend_width=100.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]))
    far = R.linear_weights(torch.tensor([100.0, 450.0, 900.0]), b, blend_width=100.0)
    torch.testing.assert_close(far, torch.eye(3))


def test_learned_weights_interpolate_knots_and_start_from_init():
    boundaries = torch.tensor([500.0])
    logits = R.initial_learned_logits(11, boundaries, "linear", T, blend_width=T, sharpness=10.0)
    t = torch.linspace(0, T, 101)
    w = R.learned_weights(t, logits, T)
    torch.testing.assert_close(w.sum(1), torch.ones(101))
    assert (w >= 0).all() and (w[1:, 1] >= w[:-1, 1]).all()  # monotone hand-over, like its init
    knots = torch.linspace(0, T - 1, 11)
    knots[:-1] = torch.linspace(0, T, 11)[:-1]
    expected = (knots / T).clamp(1e-4, 1 - 1e-4)
    torch.testing.assert_close(R.learned_weights(knots, logits, T)[:, 1], expected, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="learned_init"):
        R.initial_learned_logits(11, boundaries, "cosine", T, T, 10.0)


def test_default_expertization_probs():
    assert R.default_expertization_probs(4) == [0.8, 0.4, 0.2, 0.1]
    assert R.default_expertization_probs(1) == [1.0]
    two = R.default_expertization_probs(2)
    assert two[0] == pytest.approx(0.8) and two[1] == pytest.approx(0.1)
    six = R.default_expertization_probs(6)
    assert all(a > b for a, b in zip(six, six[1:]))


def test_soft_sampler_frequencies():
    boundaries = [250.0, 500.0, 750.0]
    g = torch.Generator().manual_seed(0)
    n = 20000
    for k, p in enumerate([0.8, 0.4, 0.2, 0.1]):
        t = R.sample_training_timesteps(n, k, boundaries, T, "soft", p, generator=g)
        assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < T
        inside = ((t >= 250 * k) & (t < 250 * (k + 1))).float().mean().item()
        expected = p + (1 - p) * 0.25  # own interval, or uniform landing inside it
        assert abs(inside - expected) < 0.02
    hard = R.sample_training_timesteps(n, 2, boundaries, T, "hard", generator=g)
    assert hard.min() >= 500 and hard.max() < 750
    uniform = R.sample_training_timesteps(n, 2, boundaries, T, "uniform", generator=g)
    assert uniform.min() < 100 and uniform.max() > 900


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="strategy.*'hard', 'soft', 'uniform'"):
        R.sample_training_timesteps(4, 0, [500.0], T, "loose")
    with pytest.raises(ValueError, match=r"expert.*\[0, 1\]"):
        R.sample_training_timesteps(4, 2, [500.0], T)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        R.check_expertization_probs([0.8, 1.2], 2)
    with pytest.raises(ValueError, match="one probability per expert"):
        R.check_expertization_probs([0.8], 2)


def test_sigma_and_snr_boundaries_round_trip():
    alphas_cumprod = DDPMScheduler(num_train_timesteps=T).alphas_cumprod
    for t in [10, 250, 500, 900]:
        a = alphas_cumprod[t].item()
        sigma = math.sqrt((1 - a) / a)
        assert R.timestep_from_sigma(sigma, alphas_cumprod) == pytest.approx(t, abs=1e-3)
        assert R.timestep_from_snr(a / (1 - a), alphas_cumprod) == pytest.approx(t, abs=1e-3)
    with pytest.raises(ValueError, match="outside the schedule"):
        R.timestep_from_sigma(1e6, alphas_cumprod)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_noise_at_a_boundary_never_changes_the_owner(dtype):
    # a timestep within 1e-4 below a boundary counts as on it (upper expert); 1e-3 below is the lower expert
    boundaries = [250.0, 333.3333333333333, 500.0, 750.0]
    table = torch.tensor(boundaries, dtype=torch.float64)
    for k, b in enumerate(boundaries):
        on = torch.tensor([b - 1e-6, b, b + 1e-6, b - 0.9e-4], dtype=dtype)
        assert R.expert_index(on, table).tolist() == [k + 1] * 4, (b, dtype)
        assert [R.expert_index(float(t), boundaries) for t in on] == [k + 1] * 4
        below = torch.tensor([b - 1e-3, b - 1], dtype=dtype)
        assert R.expert_index(below, table).tolist() == [k, k]
    # through the sigma round trip of a DDPM schedule (t -> sigma -> t): the owner of an integer t is kept
    alphas_cumprod = DDPMScheduler(num_train_timesteps=T).alphas_cumprod
    integer_t = torch.tensor([249, 250, 251, 499, 500, 749, 750], dtype=torch.float64)
    sigmas = R.noise_sigmas(alphas_cumprod)[integer_t.long()].to(dtype)
    round_trip = R.timesteps_from_sigmas(sigmas, alphas_cumprod)
    assert (round_trip - integer_t).abs().max() < 1e-2
    assert torch.equal(R.expert_index(round_trip, table), R.expert_index(integer_t, table))


def test_owned_timesteps_follow_the_tolerance_rule():
    assert R.owned_timesteps([250.0, 500.0, 750.0], T) == [
        range(0, 250),
        range(250, 500),
        range(500, 750),
        range(750, T),
    ]
    assert R.owned_timesteps([333.3333333333333, 666.6666666666666], T) == [
        range(0, 334),
        range(334, 667),
        range(667, T),
    ]
    # t = 250 is within 1e-4 below a boundary at 250.00005, so it is on it (upper expert); 250.0002 is not
    assert R.owned_timesteps([250.00005], T)[1].start == 250 and R.owned_timesteps([250.0002], T)[1].start == 251
    for boundaries in ([250.0, 500.0, 750.0], [100.5, 101.99999, 900.0]):
        table = torch.tensor(boundaries, dtype=torch.float64)
        for k, owned in enumerate(R.owned_timesteps(boundaries, T)):
            assert R.expert_index(torch.tensor(list(owned), dtype=torch.float64), table).unique().tolist() == [k]


def test_auto_units_refuse_a_mix_of_fractions_and_timesteps():
    with pytest.raises(ValueError, match=r"mix fractions of T.*as timesteps \[0\.3, 600\.0\].*\[300\.0, 600\.0\]"):
        R.normalize_boundaries([0.3, 600], 3, T)
    with pytest.raises(ValueError, match="boundary_units='timestep' or 'fraction'"):
        R.normalize_boundaries([250, 0.9], 3, T)
    # one unit, or explicit units, are fine
    assert R.normalize_boundaries([0.3, 0.6], 3, T) == [300.0, 600.0]
    assert R.normalize_boundaries([0.3, 600], 3, T, boundary_units="timestep") == [0.3, 600.0]
