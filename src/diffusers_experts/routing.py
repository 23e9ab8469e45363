"""Timestep routing for multi-expert denoisers: partitions, blend schedules and soft-expert timestep sampling.

Everything here works in *training-timestep units* (noise levels `t` in `[0, T)`, `T = num_train_timesteps`), never
in inference-step indices, so routing does not depend on the sampler or on `num_inference_steps` (DESIGN contract 2).

Conventions (shared by training and sampling):

- `N` experts, `N - 1` strictly ascending boundaries `b_1 < ... < b_{N-1}` in `(0, T)`, with `b_0 = 0`, `b_N = T`.
- Expert `k` owns `[b_k, b_{k+1})`: expert 0 is the lowest-noise expert; a timestep equal to a boundary belongs to the
  upper expert, and so does a timestep within `BOUNDARY_TOLERANCE` (1e-4 training timesteps) below it: float noise
  from a CPU, a dtype or a sigma round trip never decides an owner.
- A call is routed by the timestep it is conditioned on (the `timestep` given to the denoiser), whatever the sampler.
- Blended routing uses cumulative "passed boundary k" ramps `s_k(t)` (increasing in t, `s_0 = 1`, `s_N = 0`) and sets
  `w_k(t) = s_k(t) - s_{k+1}(t)`. Because the ramps are ordered, the weights are >= 0 and sum to 1 for every `t`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch


ROUTING_MODES = ("hard", "linear", "sigmoid", "learned")
BOUNDARY_UNITS = ("auto", "timestep", "fraction", "sigma", "snr")
NOISE_LEVEL_UNITS = ("sigma", "snr")
TIMESTEP_STRATEGIES = ("hard", "soft", "uniform")
LEARNED_INITS = ("hard", "linear", "sigmoid")

# A timestep this close below a boundary counts as on it (upper expert), in training-timestep units.
BOUNDARY_TOLERANCE = 1e-4

# MEME's expertization probabilities for 4 experts (expert 0 = lowest noise), paper Sec. "Soft Expert Strategy".
MEME_EXPERTIZATION_PROBS = (0.8, 0.4, 0.2, 0.1)


def check_routing_mode(routing: str) -> str:
    if routing not in ROUTING_MODES:
        raise ValueError(f"`routing` must be one of {list(ROUTING_MODES)}, got {routing!r}.")
    return routing


def default_boundaries(num_experts: int, num_train_timesteps: int) -> list[float]:
    """Equal intervals: `b_k = k * T / N` for `k = 1 .. N-1`."""
    return [k * num_train_timesteps / num_experts for k in range(1, num_experts)]


def normalize_boundaries(
    boundaries: Sequence[float] | None,
    num_experts: int,
    num_train_timesteps: int = 1000,
    boundary_units: str = "auto",
    scheduler=None,
) -> list[float]:
    """Validate `boundaries` and return them in training-timestep units.

    Args:
        boundaries (`Sequence[float]`, *optional*):
            `N - 1` strictly ascending values. `None` gives equal intervals.
        num_experts (`int`): `N`.
        num_train_timesteps (`int`, defaults to 1000): `T`.
        boundary_units (`str`, defaults to `"auto"`):
            `"timestep"` (values in `(0, T)`), `"fraction"` (values in `(0, 1)`, multiplied by `T`) or `"auto"`
            (fractions when every value is a float strictly between 0 and 1, timesteps otherwise), `"sigma"` or
            `"snr"` (noise levels, converted with `scheduler`'s noise schedule by [`timestep_from_noise_level`]; give
            them expert by expert, expert 0's upper boundary first: sigmas ascend, SNRs descend).
        scheduler (`SchedulerMixin`, *optional*): The noise schedule for `"sigma"` / `"snr"` boundaries.
    """
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"`num_experts` must be a positive integer, got {num_experts!r}.")
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"`num_train_timesteps` must be an integer >= 2, got {num_train_timesteps!r}.")
    if boundary_units not in BOUNDARY_UNITS:
        raise ValueError(f"`boundary_units` must be one of {list(BOUNDARY_UNITS)}, got {boundary_units!r}.")
    if boundaries is None:
        return default_boundaries(num_experts, num_train_timesteps)
    if isinstance(boundaries, torch.Tensor):
        boundaries = boundaries.tolist()
    if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
        raise TypeError(f"`boundaries` must be a sequence of numbers or None, got {boundaries!r}.")
    values = list(boundaries)
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in values):
        raise TypeError(f"`boundaries` must contain finite numbers only, got {values!r}.")
    if len(values) != num_experts - 1:
        raise ValueError(
            f"`boundaries` must hold num_experts - 1 = {num_experts - 1} values for {num_experts} experts, "
            f"got {len(values)}: {values!r}."
        )
    units = boundary_units
    if units in NOISE_LEVEL_UNITS:
        if scheduler is None:
            raise ValueError(
                f"`boundary_units`={units!r} needs `scheduler=`: the noise schedule that maps a noise level to a "
                f"timestep (e.g. the DDPMScheduler the experts were trained with, or a flow-matching scheduler)."
            )
        values = [timestep_from_noise_level(b, units, scheduler, num_train_timesteps) for b in values]
        units = "timestep"
    if units == "auto":
        fraction_like = [isinstance(b, float) and 0.0 < b < 1.0 for b in values]
        if any(fraction_like) and not all(fraction_like):
            as_timesteps = [float(b) for b in values]
            as_fractions = [float(b) * num_train_timesteps if f else float(b) for b, f in zip(values, fraction_like)]
            raise ValueError(
                f"`boundaries` {values!r} mix fractions of T (floats in (0, 1)) and timesteps, so they have two "
                f"readings: as timesteps {as_timesteps} (expert 0 would own only t < {as_timesteps[0]}) or with the "
                f"fractions scaled by T={num_train_timesteps}, {as_fractions}. Give all values in one unit, or pass "
                f"boundary_units='timestep' or 'fraction'."
            )
        units = "fraction" if values and all(fraction_like) else "timestep"
    if units == "fraction":
        if not all(0.0 < b < 1.0 for b in values):
            raise ValueError(f"`boundaries` given as fractions of T must lie in (0, 1), got {values!r}.")
        values = [float(b) * num_train_timesteps for b in values]
    values = [float(b) for b in values]
    if not all(0.0 < b < num_train_timesteps for b in values):
        raise ValueError(
            f"`boundaries` must lie in the open interval (0, {num_train_timesteps}) (training timesteps), "
            f"got {values!r}."
        )
    if any(b >= c for b, c in zip(values, values[1:])):
        raise ValueError(f"`boundaries` must be strictly ascending, got {values!r}.")
    edges = [0.0, *values, float(num_train_timesteps)]
    for k, owned in enumerate(owned_timesteps(values, num_train_timesteps)):
        if len(owned) == 0:
            raise ValueError(
                f"`boundaries` leave expert {k} the interval [{edges[k]}, {edges[k + 1]}), which holds no integer "
                f"training timestep: {values!r}."
            )
    return values


def owned_timesteps(boundaries: Sequence[float], num_train_timesteps: int) -> list[range]:
    """The integer training timesteps each expert owns under hard routing, expert 0 first (the tolerance rule)."""
    starts = [0, *(math.ceil(b - BOUNDARY_TOLERANCE) for b in boundaries), num_train_timesteps]
    return [range(low, high) for low, high in zip(starts[:-1], starts[1:])]


def noise_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise level of every training timestep, `sigma_t = sqrt((1 - alpha_prod_t) / alpha_prod_t)`, in float64."""
    alphas_cumprod = alphas_cumprod.double()
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def timesteps_from_sigmas(sigmas: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Fractional training timesteps (float64) with noise levels `sigmas`, clamped to `[0, T - 1]`.

    Interpolates `t` linearly in `log(sigma)` over the training table, as diffusers' `_sigma_to_t` does.
    """
    table = noise_sigmas(alphas_cumprod).log()
    log_sigma = sigmas.double().clamp_min(1e-20).log().reshape(-1)
    high = torch.searchsorted(table, log_sigma).clamp(1, table.numel() - 1)
    low = high - 1
    frac = ((log_sigma - table[low]) / (table[high] - table[low])).clamp(0.0, 1.0)
    return (low.double() + frac).reshape(sigmas.shape)


def timestep_from_sigma(sigma: float, alphas_cumprod: torch.Tensor) -> float:
    """Training timestep (fractional) whose noise level `sigma = sqrt((1 - a_t) / a_t)` equals `sigma`.

    `alphas_cumprod` is the scheduler's `alpha_prod_t` table (e.g. `DDPMScheduler(...).alphas_cumprod`). Unlike
    [`timesteps_from_sigmas`], a `sigma` outside the table's range is an error.
    """
    if sigma <= 0:
        raise ValueError(f"`sigma` must be > 0, got {sigma!r}.")
    table = noise_sigmas(alphas_cumprod)
    low, high = table[0].item(), table[-1].item()
    if not (low * (1 - 1e-12) <= sigma <= high * (1 + 1e-12)):
        raise ValueError(f"`sigma`={sigma!r} is outside the schedule's range [{low:.4g}, {high:.4g}].")
    return timesteps_from_sigmas(torch.tensor(float(sigma)), alphas_cumprod).item()


def timestep_from_snr(snr: float, alphas_cumprod: torch.Tensor) -> float:
    """Training timestep whose signal-to-noise ratio `snr = a_t / (1 - a_t)` equals `snr` (so `sigma = snr^-1/2`)."""
    if snr <= 0:
        raise ValueError(f"`snr` must be > 0, got {snr!r}.")
    return timestep_from_sigma(snr**-0.5, alphas_cumprod)


def is_flow_matching(scheduler) -> bool:
    """Whether `scheduler` runs a flow-matching schedule (`x_t = (1 - sigma) x_0 + sigma * noise`, timestep =
    sigma * T): diffusers' FlowMatch schedulers, or a solver configured with `use_flow_sigmas` (Wan's UniPC)."""
    config = getattr(scheduler, "config", {})
    if config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
        return True
    return "FlowMatch" in type(scheduler).__name__


def timestep_from_noise_level(value: float, units: str, scheduler, num_train_timesteps: int) -> float:
    r"""
    The timestep a denoiser is conditioned on at noise level `value` under `scheduler`'s noise schedule.

    - DDPM family (`alphas_cumprod`): `sigma = sqrt((1 - a_t) / a_t)` (the Euler/Karras sigma), `snr = a_t / (1 - a_t)`;
      the fractional training timestep with that sigma ([`timestep_from_sigma`]).
    - Flow matching (FlowMatch schedulers, `use_flow_sigmas`): `x_t = (1 - sigma) x_0 + sigma * noise`, the timestep is
      `sigma * T`, `snr = ((1 - sigma) / sigma)^2`, so `sigma = 1 / (1 + sqrt(snr))`.
    """
    if units not in NOISE_LEVEL_UNITS:
        raise ValueError(f"`units` must be one of {list(NOISE_LEVEL_UNITS)}, got {units!r}.")
    if not value > 0:
        raise ValueError(f"A boundary given as {units} must be > 0, got {value!r}.")
    if is_flow_matching(scheduler):
        sigma = value if units == "sigma" else 1.0 / (1.0 + math.sqrt(value))
        if not 0.0 < sigma < 1.0:
            raise ValueError(f"A flow-matching sigma lies in (0, 1), got sigma={sigma!r} (from {units}={value!r}).")
        return sigma * num_train_timesteps
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(
            f"Cannot convert a {units} to a timestep with {type(scheduler).__name__}: it has neither `alphas_cumprod` "
            f"(DDPM family) nor a flow-matching schedule."
        )
    return timestep_from_sigma(value, alphas_cumprod) if units == "sigma" else timestep_from_snr(value, alphas_cumprod)


def boundary_from_denoising_end(denoising_end: float, num_train_timesteps: int = 1000) -> float:
    """The boundary of SDXL's base + refiner split: `denoising_end` is the fraction of the *denoising* done by the
    base (high-noise) model, which runs while `t >= round(T * (1 - denoising_end))` (diffusers' cutoff). So
    `denoising_end=0.8` is the boundary t = 200. Wan's `boundary_ratio` is the opposite convention: a fraction of
    `T` (the boundary is `boundary_ratio * T`, `0.875` -> t = 875)."""
    if not 0.0 < denoising_end < 1.0:
        raise ValueError(f"`denoising_end` must lie in (0, 1), got {denoising_end!r}.")
    return float(round(num_train_timesteps - denoising_end * num_train_timesteps))


def expert_index(timesteps, boundaries):
    """Hard routing: the index `k` with `b_k <= t + tol < b_{k+1}` (`tol` = `BOUNDARY_TOLERANCE`).

    A timestep on a boundary, or within the tolerance below it, goes to the upper expert. `timesteps` is a Python
    number (returns an `int`; `boundaries` a sorted sequence) or a tensor (returns a long tensor of the same shape;
    `boundaries` a float64 tensor on its device). This is the one place an owner is decided.
    """
    if torch.is_tensor(timesteps):
        return torch.bucketize(timesteps.double() + BOUNDARY_TOLERANCE, boundaries.double(), right=True)
    return bisect.bisect_right(boundaries, float(timesteps) + BOUNDARY_TOLERANCE)


def _ramps_to_weights(ramps: torch.Tensor) -> torch.Tensor:
    """`w_k = s_k - s_{k+1}` from the `(B, N-1)` boundary ramps, with `s_0 = 1` and `s_N = 0`."""
    ones = ramps.new_ones(ramps.shape[0], 1)
    zeros = ramps.new_zeros(ramps.shape[0], 1)
    cumulative = torch.cat([ones, ramps, zeros], dim=1)
    return (cumulative[:, :-1] - cumulative[:, 1:]).clamp_min(0.0)


def hard_weights(timesteps: torch.Tensor, boundaries: torch.Tensor, num_experts: int) -> torch.Tensor:
    index = expert_index(timesteps, boundaries)
    return timesteps.new_zeros(timesteps.shape[0], num_experts).scatter_(1, index[:, None], 1.0)


def linear_weights(timesteps: torch.Tensor, boundaries: torch.Tensor, blend_width: float) -> torch.Tensor:
    """Linear ramps `s_k(t) = clip((t - b_k) / width + 1/2, 0, 1)`."""
    ramps = ((timesteps[:, None] - boundaries[None, :]) / blend_width + 0.5).clamp(0.0, 1.0)
    return _ramps_to_weights(ramps)


def sigmoid_weights(
    timesteps: torch.Tensor, boundaries: torch.Tensor, sharpness: float, num_train_timesteps: int
) -> torch.Tensor:
    """Sigmoid ramps `s_k(t) = sigmoid(sharpness * (t - b_k) / T)`."""
    ramps = torch.sigmoid(sharpness * (timesteps[:, None] - boundaries[None, :]) / num_train_timesteps)
    return _ramps_to_weights(ramps)


def schedule_weights(
    timesteps: torch.Tensor,
    boundaries: torch.Tensor,
    routing: str,
    num_train_timesteps: int,
    blend_width: float,
    sharpness: float,
) -> torch.Tensor:
    """`(B, N)` weights of a fixed (non-learned) schedule at float `timesteps` of shape `(B,)`."""
    num_experts = boundaries.numel() + 1
    if routing == "hard":
        return hard_weights(timesteps, boundaries, num_experts)
    if routing == "linear":
        return linear_weights(timesteps, boundaries, blend_width)
    if routing == "sigmoid":
        return sigmoid_weights(timesteps, boundaries, sharpness, num_train_timesteps)
    raise ValueError(f"`routing` must be one of {['hard', 'linear', 'sigmoid']} here, got {routing!r}.")


def learned_weights(timesteps: torch.Tensor, logits: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Softmax over experts of per-expert logits, linearly interpolated between `K` evenly spaced knots on `[0, T]`.

    `logits` has shape `(K, N)`; knot `j` sits at `t = j * T / (K - 1)`.
    """
    num_knots = logits.shape[0]
    position = (timesteps.clamp(0, num_train_timesteps) / num_train_timesteps) * (num_knots - 1)
    low = position.floor().long().clamp(max=num_knots - 2)
    frac = (position - low.to(position.dtype)).unsqueeze(1)
    interpolated = logits[low] * (1 - frac) + logits[low + 1] * frac
    return torch.softmax(interpolated, dim=1)


def initial_learned_logits(
    num_knots: int,
    boundaries: torch.Tensor,
    init: str,
    num_train_timesteps: int,
    blend_width: float,
    sharpness: float,
    floor: float = 1e-4,
) -> torch.Tensor:
    """Logits `log(max(w(t_j), floor))` of schedule `init` at the knots, so the learned schedule starts close to it."""
    if init not in LEARNED_INITS:
        raise ValueError(f"`learned_init` must be one of {list(LEARNED_INITS)}, got {init!r}.")
    knots = torch.linspace(0, num_train_timesteps, num_knots, dtype=torch.float64)
    # the last knot sits at T itself, which belongs to no interval: evaluate it just inside [0, T)
    knots[-1] = num_train_timesteps - 1e-6
    weights = schedule_weights(knots, boundaries.double(), init, num_train_timesteps, blend_width, sharpness)
    return weights.clamp_min(floor).log().float()


def default_expertization_probs(num_experts: int) -> list[float]:
    """MEME's soft-expert probabilities `p_k`: `[0.8, 0.4, 0.2, 0.1]` for 4 experts.

    For other `N` they decrease geometrically from 0.8 (expert 0, lowest noise) to 0.1 (expert N-1, highest noise),
    `p_k = 0.8 * (1/8)^(k / (N - 1))`, which reproduces the paper's values for `N = 4`. One expert: `[1.0]`.
    """
    if num_experts == 1:
        return [1.0]
    if num_experts == 4:
        return list(MEME_EXPERTIZATION_PROBS)
    return [0.8 * (0.125 ** (k / (num_experts - 1))) for k in range(num_experts)]


def check_expertization_probs(probs: Sequence[float], num_experts: int) -> list[float]:
    values = list(probs)
    if len(values) != num_experts:
        raise ValueError(
            f"`expertization_probs` must hold one probability per expert ({num_experts}), got {len(values)}: "
            f"{values!r}."
        )
    if not all(isinstance(p, (int, float)) and 0.0 <= p <= 1.0 for p in values):
        raise ValueError(f"`expertization_probs` must lie in [0, 1], got {values!r}.")
    return [float(p) for p in values]


def sample_training_timesteps(
    batch_size: int,
    expert: int,
    boundaries: Sequence[float],
    num_train_timesteps: int,
    strategy: str = "soft",
    expertization_prob: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Integer training timesteps for expert `expert` (MEME's soft expert strategy).

    - `"hard"`: uniform on the expert's own interval `[b_k, b_{k+1})`.
    - `"soft"`: with probability `p_k` (`expertization_prob`) from the own interval, otherwise uniform on `[0, T)`.
    - `"uniform"`: uniform on `[0, T)` (a single model).

    Draws happen on `generator`'s device (CPU by default) and are then moved to `device`.
    """
    if strategy not in TIMESTEP_STRATEGIES:
        raise ValueError(f"`strategy` must be one of {list(TIMESTEP_STRATEGIES)}, got {strategy!r}.")
    num_experts = len(boundaries) + 1
    if not 0 <= expert < num_experts:
        raise ValueError(f"`expert` must be in [0, {num_experts - 1}], got {expert!r}.")
    owned = owned_timesteps(boundaries, num_train_timesteps)[expert]
    low, high = owned.start, owned.stop
    gen_device = generator.device if generator is not None else "cpu"
    own = torch.randint(low, high, (batch_size,), generator=generator, device=gen_device)
    if strategy == "hard":
        return own.to(device)
    anywhere = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=gen_device)
    if strategy == "uniform":
        return anywhere.to(device)
    if expertization_prob is None:
        expertization_prob = default_expertization_probs(num_experts)[expert]
    if not 0.0 <= expertization_prob <= 1.0:
        raise ValueError(f"`expertization_prob` must lie in [0, 1], got {expertization_prob!r}.")
    pick_own = torch.rand(batch_size, generator=generator, device=gen_device) < expertization_prob
    return torch.where(pick_own, own, anywhere).to(device)
