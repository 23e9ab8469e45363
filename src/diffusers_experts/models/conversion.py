"""Converters between an `ExpertMixtureUNet` and diffusers' native two-expert models (Wan 2.2)."""

from __future__ import annotations

from torch import nn

from .expert_mixture import ExpertMixtureUNet


def mixture_from_wan(
    transformer: nn.Module,
    transformer_2: nn.Module,
    boundary_ratio: float,
    num_train_timesteps: int = 1000,
) -> ExpertMixtureUNet:
    r"""
    A hard two-expert mixture equal to Wan 2.2's switch: `transformer` (high noise) runs while
    `t >= boundary_ratio * T`, `transformer_2` (low noise) below. In the mixture, expert 0 is the low-noise expert:
    `experts = [transformer_2, transformer]`, `boundaries = [boundary_ratio * T]`; a timestep on the boundary goes to
    the upper (high-noise) expert, as in Wan.

    Args:
        transformer, transformer_2 (`WanTransformer3DModel`): Wan's high-noise and low-noise experts.
        boundary_ratio (`float`): Wan's `boundary_ratio` (0.875 for T2V, 0.9 for I2V), a fraction of `T`.
        num_train_timesteps (`int`, defaults to 1000): The scheduler's `num_train_timesteps`.
    """
    if transformer is None or transformer_2 is None:
        raise ValueError(
            "`transformer` and `transformer_2` are both required: a Wan 2.2 pipeline without `transformer_2` "
            "(Wan 2.1) has a single model, not two experts."
        )
    if boundary_ratio is None or not 0.0 < boundary_ratio < 1.0:
        raise ValueError(f"`boundary_ratio` must lie in (0, 1) (a fraction of T), got {boundary_ratio!r}.")
    return ExpertMixtureUNet.from_experts(
        [transformer_2, transformer],
        boundaries=[boundary_ratio * num_train_timesteps],
        routing="hard",
        num_train_timesteps=num_train_timesteps,
        boundary_units="timestep",
    )


def mixture_from_wan_pipeline(pipeline) -> ExpertMixtureUNet:
    """[`mixture_from_wan`] from a `WanPipeline` / `WanImageToVideoPipeline` with `transformer_2` and
    `boundary_ratio`; the result drops into `WanPipeline(transformer=mixture)` (without `transformer_2` and
    `boundary_ratio`)."""
    return mixture_from_wan(
        pipeline.transformer,
        getattr(pipeline, "transformer_2", None),
        pipeline.config.get("boundary_ratio"),
        pipeline.scheduler.config.num_train_timesteps,
    )


def wan_components(mixture: ExpertMixtureUNet) -> dict:
    """The inverse of [`mixture_from_wan`]: `{"transformer", "transformer_2", "boundary_ratio"}` for
    `WanPipeline(..., **wan_components(mixture))`, from a hard two-expert mixture."""
    if mixture.num_experts != 2 or mixture.config.routing != "hard":
        raise ValueError(
            f"Wan 2.2 has two hard-switched experts; this mixture has {mixture.num_experts} expert(s) with "
            f"routing={mixture.config.routing!r}: use `WanPipeline(transformer=mixture)` instead."
        )
    return {
        "transformer": mixture.experts[1],
        "transformer_2": mixture.experts[0],
        "boundary_ratio": mixture.config.boundaries[0] / mixture.config.num_train_timesteps,
    }
