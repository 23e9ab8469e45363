"""Exponential moving averages of the experts' weights, one average per expert."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .experts import trainable_parameters


ROUTING_KEY = "routing"


class ExpertEMA:
    """One diffusers `EMAModel` per expert (over the expert's trainable parameters: all of them, or a LoRA expert's
    adapter). Checkpointable with `accelerator.register_for_checkpointing` (it has `state_dict`/`load_state_dict`).

    Args:
        experts (`Sequence[nn.Module]`): The experts, on their training device.
        indices (`Sequence[int]`): The expert index of each entry of `experts` (the experts this run trains).
        decay, min_decay, use_ema_warmup, inv_gamma, power: As in `diffusers.training_utils.EMAModel`.
        routing_parameters (`Sequence[nn.Parameter]`, *optional*): Parameters of a learned routing schedule (the
            mixture's `routing_logits`), trained jointly with the experts. They get their own average (updated by
            [`~ExpertEMA.step_routing`]), so an exported or previewed mixture pairs averaged experts with the averaged
            schedule they were trained with, never with the last raw logits.
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
        routing_parameters: Sequence[nn.Parameter] | None = None,
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
        self.routing = list(routing_parameters or [])
        self.routing_average = None
        if self.routing:
            self.routing_average = EMAModel(
                self.routing,
                decay=decay,
                min_decay=min_decay,
                use_ema_warmup=use_ema_warmup,
                inv_gamma=inv_gamma,
                power=power,
            )

    def step(self, k: int) -> None:
        """Update expert `k`'s average after one of its optimizer steps."""
        self.averages[k].step(trainable_parameters(self.experts[k]))

    def step_routing(self) -> None:
        """Update the average of the routing parameters after one of their optimizer steps."""
        if self.routing_average is None:
            raise ValueError("This EMA has no `routing_parameters` to average.")
        self.routing_average.step(self.routing)

    def state_dict(self) -> dict:
        state = {str(k): average.state_dict() for k, average in self.averages.items()}
        if self.routing_average is not None:
            state[ROUTING_KEY] = self.routing_average.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        experts = {k: v for k, v in state.items() if k != ROUTING_KEY}
        if sorted(experts) != sorted(str(k) for k in self.averages):
            raise ValueError(f"EMA state holds experts {sorted(experts)}, this run trains {sorted(self.averages)}.")
        if (ROUTING_KEY in state) != (self.routing_average is not None):
            raise ValueError(
                f"EMA state {'has' if ROUTING_KEY in state else 'has no'} routing average, this run "
                f"{'averages' if self.routing_average is not None else 'does not average'} the routing parameters."
            )
        for k, average in self.averages.items():
            average.load_state_dict(state[str(k)])
        if self.routing_average is not None:
            self.routing_average.load_state_dict(state[ROUTING_KEY])

    def _pairs(self):
        pairs = [(average, trainable_parameters(self.experts[k])) for k, average in self.averages.items()]
        if self.routing_average is not None:
            pairs.append((self.routing_average, self.routing))
        return pairs

    def copy_to_experts(self) -> None:
        """Overwrite every expert's weights with its average (for the final export)."""
        for average, params in self._pairs():
            average.copy_to(params)

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Temporarily swap the averages into the experts (previews), restoring the training weights afterwards."""
        pairs = self._pairs()
        for average, params in pairs:
            average.store(params)
            average.copy_to(params)
        try:
            yield
        finally:
            for average, params in pairs:
                average.restore(params)


def make_ema(
    args,
    accelerator,
    experts: Sequence[nn.Module],
    indices: Sequence[int],
    routing_parameters: Sequence[nn.Parameter] | None = None,
) -> ExpertEMA | None:
    """With `--use_ema`, the averages of `experts` (and of learned `routing_parameters`) (`--ema_max_decay`,
    `--ema_inv_gamma`, `--ema_power`), registered with `accelerator` so that checkpoints save and restore them; else
    None."""
    if not args.use_ema:
        return None
    ema = ExpertEMA(
        experts,
        indices,
        decay=args.ema_max_decay,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
        routing_parameters=routing_parameters,
    )
    accelerator.register_for_checkpointing(ema)
    return ema
