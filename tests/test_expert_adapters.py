"""Per-expert LoRA adapters: set_expert_adapters / add_expert_adapter over diffusers' PeftAdapterMixin."""

import copy

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from conftest import tiny_text_unet, tiny_unet
from diffusers_experts import ExpertMixtureUNet
from diffusers_experts.models.expert_adapters import add_expert_adapter, expert_adapter_names, set_expert_adapters


TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
EMBED_DIM = 12  # the width of INPUTS' encoder_hidden_states
# peft warns when a second adapter is added to a model: that is the point here
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def text_unet(seed: int):
    return tiny_text_unet(seed, cross_attention_dim=EMBED_DIM)


def lora(seed: int, rank: int = 4) -> LoraConfig:
    torch.manual_seed(seed)  # init_lora_weights=False: random, non-zero B, so that strengths change outputs
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False)


INPUTS = dict(
    sample=torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)),
    encoder_hidden_states=torch.randn((2, 5, EMBED_DIM), generator=torch.Generator().manual_seed(1)),
)


@torch.no_grad()
def run(model, t: int = 10) -> torch.Tensor:
    return model(timestep=torch.tensor(t), **INPUTS).sample


@pytest.fixture(scope="module")
def prepared():
    """Two experts with two LoRAs each ("style" equal on both experts, "detail" different per expert), the base
    outputs and untouched copies of the adapted experts (references for diffusers' own `set_adapters`)."""
    experts = [text_unet(0), text_unet(1)]
    base = [run(expert) for expert in experts]
    torch.manual_seed(0)
    add_expert_adapter(experts, lora(0), adapter_name="style")
    for k, expert in enumerate(experts):
        expert.add_adapter(lora(10 + k), adapter_name="detail")
    return experts, base, [copy.deepcopy(expert) for expert in experts]


def reference(references, k: int, names, weights) -> torch.Tensor:
    """Expert k's output under diffusers' own `set_adapters(names, weights)` on it alone."""
    expert = copy.deepcopy(references[k])
    expert.set_adapters(names, weights)
    return run(expert)


def test_strengths_per_expert_equal_diffusers_set_adapters_on_each_expert(prepared):
    experts, base, references = prepared
    mixture = ExpertMixtureUNet.from_experts(experts)
    # one LoRA at different strengths per expert
    mixture.set_expert_adapters("style", weights=[1.0, 0.4])
    one, two = run(experts[0]), run(experts[1])
    assert torch.equal(one, reference(references, 0, ["style"], [1.0]))
    assert torch.equal(two, reference(references, 1, ["style"], [0.4]))
    assert not torch.equal(two, reference(references, 1, ["style"], [1.0]))
    # the mixture routes each timestep to its expert, which runs at its own strength
    assert torch.equal(run(mixture, t=10), one) and torch.equal(run(mixture, t=900), run(experts[1], t=900))
    # strength 0 is the base model; None disables the adapters of that expert
    mixture.set_expert_adapters("style", weights=[0.0, 0.4])
    assert torch.equal(run(experts[0]), base[0]) and torch.equal(run(experts[1]), two)
    mixture.set_expert_adapters(["style", None])
    assert torch.equal(run(experts[1]), base[1]) and torch.equal(run(experts[0]), one)
    # several adapters, per-expert lists of strengths; a disabled expert is enabled again
    mixture.set_expert_adapters(["style", "detail"], weights=[[0.5, 1.5], [1.0, 0.2]])
    assert torch.equal(run(experts[0]), reference(references, 0, ["style", "detail"], [0.5, 1.5]))
    assert torch.equal(run(experts[1]), reference(references, 1, ["style", "detail"], [1.0, 0.2]))
    # different adapters per expert; one strength for all
    set_expert_adapters(experts, [["detail"], ["style", "detail"]], weights=0.7)
    assert torch.equal(run(experts[0]), reference(references, 0, ["detail"], [0.7]))
    assert torch.equal(run(experts[1]), reference(references, 1, ["style", "detail"], [0.7, 0.7]))
    # diffusers' block-wise strengths of UNet2DConditionModel pass through
    blocks = {"down": 0.5, "mid": 0.0, "up": 1.5}
    set_expert_adapters(experts, ["detail", None], weights=[blocks, None])
    assert torch.equal(run(experts[0]), reference(references, 0, ["detail"], [blocks]))
    set_expert_adapters(experts, "style")
    assert torch.equal(run(experts[1]), reference(references, 1, ["style"], [1.0]))


def test_add_expert_adapter_from_weights_and_to_chosen_experts(prepared):
    experts, _, _ = prepared
    state = get_peft_model_state_dict(experts[0], adapter_name="detail")
    fresh = [text_unet(0), text_unet(1), tiny_unet(0)]  # the UNet2DModel has no peft support
    add_expert_adapter(fresh, state, adapter_name="copied", expert_indices=[0, 1])
    assert expert_adapter_names(fresh) == [["copied"], ["copied"], []]
    set_expert_adapters(experts, ["detail", None])
    set_expert_adapters(fresh, ["copied", "copied", None], weights=[1.0, 0.0, None])
    assert torch.allclose(run(fresh[0]), run(experts[0]), atol=1e-6)  # expert 0's LoRA, loaded from its weights
    assert torch.equal(run(fresh[1]), run(text_unet(1)))
    add_expert_adapter(fresh, lora(3), adapter_name="new", expert_indices=[1])
    assert expert_adapter_names(fresh) == [["copied"], ["copied", "new"], []]


def test_errors_name_the_argument_and_the_valid_choices(prepared):
    experts, _, _ = prepared
    cases = [
        (dict(adapter_names="nope"), ValueError, r"`adapter_names`: expert 0 .* no adapter 'nope'; its adapters: \["),
        (dict(adapter_names=["style", "detail", None]), ValueError, "`adapter_names` .* must have 2 entries"),
        (dict(adapter_names=[["style"], 3]), TypeError, r"`adapter_names\[1\]` must be a name"),
        (dict(adapter_names=3), TypeError, "`adapter_names` must be a name"),
        (dict(adapter_names="style", weights=[1.0]), ValueError, r"`weights` must be one strength .* \(2\)"),
        (dict(adapter_names="style", weights=[[1.0, 2.0], 1.0]), ValueError, r"`weights\[0\]` has 2 strengths"),
        (dict(adapter_names="style", weights=["x", 1.0]), TypeError, r"`weights\[0\]` must be a float"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            set_expert_adapters(experts, **kwargs)
    with pytest.raises(ValueError, match=r"expert 1 \(UNet2DModel\) has no peft adapter support"):
        set_expert_adapters([experts[0], tiny_unet(0)], "style")
    set_expert_adapters([experts[0], tiny_unet(0)], ["style", None])  # None is fine for it
    with pytest.raises(ValueError, match="expert 0 already has an adapter 'style'"):
        add_expert_adapter(experts, lora(0), adapter_name="style")
    with pytest.raises(ValueError, match="`expert_indices`"):
        add_expert_adapter(experts, lora(0), adapter_name="x", expert_indices=[2])
    state = get_peft_model_state_dict(experts[0], adapter_name="style")
    with pytest.raises(ValueError, match="no LoRA weights of it matched expert 0.*prefix='transformer'"):
        add_expert_adapter([text_unet(0)], state, adapter_name="x", prefix="transformer")
