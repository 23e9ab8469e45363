"""Short sampler names (as on the command line) -> configured diffusers schedulers."""

from __future__ import annotations

from typing import Any


# name -> (diffusers class, config overrides)
SCHEDULER_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def scheduler_from_name(name: str, config: dict | None = None, **overrides):
    r"""
    A diffusers scheduler from a short name, built with `from_config(config)` so it keeps the noise schedule of
    `config` (e.g. the scheduler config a model was trained with).

    Args:
        name (`str`): One of `SCHEDULER_NAMES`: `ddpm`, `ddim`, `dpmpp`, `dpmpp-karras`, `euler`, `euler-karras`,
            `euler-a`, `heun`, `lms`, `unipc`.
        config (`dict`, *optional*): A scheduler config to take the noise schedule from (`num_train_timesteps`,
            `beta_schedule`, `prediction_type`, ...).
        overrides: Config values set on top.

    Example:
        ```py
        >>> from diffusers_experts.schedulers import scheduler_from_name
        >>> scheduler_from_name("dpmpp-karras").config.use_karras_sigmas
        True
        ```
    """
    import diffusers

    if name not in SCHEDULER_NAMES:
        raise ValueError(f"Unknown scheduler name {name!r}. Valid choices: {sorted(SCHEDULER_NAMES)}.")
    class_name, defaults = SCHEDULER_NAMES[name]
    base = {key: value for key, value in dict(config or {}).items() if not key.startswith("_")}
    return getattr(diffusers, class_name).from_config({**base, **defaults, **overrides})
