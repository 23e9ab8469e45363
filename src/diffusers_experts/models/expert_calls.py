"""What a mixture needs to stand in for its experts: their shared config, their call signature, batch splitting.

A mixture of any diffusers denoisers (`UNet2DModel`, `UNet2DConditionModel`, DiT/SD3/Wan transformers, ...) must look
like one of them to a pipeline: the config keys pipelines read (`in_channels`, `time_cond_proj_dim`, `patch_size`, ...),
the same `forward` keywords, and conditioning tensors split with the samples when experts run on subsets of a batch.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence

import torch
from diffusers.configuration_utils import FrozenDict
from torch import nn

from ..constants import SHARED_CONFIG_KEYS


_MISSING = "<missing>"


def _comparable(value) -> str:
    """A canonical text of a config value (lists and tuples alike), to compare values across experts."""
    return json.dumps(value, sort_keys=True, default=repr)


def expert_config_keys(
    experts: Sequence[nn.Module], reserved: Sequence[str] = ()
) -> tuple[dict, dict[str, list], dict[str, list]]:
    """(shared, disagreements, required_mismatches) over the experts' public config keys.

    `shared`: keys every expert has with one value (lists kept as lists). `disagreements`: the other keys, with each
    expert's value (`"<missing>"` where an expert lacks the key). `reserved` keys (the mixture's own, e.g.
    `num_train_timesteps`) are skipped. `required_mismatches`: the `SHARED_CONFIG_KEYS` (what kind of sample a
    mixture denoises: `in_channels`, `out_channels`, `sample_size`, `num_class_embeds`) among the disagreements.
    """
    configs = []
    for k, expert in enumerate(experts):
        config = getattr(expert, "config", None)
        if not isinstance(config, Mapping):
            raise TypeError(f"`experts[{k}]` ({type(expert).__name__}) has no diffusers `config`.")
        configs.append({key: value for key, value in config.items() if not key.startswith("_")})
    keys = []
    for config in configs:
        keys.extend(key for key in config if key not in keys and key not in reserved)
    shared, disagreements = {}, {}
    for key in keys:
        values = [config.get(key, _MISSING) for config in configs]
        if _MISSING not in values and len({_comparable(v) for v in values}) == 1:
            shared[key] = values[0]
        else:
            disagreements[key] = values
    required = {key: values for key, values in disagreements.items() if key in SHARED_CONFIG_KEYS}
    return shared, disagreements, required


class MixtureConfig(FrozenDict):
    """A mixture's config: its own keys, the keys all experts share, and a clear error for a key they disagree on."""

    def __init__(self, *args, disagreements: Mapping[str, list] | None = None, **kwargs):
        object.__setattr__(self, "_disagreements", dict(disagreements or {}))
        super().__init__(*args, **kwargs)

    def _refuse(self, name: str) -> None:
        disagreements = self.__dict__.get("_disagreements", {})
        if name in disagreements:
            values = ", ".join(f"expert {k}: {v!r}" for k, v in enumerate(disagreements[name]))
            raise ExpertsDisagreeError(
                f"`config.{name}` is not defined for this mixture: its experts disagree ({values}). A pipeline that "
                f"needs `{name}` needs experts that share it."
            )

    def __getattr__(self, name: str):
        self._refuse(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getitem__(self, key):
        if key not in self:
            self._refuse(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        # `config.get(key)` must not read a disagreement as "unset"
        if key not in self:
            self._refuse(key)
        return super().get(key, default)

    def __reduce__(self):
        return (_rebuild_mixture_config, (dict(self), self.__dict__.get("_disagreements", {})))


def _rebuild_mixture_config(items: dict, disagreements: dict) -> MixtureConfig:
    return MixtureConfig(items, disagreements=disagreements)


class ExpertsDisagreeError(ValueError):
    """A config key or attribute was read from a mixture whose experts hold different values for it."""


# ---------------------------------------------------------------------------------------------------- call signature


def forward_parameters(expert: nn.Module) -> tuple[str, ...]:
    """Names of an expert's `forward` parameters, in order (`**kwargs` as `"**name"`)."""
    names = []
    for name, parameter in inspect.signature(expert.forward).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            names.append(f"**{name}")
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            names.append(f"*{name}")
        else:
            names.append(name)
    return tuple(names)


def check_call_signatures(experts: Sequence[nn.Module]) -> inspect.Signature:
    """The experts' common `forward` signature; a `TypeError` naming the experts whose parameters differ."""
    reference = forward_parameters(experts[0])
    for k, expert in enumerate(experts[1:], start=1):
        names = forward_parameters(expert)
        if names != reference:
            raise TypeError(
                f"All experts must share one call signature: expert 0 ({type(experts[0]).__name__}) takes "
                f"{list(reference)}, expert {k} ({type(expert).__name__}) takes {list(names)}."
            )
    if "timestep" not in reference:
        raise TypeError(
            f"Experts must take a `timestep` argument (the mixture routes by it); {type(experts[0]).__name__}.forward "
            f"takes {list(reference)}."
        )
    return inspect.signature(experts[0].forward)


def bind_call(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call as one `{name: value}` dict in the experts' own names (`**kwargs` flattened)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"The mixture's experts take {list(signature.parameters)}: {error}") from None
    arguments = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL and name in arguments:
            raise TypeError(f"The mixture cannot route extra positional arguments `*{name}`: pass them by keyword.")
    return arguments


def take_rows(value, rows: torch.Tensor, batch_size: int):
    """`value` restricted to the samples `rows`: batch-shaped tensors (first dim == batch size) are indexed, nested
    dicts, lists and tuples recursively; everything else (scalars, shared tensors, options) is passed as is."""
    if torch.is_tensor(value):
        if value.ndim > 0 and value.shape[0] == batch_size:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, Mapping):
        return type(value)({key: take_rows(item, rows, batch_size) for key, item in value.items()})
    if isinstance(value, (list, tuple)) and any(torch.is_tensor(item) or isinstance(item, Mapping) for item in value):
        return type(value)(take_rows(item, rows, batch_size) for item in value)
    return value


def sample_of(output) -> torch.Tensor:
    """The denoised tensor of an expert's output (an output class with `.sample`, a tuple or a tensor)."""
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    return output
