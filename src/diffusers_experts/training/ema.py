"""Exponential moving averages of the experts' weights, one average per expert."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .experts import trainable_parameters


class ExpertEMA:
    """One diffusers `EMAModel` per expert (over the expert's trainable parameters: all of them, or a LoRA expert's
    adapter). Checkpointable with `accelerator.register_for_checkpointing` (it has `state_dict`/`load_state_dict`).

    Args:
        experts (`Sequence[nn.Module]`): The experts, on their training device.
        indices (`Sequence[int]`): The expert index of each entry of `experts` (the experts this run trains).
        decay, min_decay, use_ema_warmup, inv_gamma, power: As in `diffusers.training_utils.EMAModel`.
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        indices: Sequence[int],
        decay: float = 0.9999,
        min_decay: float = 0.0,
        use_ema_warmup: bool = True,
        inv_gamma: float = 1.0,
        power: float = 0.75,
    ):
        from diffusers.training_utils import EMAModel

        if len(experts) != len(indices):
            raise ValueError(f"`indices` must name one expert index per expert, got {list(indices)!r}.")
        self.experts = dict(zip(indices, experts))
        self.averages = {
            k: EMAModel(
                trainable_parameters(expert),
                decay=decay,
                min_decay=min_decay,
                use_ema_warmup=use_ema_warmup,
                inv_gamma=inv_gamma,
                power=power,
            )
            for k, expert in self.experts.items()
        }

    def step(self, k: int) -> None:
        """Update expert `k`'s average after one of its optimizer steps."""
        self.averages[k].step(trainable_parameters(self.experts[k]))

    def state_dict(self) -> dict:
        return {str(k): average.state_dict() for k, average in self.averages.items()}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state) != sorted(str(k) for k in self.averages):
            raise ValueError(f"EMA state holds experts {sorted(state)}, this run trains {sorted(self.averages)}.")
        for k, average in self.averages.items():
            average.load_state_dict(state[str(k)])

    def copy_to_experts(self) -> None:
        """Overwrite every expert's weights with its average (for the final export)."""
        for k, average in self.averages.items():
            average.copy_to(trainable_parameters(self.experts[k]))

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Temporarily swap the averages into the experts (previews), restoring the training weights afterwards."""
        for k, average in self.averages.items():
            average.store(trainable_parameters(self.experts[k]))
            average.copy_to(trainable_parameters(self.experts[k]))
        try:
            yield
        finally:
            for k, average in self.averages.items():
                average.restore(trainable_parameters(self.experts[k]))


def make_ema(args, accelerator, experts: Sequence[nn.Module], indices: Sequence[int]) -> ExpertEMA | None:
    """With `--use_ema`, the averages of `experts` (`--ema_max_decay`, `--ema_inv_gamma`, `--ema_power`), registered
    with `accelerator` so that checkpoints save and restore them; else None."""
    if not args.use_ema:
        return None
    ema = ExpertEMA(experts, indices, decay=args.ema_max_decay, inv_gamma=args.ema_inv_gamma, power=args.ema_power)
    accelerator.register_for_checkpointing(ema)
    return ema
