"""Per-expert LoRA adapters: one adapter at a different strength on each expert, or different adapters per expert.

Expert by expert, over diffusers' `PeftAdapterMixin` (`set_adapters`, `add_adapter`, `load_lora_adapter`), so that
each expert behaves exactly as diffusers' own call on that expert alone:

- [`set_expert_adapters`]: which adapters are active on each expert, and at what strength
  (`ExpertMixtureUNet.set_expert_adapters` calls it with the mixture's experts).
- [`add_expert_adapter`]: add one adapter (a new one from a peft config, or LoRA weights) to several experts.
- [`expert_adapter_names`]: the adapters each expert holds.

Example:
    ```py
    >>> from peft import LoraConfig
    >>> from diffusers_experts.models.expert_adapters import add_expert_adapter

    >>> add_expert_adapter(mixture.experts, "path/to/style-lora", adapter_name="style")  # the same LoRA on each
    >>> mixture.set_expert_adapters("style", weights=[1.0, 0.4])  # full strength on expert 0, 0.4 on expert 1
    >>> mixture.set_expert_adapters(["style", None])  # only on expert 0; expert 1 runs its base weights
    >>> mixture.set_expert_adapters([["style", "detail"], "detail"], weights=[[0.8, 0.5], 1.0])
    ```
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from torch import nn


__all__ = ["add_expert_adapter", "expert_adapter_names", "set_expert_adapters"]


def _supports_adapters(expert: nn.Module) -> bool:
    return callable(getattr(expert, "set_adapters", None)) and callable(getattr(expert, "add_adapter", None))


def expert_adapter_names(experts: Sequence[nn.Module]) -> list[list[str]]:
    """The names of the adapters each expert holds (`[]` for an expert without adapters or without peft support)."""
    names = []
    for expert in experts:
        loaded = _supports_adapters(expert) and getattr(expert, "_hf_peft_config_loaded", False)
        names.append(list(getattr(expert, "peft_config", {})) if loaded else [])
    return names


def _is_name_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _per_expert_names(adapter_names, num_experts: int) -> list[list[str] | None]:
    """`adapter_names` as one list of names (or `None`: adapters off) per expert."""
    choices = (
        "a name (on every expert), a list of names (all on every expert), or a list with one entry per expert (a "
        "name, a list of names, or None to disable the adapters of that expert)"
    )
    if isinstance(adapter_names, str):
        return [[adapter_names]] * num_experts
    if not isinstance(adapter_names, (list, tuple)) or not adapter_names:
        raise TypeError(f"`adapter_names` must be {choices}; got {adapter_names!r}.")
    if _is_name_list(adapter_names):  # diffusers' semantics: every named adapter on every expert
        return [list(adapter_names)] * num_experts
    if len(adapter_names) != num_experts:
        raise ValueError(
            f"`adapter_names` with one entry per expert must have {num_experts} entries (one per expert), got "
            f"{len(adapter_names)}: {adapter_names!r}."
        )
    names = []
    for k, entry in enumerate(adapter_names):
        if entry is None:
            names.append(None)
        elif isinstance(entry, str):
            names.append([entry])
        elif _is_name_list(entry) and entry:
            names.append(list(entry))
        else:
            raise TypeError(
                f"`adapter_names[{k}]` must be a name, a non-empty list of names or None, got {entry!r} ({choices})."
            )
    return names


def _is_weight(value) -> bool:
    """One strength: a number, None (1.0) or diffusers' block-wise dict for `UNet2DConditionModel`."""
    return (
        value is None
        or isinstance(value, Mapping)
        or (isinstance(value, (int, float)) and not isinstance(value, bool))
    )


def _per_expert_weights(weights, names: list[list[str] | None]) -> list[list | None]:
    """`weights` as one list of strengths per expert, matching that expert's names (`None` where adapters are off)."""
    num_experts = len(names)
    if _is_weight(weights):
        return [None if n is None else [weights] * len(n) for n in names]
    if not isinstance(weights, (list, tuple)) or len(weights) != num_experts:
        raise ValueError(
            f"`weights` must be one strength for all experts (a float), or a list with one entry per expert "
            f"({num_experts}): a float, or a list of floats matching that expert's adapter names; got {weights!r}."
        )
    resolved = []
    for k, (entry, expert_names) in enumerate(zip(weights, names)):
        if expert_names is None:
            if not (_is_weight(entry) or isinstance(entry, (list, tuple))):
                raise TypeError(f"`weights[{k}]` must be a float or a list of floats, got {entry!r}.")
            resolved.append(None)  # adapters off on this expert: its strength is not used
        elif _is_weight(entry):
            resolved.append([entry] * len(expert_names))
        elif isinstance(entry, (list, tuple)) and all(_is_weight(w) for w in entry):
            if len(entry) != len(expert_names):
                raise ValueError(
                    f"`weights[{k}]` has {len(entry)} strengths, but expert {k} gets {len(expert_names)} adapters "
                    f"{expert_names}: give one strength per adapter."
                )
            resolved.append(list(entry))
        else:
            raise TypeError(f"`weights[{k}]` must be a float or a list of floats, got {entry!r}.")
    return resolved


def set_expert_adapters(experts: Sequence[nn.Module], adapter_names, weights=None) -> None:
    r"""
    Activate LoRA adapters expert by expert, with per-expert strengths: on each expert exactly diffusers'
    `expert.set_adapters(names_k, weights_k)` (so an expert gives bit-identical outputs to that call on it alone), or
    `expert.disable_adapters()` where the entry is `None`. Everything is checked before any expert changes.

    Args:
        experts (sequence of `nn.Module`): The experts (e.g. `mixture.experts`); each that gets adapters must
            support peft adapters (diffusers' `PeftAdapterMixin`, e.g. `UNet2DConditionModel`, `IUNet2DModel`).
        adapter_names (`str` or `list`): Which adapters each expert runs:

            - a name: that adapter on every expert;
            - a list of names: all of them on every expert (diffusers' `set_adapters` semantics);
            - a list with one entry per expert: a name, a list of names, or `None` to disable the adapters of that
              expert (it runs its base weights), e.g. `["a", None]` or `[["a", "b"], "b"]`. A list of names only
              means all of them on every expert; for one different adapter per expert write `[["a"], ["b"]]`.
        weights (`float`, `dict` or `list`, *optional*): Strengths (`None` = 1.0, as in diffusers):

            - one value for every adapter of every expert;
            - a list with one entry per expert: a value for all of that expert's adapters, or a list with one value
              per adapter name of that expert. E.g. `set_expert_adapters("style", weights=[1.0, 0.4])` runs one
              LoRA at full strength on expert 0 and at 0.4 on expert 1.

            A value is a float, or diffusers' block-wise dict for `UNet2DConditionModel` experts.

    Raises:
        `ValueError` / `TypeError` naming the argument: malformed `adapter_names` / `weights`, an expert without peft
        support (named, with its class), an adapter an expert does not hold (with the adapters it holds).
    """
    experts = list(experts)
    names = _per_expert_names(adapter_names, len(experts))
    strengths = _per_expert_weights(weights, names)
    held = expert_adapter_names(experts)
    for k, (expert, expert_names) in enumerate(zip(experts, names)):
        if expert_names is None:
            continue
        if not _supports_adapters(expert):
            raise ValueError(
                f"`adapter_names`: expert {k} ({type(expert).__name__}) has no peft adapter support (diffusers' "
                f"PeftAdapterMixin); give it None in `adapter_names`."
            )
        missing = [name for name in expert_names if name not in held[k]]
        if missing:
            raise ValueError(
                f"`adapter_names`: expert {k} ({type(expert).__name__}) has no adapter {missing[0]!r}; its adapters: "
                f"{held[k]}." + ("" if held[k] else " Add one with `add_expert_adapter`.")
            )
    for k, (expert, expert_names, expert_weights) in enumerate(zip(experts, names, strengths)):
        if expert_names is None:
            if held[k]:
                expert.disable_adapters()
            continue
        expert.enable_adapters()  # undo an earlier `None` (diffusers' `set_adapters` keeps disabled layers disabled)
        expert.set_adapters(expert_names, expert_weights)


def add_expert_adapter(
    experts: Sequence[nn.Module],
    adapter,
    adapter_name: str = "default",
    expert_indices: Sequence[int] | None = None,
    **load_kwargs,
) -> None:
    r"""
    Add one adapter to several experts, each getting its own copy: a new adapter from a peft config
    (`expert.add_adapter`, e.g. to train a LoRA per expert), or LoRA weights (`expert.load_lora_adapter`: a state
    dict, a folder or a Hub repo). As in diffusers, the new adapter becomes the active one of each expert it is added
    to; choose strengths afterwards with [`set_expert_adapters`].

    Args:
        experts (sequence of `nn.Module`): The experts (e.g. `mixture.experts`).
        adapter (`peft.PeftConfig`, `dict`, `str` or `os.PathLike`): A peft config (e.g. `peft.LoraConfig`), or LoRA
            weights for diffusers' `load_lora_adapter`.
        adapter_name (`str`, defaults to `"default"`): The adapter's name on every expert.
        expert_indices (`list[int]`, *optional*): The experts to add it to; all by default.
        load_kwargs: Passed to `load_lora_adapter` (e.g. `weight_name`, `prefix`); `prefix` defaults to `None`
            (keys as `save_lora_adapter` writes them).
    """
    from peft import PeftConfig

    experts = list(experts)
    if expert_indices is None:
        expert_indices = range(len(experts))
    indices = list(expert_indices)
    for k in indices:
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(experts):
            raise ValueError(f"`expert_indices` must hold expert indices in [0, {len(experts) - 1}], got {indices!r}.")
    if len(set(indices)) != len(indices):
        raise ValueError(f"`expert_indices` must not repeat an expert, got {indices!r}.")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"`adapter_name` must be a non-empty string, got {adapter_name!r}.")
    is_config = isinstance(adapter, PeftConfig)
    if is_config and load_kwargs:
        raise TypeError(f"Options {sorted(load_kwargs)} are for loading LoRA weights, not for a peft config.")
    held = expert_adapter_names(experts)
    for k in indices:
        if not _supports_adapters(experts[k]):
            raise ValueError(
                f"`experts`: expert {k} ({type(experts[k]).__name__}) has no peft adapter support (diffusers' "
                f"PeftAdapterMixin); leave it out of `expert_indices`."
            )
        if adapter_name in held[k]:
            raise ValueError(
                f"`adapter_name`: expert {k} already has an adapter {adapter_name!r}; its adapters: {held[k]}."
            )
    load_kwargs.setdefault("prefix", None)
    for k in indices:
        expert = experts[k]
        if is_config:
            expert.add_adapter(copy.deepcopy(adapter), adapter_name=adapter_name)
            continue
        weights = dict(adapter) if isinstance(adapter, Mapping) else adapter  # diffusers may consume a dict
        expert.load_lora_adapter(weights, adapter_name=adapter_name, **load_kwargs)
        if adapter_name not in expert_adapter_names([expert])[0]:
            raise ValueError(
                f"`adapter`: no LoRA weights of it matched expert {k} ({type(expert).__name__}); check the keys and "
                f"`prefix` (got prefix={load_kwargs['prefix']!r})."
            )
