"""BlendedScheduler: wraps any diffusers noise scheduler and aligns its steps to a mixture's experts."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from ..models.expert_mixture import ExpertMixtureUNet
from ..routing import noise_sigmas


# Config keys of earlier versions that are dropped on load, with the reason (a warning says it).
REMOVED_CONFIG_KEYS = {
    "routing_source": (
        "every model call is routed by the timestep it is conditioned on (the `timestep` given to the mixture), "
        "whatever the scheduler"
    ),
}

# diffusers schedulers whose noise levels come from a training `alphas_cumprod` table (VP / DDPM family): they
# condition the model on training timesteps, which is what a mixture routes by.
WRAPPABLE_SCHEDULERS = tuple(s.name for s in KarrasDiffusionSchedulers if s.name != "EDMEulerScheduler")


def resolve_base_scheduler_class(name: str) -> type:
    """A diffusers scheduler class by name, from the allow-list [`WRAPPABLE_SCHEDULERS`] (never an arbitrary import)."""
    import diffusers

    if name not in WRAPPABLE_SCHEDULERS:
        raise ValueError(
            f"`base_scheduler_class` must name a diffusers scheduler of the DDPM family, got {name!r}. "
            f"Valid choices: {list(WRAPPABLE_SCHEDULERS)}."
        )
    return getattr(diffusers, name)


def allocate_steps(num_inference_steps: int, interval_lengths: Sequence[float]) -> list[int]:
    """Split `num_inference_steps` over experts in proportion to their interval lengths (largest remainder, >= 1)."""
    num_experts = len(interval_lengths)
    if num_inference_steps < num_experts:
        raise ValueError(
            f"`num_inference_steps` ({num_inference_steps}) must be >= the number of experts ({num_experts}) to "
            f"give every expert at least one step when the schedule is aligned to the boundaries."
        )
    spare = num_inference_steps - num_experts
    total = float(sum(interval_lengths))
    shares = [spare * length / total for length in interval_lengths]
    steps = [1 + math.floor(s) for s in shares]
    order = sorted(range(num_experts), key=lambda k: shares[k] - math.floor(shares[k]), reverse=True)
    for k in order[: num_inference_steps - sum(steps)]:
        steps[k] += 1
    return steps


def check_steps_fit(owned_timesteps: Sequence[range], steps_per_expert: Sequence[int]) -> None:
    """Every expert gets at most one evaluation point per integer training timestep it owns."""
    for k, (owned, n_k) in enumerate(zip(owned_timesteps, steps_per_expert)):
        if n_k > len(owned):
            raise ValueError(
                f"`steps_per_expert[{k}]` = {n_k} is more than the {len(owned)} integer training timesteps that "
                f"expert {k} owns ([{owned.start}, {owned.stop - 1}])."
            )


def aligned_timesteps(owned_timesteps: Sequence[range], steps_per_expert: Sequence[int]) -> list[int]:
    """Descending integer timesteps where expert k's `n_k` evaluation points lie inside the timesteps it owns.

    `owned_timesteps[k]` is expert k's range of integer training timesteps (the mixture's `owned_timesteps`). Its
    points are evenly spaced from the top of that range down, and its last step lands exactly on the top timestep of
    expert k-1 (or on the clean sample for expert 0), so no step integrates across a boundary.
    """
    points: list[int] = []
    for k in reversed(range(len(steps_per_expert))):
        owned = owned_timesteps[k]
        top, bottom = owned.stop - 1, owned.start - 1  # bottom: top timestep of expert k - 1 (-1: the clean sample)
        spaced = np.round(np.linspace(top, bottom, steps_per_expert[k] + 1)[:-1]).astype(np.int64).tolist()
        points.extend(spaced)
    return points


def aligned_karras_sigmas(
    owned_timesteps: Sequence[range], sigmas: torch.Tensor, steps_per_expert: Sequence[int], rho: float = 7.0
) -> list[float]:
    """Descending sigmas (final 0 appended) with Karras spacing inside each expert's own noise range.

    `sigmas` is the noise level of every training timestep ([`~diffusers_experts.routing.noise_sigmas`]). Expert k's
    `n_k` points run from the sigma of its top owned timestep towards the sigma of the next expert's top timestep
    (where its last step lands), spaced as `(sigma_max^(1/rho) + i/n (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`
    (Karras et al. 2022, eq. 5); expert 0 ends at the smallest training sigma.
    """
    points: list[float] = []
    for k in reversed(range(len(steps_per_expert))):
        owned, n_k = owned_timesteps[k], steps_per_expert[k]
        sigma_max, sigma_min = sigmas[owned.stop - 1].item(), sigmas[max(owned.start - 1, 0)].item()
        ramp = np.linspace(0, 1, n_k if k == 0 else n_k + 1)
        spaced = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        points.extend(spaced.tolist() if k == 0 else spaced[:-1].tolist())
    return [*points, 0.0]


class BlendedScheduler(SchedulerMixin, ConfigMixin):
    r"""
    Any diffusers noise scheduler of the DDPM family (DDPM, DDIM, DPM-Solver(++), Euler, Heun, LMS, UniPC, ... with or
    without Karras sigmas), made expert-aware for an [`ExpertMixtureUNet`]. Stepping is delegated to the wrapped
    `base` scheduler (`set_timesteps`, `step`, `scale_model_input`, `add_noise`, `timesteps`, `init_noise_sigma`,
    `order`, and any other attribute). Routing is not the scheduler's business: every model call is routed by the
    timestep it is conditioned on, by the mixture, with or without this wrapper. The wrapper changes *where the steps
    are*:

    - **Boundary alignment** (`align_to_boundaries=True`): the inference schedule is rebuilt so that each expert's
      steps start inside its own interval and its last step lands on the top timestep of the next lower expert: no
      step integrates across a hard boundary.
    - **Steps per expert** (`steps_per_expert=[n_0, ..., n_{N-1}]`, expert 0 = lowest noise): how many of the
      `num_inference_steps` each expert takes, e.g. more where structure forms (high noise). Implies alignment.

    The integer timesteps each expert owns are read from the mixture (`mixture.owned_timesteps`) at
    [`~BlendedScheduler.set_timesteps`] time (`mixture=...`; the [`MultiExpertPipeline`] passes its `unet`): the
    mixture config owns the boundaries, they are never stored here.
    Alignment and `steps_per_expert` need a base whose `set_timesteps` accepts custom `timesteps` (DDPM,
    DPM-Solver multistep and Euler / Heun without Karras sigmas) or, with Karras sigmas, custom `sigmas` (Euler: the
    Karras spacing is then applied inside each expert's own noise range).

    Args:
        base_scheduler_class (`str`, defaults to `"DDIMScheduler"`): Class name of the wrapped diffusers scheduler.
        base_scheduler_config (`dict`, *optional*): Its config (plain JSON values), as in its `scheduler_config.json`.
        align_to_boundaries (`bool`, defaults to `False`): Align the inference schedule to the mixture's boundaries.
        steps_per_expert (`list[int]`, *optional*): Steps per expert (expert 0 first); must sum to the step count.

    A saved config of an earlier version may hold `routing_source`: it is dropped on load with a `FutureWarning`
    (calls are routed by the timestep they are conditioned on, whatever it said).

    Example:
        ```py
        >>> from diffusers import DPMSolverMultistepScheduler
        >>> from diffusers_experts import BlendedScheduler, MultiExpertPipeline

        >>> scheduler = BlendedScheduler.from_scheduler(DPMSolverMultistepScheduler(), steps_per_expert=[4, 6, 10])
        >>> pipe = MultiExpertPipeline(unet=mixture, scheduler=scheduler)  # a mixture of 3 experts
        >>> images = pipe(num_inference_steps=20).images
        ```
    """

    config_name = "scheduler_config.json"
    _compatibles: list[str] = []

    @register_to_config
    def __init__(
        self,
        base_scheduler_class: str = "DDIMScheduler",
        base_scheduler_config: dict[str, Any] | None = None,
        align_to_boundaries: bool = False,
        steps_per_expert: list[int] | None = None,
    ):
        base_cls = resolve_base_scheduler_class(base_scheduler_class)
        if base_scheduler_config is not None and not isinstance(base_scheduler_config, dict):
            raise TypeError(f"`base_scheduler_config` must be a dict or None, got {type(base_scheduler_config)}.")
        if not isinstance(align_to_boundaries, bool):
            raise TypeError(f"`align_to_boundaries` must be a bool, got {align_to_boundaries!r}.")
        if steps_per_expert is not None:
            values = list(steps_per_expert)
            if not values or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in values):
                raise ValueError(
                    f"`steps_per_expert` must be a non-empty list of integers >= 1 (one per expert), got "
                    f"{steps_per_expert!r}."
                )
        self.base = base_cls.from_config(dict(base_scheduler_config or {}))

    @classmethod
    def from_scheduler(cls, scheduler: SchedulerMixin, **options) -> BlendedScheduler:
        r"""
        Wrap an existing diffusers `scheduler` (its class and config are copied into this scheduler's config).

        Args:
            scheduler (`SchedulerMixin`): e.g. `DPMSolverMultistepScheduler(use_karras_sigmas=True)`.
            options: `align_to_boundaries`, `steps_per_expert`.
        """
        if isinstance(scheduler, BlendedScheduler):
            raise TypeError("`scheduler` is already a BlendedScheduler; wrap its `.base` scheduler instead.")
        if not isinstance(scheduler, SchedulerMixin):
            raise TypeError(f"`scheduler` must be a diffusers scheduler (SchedulerMixin), got {type(scheduler)}.")
        allowed = {"align_to_boundaries", "steps_per_expert"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"Unknown BlendedScheduler option(s) {unknown}; valid: {sorted(allowed)}.")
        config = {key: value for key, value in dict(scheduler.config).items() if not key.startswith("_")}
        return cls(base_scheduler_class=type(scheduler).__name__, base_scheduler_config=config, **options)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        r"""
        Build from a BlendedScheduler config, or wrap the scheduler that another scheduler config names in its
        `_class_name` (a loaded or saved `scheduler_config.json`), e.g.
        `BlendedScheduler.from_config(DDPMScheduler.load_config(path), steps_per_expert=[...])`. Keys of earlier
        versions ([`REMOVED_CONFIG_KEYS`], e.g. `routing_source`) are dropped with a `FutureWarning`.
        """
        values = dict(config or {})
        for key in sorted(REMOVED_CONFIG_KEYS.keys() & values.keys()):
            warnings.warn(
                f"`{key}`={values.pop(key)!r} in this BlendedScheduler config is ignored and dropped: "
                f"{REMOVED_CONFIG_KEYS[key]}. Save the scheduler again to remove it from the file.",
                FutureWarning,
                stacklevel=2,
            )
        class_name = values.get("_class_name")
        if class_name is not None and class_name != cls.__name__:
            base = resolve_base_scheduler_class(class_name).from_config(values)
            wrapped = cls.from_scheduler(base, **kwargs)
            return (wrapped, {}) if return_unused_kwargs else wrapped
        own = set(inspect.signature(cls.__init__).parameters)
        foreign = sorted(k for k in values if not k.startswith("_") and k not in own)
        if values and "base_scheduler_class" not in values and foreign:
            raise ValueError(
                f"`config` describes another scheduler (keys {foreign[:4]}...) without its class name: wrap the "
                f"scheduler itself with `BlendedScheduler.from_scheduler(scheduler)`."
            )
        config = values if config is not None else None
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def _get_compatibles(cls) -> list[type]:
        """BlendedScheduler itself and every diffusers scheduler it can wrap (diffusers' version looks in diffusers)."""
        import diffusers

        return [cls, *(getattr(diffusers, name) for name in WRAPPABLE_SCHEDULERS if hasattr(diffusers, name))]

    # ------------------------------------------------------------------ delegation

    def __getattr__(self, name: str):
        # only called when normal lookup fails: everything the base scheduler has (sigmas, step_index, ...)
        if name in ("base", "_internal_dict") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.base.timesteps

    @property
    def init_noise_sigma(self) -> float:
        return self.base.init_noise_sigma

    @property
    def order(self) -> int:
        return self.base.order

    @property
    def num_inference_steps(self) -> int | None:
        return self.base.num_inference_steps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return self.base.scale_model_input(sample, timestep)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, **kwargs):
        return self.base.step(model_output, timestep, sample, *args, **kwargs)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        return self.base.add_noise(original_samples, noise, timesteps)

    def __len__(self) -> int:
        return self.base.config.num_train_timesteps

    # ------------------------------------------------------------------ expert-aware schedule

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mixture=None,
        **kwargs,
    ) -> None:
        r"""
        Set the inference schedule of the base scheduler, aligned to `mixture`'s experts when asked.

        Args:
            num_inference_steps (`int`): Number of denoising steps.
            device (`str` or `torch.device`, *optional*): Device of the timesteps.
            mixture ([`ExpertMixtureUNet`], *optional*): The mixture whose experts the schedule follows (the integer
                timesteps each owns, `mixture.owned_timesteps`); required with `align_to_boundaries=True` or
                `steps_per_expert`.
            kwargs: Passed to the base scheduler's `set_timesteps` (e.g. custom `timesteps`), plain schedules only.
        """
        cfg = self.config
        if mixture is not None:
            self._check_mixture(mixture)
        if not (cfg.align_to_boundaries or cfg.steps_per_expert is not None):
            self.base.set_timesteps(num_inference_steps, device=device, **kwargs)
            return
        if mixture is None:
            raise ValueError(
                "`mixture` is required: `align_to_boundaries` / `steps_per_expert` follow the mixture's boundaries, "
                "call `set_timesteps(num_inference_steps, device, mixture=unet)`."
            )
        if kwargs:
            raise ValueError(
                f"Custom schedule arguments {sorted(kwargs)} cannot be combined with an aligned schedule."
            )
        owned = mixture.owned_timesteps
        steps = self._steps_per_expert(num_inference_steps, len(owned), mixture)
        check_steps_fit(owned, steps)
        timesteps = aligned_timesteps(owned, steps)
        accepted = inspect.signature(self.base.set_timesteps).parameters
        karras = bool(self.base.config.get("use_karras_sigmas", False))
        if karras and "sigmas" in accepted:
            # Karras spacing inside each expert's own sigma range (Euler takes custom sigmas as they are)
            sigmas = aligned_karras_sigmas(owned, noise_sigmas(self.base.alphas_cumprod), steps)
            schedule = {"sigmas": sigmas}
        elif "timesteps" in accepted:
            schedule = {"timesteps": timesteps}
        else:
            raise ValueError(
                f"{type(self.base).__name__} cannot take a custom schedule, which `align_to_boundaries` / "
                f"`steps_per_expert` need. Use a base whose `set_timesteps` accepts `timesteps` (DDPMScheduler, "
                f"DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler) or Karras `sigmas` "
                f"(EulerDiscreteScheduler), or align_to_boundaries=False without steps_per_expert."
            )
        try:
            self.base.set_timesteps(device=device, **schedule)
        except ValueError as error:
            raise ValueError(
                f"{type(self.base).__name__} refused the boundary-aligned schedule {timesteps}: {error} (Karras / "
                f"exponential / beta sigmas define their own spacing: disable them, use EulerDiscreteScheduler for "
                f"Karras sigmas, or align_to_boundaries=False)."
            ) from error

    def _check_mixture(self, mixture) -> None:
        """`mixture` is an ExpertMixtureUNet trained with this scheduler's `T`."""
        if not isinstance(mixture, ExpertMixtureUNet):
            raise TypeError(f"`mixture` must be an ExpertMixtureUNet, got {type(mixture).__name__}.")
        config = mixture.config
        if config.num_train_timesteps != self.base.config.num_train_timesteps:
            raise ValueError(
                f"The mixture was trained with num_train_timesteps={config.num_train_timesteps} but the scheduler "
                f"uses {self.base.config.num_train_timesteps}: routing would put calls on the wrong experts."
            )

    def _steps_per_expert(self, num_inference_steps: int | None, num_experts: int, mixture) -> list[int]:
        steps = self.config.steps_per_expert
        if steps is None:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
            lengths = [high - low for low, high in mixture.expert_intervals]
            return allocate_steps(num_inference_steps, lengths)
        steps = list(steps)
        if len(steps) != num_experts:
            raise ValueError(
                f"`steps_per_expert` must hold one step count per expert ({num_experts}), got {len(steps)}: {steps!r}."
            )
        if num_inference_steps is not None and sum(steps) != num_inference_steps:
            raise ValueError(
                f"`steps_per_expert` {steps!r} sums to {sum(steps)} steps, but num_inference_steps="
                f"{num_inference_steps}: make them equal (or pass num_inference_steps=None)."
            )
        return steps
