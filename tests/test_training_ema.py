"""Per-expert EMA: each expert's average moves only with its own steps (warm-up counted per expert), and a learned
routing schedule is averaged with the experts instead of being exported raw."""

import pytest
import torch
from torch import nn

from diffusers_experts.training import ExpertEMA


def _set(module_or_param, value):
    with torch.no_grad():
        for p in module_or_param.parameters() if isinstance(module_or_param, nn.Module) else [module_or_param]:
            p.fill_(value)


def test_each_expert_average_counts_its_own_steps():
    experts = [nn.Linear(2, 2), nn.Linear(2, 2)]
    ema = ExpertEMA(experts, [0, 1], power=2 / 3)
    for _ in range(5):
        ema.step(0)
    assert ema.averages[0].optimization_step == 5
    assert ema.averages[1].optimization_step == 0  # untouched by expert 0's steps


def test_learned_routing_is_averaged_and_exported_averaged():
    experts = [nn.Linear(2, 2), nn.Linear(2, 2)]
    logits = nn.Parameter(torch.zeros(3, 2))
    ema = ExpertEMA(experts, [0, 1], power=2 / 3, routing_parameters=[logits])
    for step in range(1, 6):
        _set(logits, float(step))
        ema.step(0)
        ema.step(1)
        ema.step_routing()
    raw = logits.detach().clone()
    with ema.averaged():
        averaged = logits.detach().clone()
        assert averaged.max() < raw.max()  # previews see the average
    assert torch.equal(logits.detach(), raw)  # and training continues from the raw weights
    state = ema.state_dict()
    assert "routing" in state
    ema.copy_to_experts()
    assert torch.allclose(logits.detach(), averaged)  # the export pairs averaged experts with averaged logits

    other = ExpertEMA(experts, [0, 1], routing_parameters=[nn.Parameter(torch.zeros(3, 2))])
    other.load_state_dict(state)
    assert other.routing_average.optimization_step == 5
    with pytest.raises(ValueError, match="routing"):
        ExpertEMA(experts, [0, 1]).load_state_dict(state)
    with pytest.raises(ValueError, match="routing_parameters"):
        ExpertEMA(experts, [0, 1]).step_routing()
