"""Model complexity: parameters and multiply-accumulates (MACs) per denoiser call, for experts and mixtures.

MACs are counted with `torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions; MACs = FLOPs / 2;
normalisations, activations and bias additions are not counted, as usual). PyTorch's counter has no formula for the
fused attention kernels that `F.scaled_dot_product_attention` dispatches to on CPU
(`aten._scaled_dot_product_flash_attention_for_cpu`) and on some other back ends, so their attention would count as
zero: [`measure_macs`] adds formulas for them (`QK^T` plus `AV`: `B * H * L_q * L_k * (E + E_v)` MACs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils import flop_counter


__all__ = [
    "attention_flop_formulas",
    "count_parameters",
    "expert_macs",
    "measure_macs",
    "mixture_macs_per_call",
    "mixture_macs_schedule",
]


def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a fused attention forward: `2 * B * H * L_q * L_k * (E + E_v)`."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a fused attention backward (as PyTorch counts its other SDPA kernels)."""
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def attention_flop_formulas() -> dict:
    """`{aten op: flop formula}` for the SDPA kernels that `FlopCounterMode` does not count by itself.

    Pass it as `FlopCounterMode(custom_mapping=attention_flop_formulas())`. Kernels PyTorch already counts (CUDA
    flash / efficient / cuDNN attention) are left to PyTorch's own formulas.
    """
    forward = ["_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"]
    backward = [
        "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_fused_attention_overrideable_backward",
    ]
    formulas = {}
    for names, formula in ((forward, _sdpa_forward_flops), (backward, _sdpa_backward_flops)):
        for name in names:
            op = getattr(torch.ops.aten, name, None)
            if op is not None and op not in flop_counter.flop_registry:
                formulas[op] = formula
    return formulas


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `model` (shared parameters counted once); `trainable_only` counts `requires_grad` ones."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    seen = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def measure_macs(
    model: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    class_labels: torch.Tensor | None = None,
    **forward_kwargs,
) -> int:
    r"""
    Multiply-accumulates of ONE forward call `model(sample, timestep, class_labels=...)`, attention included.

    The call runs for real under `FlopCounterMode` (no gradients), so only the code that actually runs is counted: for
    an [`~diffusers_experts.ExpertMixtureUNet`] that is the experts with non-zero weight at `timestep`, each on its
    own samples. MACs scale with the batch size of `sample`.

    Args:
        model (`torch.nn.Module`): A denoiser with the `UNet2DModel` call signature (`UNet2DModel`, `IUNet2DModel`,
            `ExpertMixtureUNet`, ...).
        sample (`torch.Tensor`): Input `(batch, channels, height, width)`.
        timestep (`torch.Tensor` or `float` or `int`): Training timestep(s), a scalar or one per sample.
        class_labels (`torch.Tensor`, *optional*): Class labels for class-conditional models.
        forward_kwargs: Further keyword arguments for the forward call.

    Returns:
        `int`: MACs (= counted FLOPs / 2).

    Example:
        ```py
        >>> import torch
        >>> from diffusers_experts import IUNet2DModel
        >>> from diffusers_experts.evaluation import count_parameters, measure_macs
        >>> model = IUNet2DModel(sample_size=16, block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=8)
        >>> macs = measure_macs(model, torch.randn(1, 3, 16, 16), timestep=500)
        >>> macs > 0, count_parameters(model) > 0
        (True, True)
        ```
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not torch.is_tensor(sample) or sample.ndim != 4:
        shape = tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__
        raise ValueError(f"`sample` must be a 4-D tensor (batch, channels, height, width), got {shape}.")
    if class_labels is not None:
        forward_kwargs["class_labels"] = class_labels
    return _macs(model, sample, timestep, **forward_kwargs)


def _macs(model: nn.Module, sample: torch.Tensor, timestep, **forward_kwargs) -> int:
    """MACs of one forward call, attention included (FLOPs counted by `FlopCounterMode`, halved)."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=attention_flop_formulas())
    with torch.no_grad(), counter:
        model(sample, timestep, **forward_kwargs)
    return int(counter.get_total_flops()) // 2


def _check_mixture(mixture) -> None:
    if not (hasattr(mixture, "experts") and hasattr(mixture, "active_experts")):
        raise TypeError(
            f"`mixture` must be an ExpertMixtureUNet (with `experts` and `active_experts`), got {type(mixture).__name__}."
        )


def _sample_shape(sample_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) != 4 or any(s < 1 for s in shape):
        raise ValueError(
            f"`sample_shape` must be 4 positive sizes (batch, channels, height, width), got {sample_shape!r}."
        )
    return shape


def expert_macs(
    mixture, sample_shape: Sequence[int], class_labels: torch.Tensor | None = None, timestep: int = 0
) -> list[int]:
    """MACs of one call of each expert of `mixture` alone on a batch of `sample_shape` (attention included)."""
    _check_mixture(mixture)
    return _expert_macs(mixture, _sample_shape(sample_shape), class_labels, timestep)


def _expert_macs(mixture, shape: tuple[int, ...], class_labels: torch.Tensor | None, timestep: int = 0) -> list[int]:
    param = next(mixture.parameters())
    sample = torch.zeros(shape, device=param.device, dtype=param.dtype)
    kwargs = {} if class_labels is None else {"class_labels": class_labels}
    return [_macs(expert, sample, timestep, **kwargs) for expert in mixture.experts]


def mixture_macs_schedule(
    mixture,
    timesteps: Sequence[float] | torch.Tensor,
    sample_shape: Sequence[int],
    class_labels: torch.Tensor | None = None,
) -> list[int]:
    """MACs of the mixture's call at each of `timesteps`: the sum over the experts that run there
    (`mixture.active_experts`).

    Expert costs do not depend on `t`, so each expert is measured once (see [`expert_macs`]) and the mixture decides
    which experts run. The mixture's own weighting arithmetic is elementwise and not counted.
    """
    _check_mixture(mixture)
    shape = _sample_shape(sample_shape)
    t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
    if t.numel() == 0:
        raise ValueError("`timesteps` must hold at least one timestep, got an empty sequence.")
    per_expert = _expert_macs(mixture, shape, class_labels)
    with torch.no_grad():
        return [sum(per_expert[k] for k in mixture.active_experts(step)) for step in t]


def mixture_macs_per_call(
    mixture,
    timesteps: Sequence[float] | torch.Tensor,
    sample_shape: Sequence[int],
    class_labels: torch.Tensor | None = None,
) -> float:
    r"""
    Mean MACs per denoiser call of a mixture over a sampling schedule.

    With hard routing every call runs one expert, so this is the experts' costs weighted by how many steps each owns;
    with blending (linear / sigmoid / learned) a step in an overlap runs several experts and costs their sum.

    Args:
        mixture ([`~diffusers_experts.ExpertMixtureUNet`]): The mixture.
        timesteps (`Sequence[float]` or `torch.Tensor`): The schedule's timesteps in *training* units, e.g.
            `DDIMScheduler.timesteps` after `set_timesteps(50)`.
        sample_shape (`Sequence[int]`): `(batch, channels, height, width)` of one call.
        class_labels (`torch.Tensor`, *optional*): Class labels (batch entries) for class-conditional experts.

    Returns:
        `float`: The mean over `timesteps` of the MACs of one call on a batch of `sample_shape`.

    Example:
        ```py
        >>> from diffusers import DDIMScheduler
        >>> scheduler = DDIMScheduler(num_train_timesteps=1000)
        >>> scheduler.set_timesteps(50)
        >>> macs = mixture_macs_per_call(mixture, scheduler.timesteps, (1, 3, 32, 32))  # doctest: +SKIP
        ```
    """
    schedule = mixture_macs_schedule(mixture, timesteps, sample_shape, class_labels=class_labels)
    return sum(schedule) / len(schedule)
