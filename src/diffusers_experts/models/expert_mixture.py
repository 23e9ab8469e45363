"""ExpertMixtureUNet: N denoisers, each owning part of the noise range, behind one UNet2DModel-shaped model."""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from collections.abc import Mapping, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from safetensors.torch import load_file, save_file
from torch import nn

from .. import routing as R
from ..constants import EXPERT_FOLDER
from ..hub_mixin import HubPushMixin
from ..loading import (
    check_expert_source,
    class_from_model_folder,
    expert_class_name,
    is_mixture_entry,
    load_referenced_expert,
    pop_hub_options,
    read_model_config,
    resolve_expert_class,
    resolve_mixture_folder,
    routing_weights_name,
)
from ..saving import atomic_directory
from .expert_adapters import set_expert_adapters
from .expert_calls import (
    ExpertsDisagreeError,
    MixtureConfig,
    bind_call,
    check_call_signatures,
    expert_config_keys,
    sample_of,
    take_rows,
)


def _active(weights: torch.Tensor) -> list[int]:
    """Experts with a non-zero weight in any row of `(batch, N)` weights."""
    return torch.nonzero(weights.detach().gt(0).any(dim=0)).flatten().tolist()


def _sole_owner(weights: torch.Tensor) -> int | None:
    """The expert with weight exactly 1 in every row, if there is one and no gradient flows through the weights."""
    used = _active(weights)
    if len(used) == 1 and not weights.requires_grad and bool((weights[:, used[0]] == 1).all()):
        return used[0]
    return None


def _mixture_entries(directory: str | os.PathLike) -> tuple[str, ...]:
    """Expert folders and routing files already in `directory`: replaced or removed by a new save (nothing else is)."""
    if not os.path.isdir(directory):
        return ()
    return tuple(name for name in os.listdir(directory) if is_mixture_entry(name))


def _listed(value):
    return list(value) if isinstance(value, tuple) else value


def _module_layout(module: nn.Module) -> tuple:
    """Class and parameter shapes of a module: equal layouts are interchangeable for a reader of its attributes."""
    return (type(module), tuple((name, tuple(p.shape)) for name, p in module.named_parameters()))


def _shared_submodule(name: str, values: list):
    """A submodule all experts have with one structure (`mid_block`, `add_embedding`, ...): expert 0's, which
    pipelines may read (e.g. SDXL's `unet.add_embedding.linear_1.in_features`); `None` if it is `None` in all."""
    if all(value is None for value in values):
        return None
    if all(isinstance(value, nn.Module) for value in values):
        layouts = [_module_layout(value) for value in values]
        if all(layout == layouts[0] for layout in layouts):
            return values[0]
        raise ExpertsDisagreeError(
            f"`{name}` differs between the experts (classes or parameter shapes), so the mixture has no single "
            f"`{name}`: {[type(value).__name__ for value in values]}."
        )
    raise AttributeError(
        f"'ExpertMixtureUNet' object has no attribute {name!r} (the mixture passes through only submodules that "
        f"all experts share; read `mixture.experts[k].{name}`)."
    )


# Methods pipelines (and users) call on a denoiser to configure its attention or FreeU (diffusers' `AttentionMixin`,
# `UNet2DConditionModel`): `pipe.enable_attention_slicing()`, `pipe.enable_freeu()`, `pipe.fuse_qkv_projections()`,
# `unet.set_attn_processor(...)`, `unet.set_default_attn_processor()`. A mixture has one when all its experts do;
# calling it applies it to every expert, with the same arguments.
_BROADCAST_METHODS = frozenset(
    {
        "set_attn_processor",
        "set_default_attn_processor",
        "set_attention_slice",
        "enable_freeu",
        "disable_freeu",
        "fuse_qkv_projections",
        "unfuse_qkv_projections",
    }
)


def _broadcast(name: str, methods: list):
    """One callable that calls `methods` (the same method of every expert) with the same arguments. Dicts are copied
    per expert: diffusers' `set_attn_processor(dict)` pops the processors it sets from the dict it is given."""

    def call_every_expert(*args, **kwargs):
        for method in methods:
            method(
                *(dict(a) if isinstance(a, dict) else a for a in args),
                **{key: dict(v) if isinstance(v, dict) else v for key, v in kwargs.items()},
            )

    call_every_expert.__name__ = call_every_expert.__qualname__ = name
    call_every_expert.__doc__ = f"`{name}` of every expert, with the same arguments."
    return call_every_expert


def _shared_processors(values: list[dict]) -> dict:
    """`attn_processors` of the mixture: expert 0's, when all experts have the same attention layers with processors
    of the same classes (the keys are the experts' own, e.g. `down_blocks.0.attentions.0...processor`)."""
    layouts = [{key: type(processor) for key, processor in value.items()} for value in values]
    if all(layout == layouts[0] for layout in layouts):
        return values[0]
    raise ExpertsDisagreeError(
        "`attn_processors` differs between the experts (attention layers or processor classes), so the mixture has no "
        "single `attn_processors`: read `mixture.experts[k].attn_processors`."
    )


def _union(lists) -> list | None:
    """The union of class attributes such as `_keep_in_fp32_modules` (lists of name patterns or None), in order."""
    merged = []
    for items in lists:
        items = [items] if isinstance(items, str) else items or ()  # diffusers accepts a bare string too
        merged.extend(item for item in items if item not in merged)
    return merged or None


class ExpertMixtureUNet(HubPushMixin, ModelMixin, ConfigMixin):
    r"""
    A mixture of N expert denoisers routed by timestep: expert `k` owns the training timesteps
    `[b_k, b_{k+1})` (`b_0 = 0`, `b_N = T`; expert 0 is the lowest-noise expert; a timestep on a boundary belongs to
    the upper expert) and the output is `sum_k w_k(t) * expert_k(x_t, t, ...)`. The experts can be any diffusers
    denoiser (`UNet2DModel`, [`IUNet2DModel`], `UNet2DConditionModel`, DiT/SD3/Wan transformers, ...) with one call
    signature; they may differ in size and architecture. The mixture calls like them (their `forward` arguments, every
    conditioning argument passed through, their output class), and its config holds every config key they share
    (`in_channels`, `sample_size`, `time_cond_proj_dim`, `patch_size`, ...), so it drops into diffusers pipelines
    (`StableDiffusionPipeline(unet=mixture)`, `WanPipeline(transformer=mixture)`, ...) and training loops.

    Routing is in the units of the `timestep` the experts are conditioned on: integer training timesteps for
    DDPM-family models, `sigma * 1000` for flow-matching transformers (SD3, Wan); `T = num_train_timesteps`.

    Build it with [`ExpertMixtureUNet.from_experts`] or [`ExpertMixtureUNet.from_pretrained`]. Routing (boundaries and
    blend schedule) lives only here, in the config (learned parameters in the state dict): trainers, pipelines and
    schedulers read it from the mixture.

    Routing modes (`t` in training-timestep units, `T = num_train_timesteps`), through boundary ramps `s_k(t)` with
    `w_k = s_k - s_{k+1}`, `s_0 = 1`, `s_N = 0` (weights are >= 0 and sum to 1 for every t):

    - `"hard"`: `w_k(t) = 1` on expert k's interval, 0 elsewhere. One expert runs per sample.
    - `"linear"`: `s_k(t) = clip((t - b_k) / blend_width + 1/2, 0, 1)`, `blend_width` defaults to `T / (N - 1)`.
      For two experts with default parameters (`b_1 = T/2`, width `T`) this is the ratio schedule
      `eps = r(t) * eps_1 + (1 - r(t)) * eps_0` with `r(t) = t / T`.
    - `"sigmoid"`: `s_k(t) = sigmoid(sharpness * (t - b_k) / T)`, `sharpness` defaults to 10. For two experts with
      default parameters: `r(t) = sigmoid(10 * (t / T - 1/2))`.
    - `"learned"`: per-expert logits at `num_knots` evenly spaced knots over `[0, T]` (the `routing_logits`
      parameter, shape `(num_knots, N)`), linearly interpolated in t and softmaxed over experts; initialised from the
      `learned_init` schedule and trained with the experts.

    `weight_threshold` > 0 zeroes blend weights below it (and renormalises), so far-away experts are not run.

    Args:
        expert_classes (`list[str]`): Class of each expert, e.g. `"diffusers_experts.IUNet2DModel"`.
        boundaries (`list[float]`): `N - 1` strictly ascending training timesteps in `(0, T)`.
        routing (`str`, defaults to `"hard"`): One of `"hard"`, `"linear"`, `"sigmoid"`, `"learned"`.
        num_train_timesteps (`int`, defaults to 1000): `T`.
        blend_width (`float`, *optional*): Width of the linear ramps, in timesteps.
        sharpness (`float`, defaults to 10.0): Steepness of the sigmoid ramps.
        num_knots (`int`, defaults to 11): Knots of the learned schedule.
        learned_init (`str`, defaults to `"linear"`): Schedule the learned one starts from (`hard|linear|sigmoid`).
        weight_threshold (`float`, defaults to 0.0): Blend weights below it are set to 0.
        sample_size, in_channels, out_channels, num_class_embeds: Shared by all experts (filled in by `from_experts`).
        expert_sources (`list`, *optional*):
            Per expert, `None` (stored in `expert_k/`) or a reference `{"repo_id", "revision", "subfolder"}` to pull.
        experts (`list[ModelMixin]`): The expert models (not part of the config).

    Example:
        ```py
        >>> import torch
        >>> from diffusers import UNet2DModel
        >>> from diffusers_experts import ExpertMixtureUNet, IUNet2DModel
        >>> small = dict(sample_size=16, block_out_channels=(16, 32), norm_num_groups=8)
        >>> experts = [
        ...     IUNet2DModel(**small, attention_head_dim=8),
        ...     UNet2DModel(**small, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
        ... ]
        >>> mixture = ExpertMixtureUNet.from_experts(experts, boundaries=[400], routing="linear")
        >>> mixture.expert_weights(torch.tensor([0, 400, 999]))
        tensor([[0.9000, 0.1000],
                [0.5000, 0.5000],
                [0.0000, 1.0000]])
        >>> mixture(torch.randn(3, 3, 16, 16), torch.tensor([0, 400, 999])).sample.shape
        torch.Size([3, 3, 16, 16])
        ```
    """

    ignore_for_config = ["experts", "expert_config"]
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        expert_classes: Sequence[str] = (),
        boundaries: Sequence[float] | None = None,
        routing: str = "hard",
        num_train_timesteps: int = 1000,
        blend_width: float | None = None,
        sharpness: float = 10.0,
        num_knots: int = 11,
        learned_init: str = "linear",
        weight_threshold: float = 0.0,
        sample_size: int | Sequence[int] | None = None,
        in_channels: int | None = None,
        out_channels: int | None = None,
        num_class_embeds: int | None = None,
        expert_sources: Sequence[dict | None] | None = None,
        experts: Sequence[nn.Module] | None = None,
        **expert_config,
    ):
        # `expert_config`: the experts' shared config keys of a saved mixture; they are re-read from the experts
        super().__init__()
        if experts is None:
            raise ValueError(
                "`experts` is required: build a mixture with `ExpertMixtureUNet.from_experts(...)` or load one with "
                "`ExpertMixtureUNet.from_pretrained(...)`."
            )
        num_experts = len(experts)
        if num_experts == 0:
            raise ValueError("`experts` must hold at least one expert model, got an empty list.")
        if len(expert_classes) != num_experts:
            raise ValueError(
                f"`expert_classes` must name one class per expert ({num_experts}), got {list(expert_classes)!r}."
            )
        R.check_routing_mode(routing)
        normalized = R.normalize_boundaries(boundaries, num_experts, num_train_timesteps, boundary_units="timestep")
        if blend_width is None and num_experts > 1:
            blend_width = num_train_timesteps / (num_experts - 1)
        if blend_width is not None and not blend_width > 0:
            raise ValueError(f"`blend_width` must be > 0 (in training timesteps), got {blend_width!r}.")
        if not sharpness > 0:
            raise ValueError(f"`sharpness` must be > 0, got {sharpness!r}.")
        if not 0.0 <= weight_threshold < 1.0:
            raise ValueError(f"`weight_threshold` must lie in [0, 1), got {weight_threshold!r}.")
        if expert_sources is not None and len(expert_sources) != num_experts:
            raise ValueError(
                f"`expert_sources` must hold one entry per expert ({num_experts}), got {list(expert_sources)!r}."
            )
        self.register_to_config(boundaries=normalized, blend_width=blend_width)
        self._register_expert_config(
            experts,
            {
                "sample_size": sample_size,
                "in_channels": in_channels,
                "out_channels": out_channels,
                "num_class_embeds": num_class_embeds,
            },
        )
        self._call_signature = check_call_signatures(experts)
        # experts whose classes come from a `num_class_embeds` table (UNets without another `class_embed_type`)
        self._has_class_table = (
            "class_labels" in self._call_signature.parameters
            and "num_class_embeds" in experts[0].config
            and experts[0].config.get("class_embed_type") is None
        )

        self.experts = nn.ModuleList(experts)
        # the modules the experts keep in float32 (diffusers reads this from the instance: `.to(dtype)` warns about them)
        self._keep_in_fp32_modules = _union(getattr(e, "_keep_in_fp32_modules", None) for e in experts)
        self._boundary_cache: dict[tuple, torch.Tensor] = {}
        if routing == "learned":
            if not (isinstance(num_knots, int) and num_knots >= 2):
                raise ValueError(f"`num_knots` must be an integer >= 2, got {num_knots!r}.")
            init = R.initial_learned_logits(
                num_knots,
                torch.tensor(normalized, dtype=torch.float64),
                learned_init,
                num_train_timesteps,
                blend_width or float(num_train_timesteps),
                sharpness,
            )
            self.routing_logits = nn.Parameter(init)
        else:
            self.routing_logits = None
        self.sample_size = self.config.sample_size

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_experts(
        cls,
        experts: Sequence[ModelMixin | str | os.PathLike],
        boundaries: Sequence[float] | None = None,
        routing: str = "hard",
        num_train_timesteps: int = 1000,
        boundary_units: str = "auto",
        scheduler=None,
        **routing_kwargs,
    ) -> ExpertMixtureUNet:
        r"""
        Assemble a mixture from expert models (or paths of saved diffusers model folders).

        Args:
            experts (`list`): `N` expert models, lowest-noise expert first; any `ModelMixin` denoiser with the
                `UNet2DModel` call signature. A string or path loads a saved model folder or a Hub repo id (the expert
                is then embedded in the mixture); a dict `{"repo_id", "revision", "subfolder"}` loads an expert from a
                Hub repo (or folder) and keeps it as a reference in `expert_sources`: saving or pushing the mixture
                stores the reference, not the weights.
            boundaries (`list[float]`, *optional*): `N - 1` boundaries, expert 0's upper boundary first (timesteps,
                fractions of `T`, sigmas or SNRs, see `boundary_units`); `None` gives equal intervals. They are
                converted once, here, to the units of the `timestep` the experts are conditioned on: integer training
                timesteps for DDPM-family UNets, `sigma * 1000` for flow-matching transformers (SD3, Wan).
            routing (`str`, defaults to `"hard"`): `"hard"`, `"linear"`, `"sigmoid"` or `"learned"`.
            num_train_timesteps (`int`, defaults to 1000): `T`, the training noise schedule's length.
            boundary_units (`str`, defaults to `"auto"`): `"timestep"`, `"fraction"`, `"sigma"`, `"snr"` or
                `"auto"` (fractions when all values are floats in (0, 1), timesteps otherwise).
            scheduler (`SchedulerMixin`, *optional*): The noise schedule that converts `"sigma"` / `"snr"`
                boundaries (DDPM family: through its `alphas_cumprod`; flow matching: `t = sigma * T`).
            routing_kwargs: `blend_width`, `sharpness`, `num_knots`, `learned_init`, `weight_threshold`.
        """
        if isinstance(experts, (nn.Module, str, os.PathLike)) or not isinstance(experts, Sequence):
            raise TypeError(f"`experts` must be a list of expert models or paths, got {type(experts).__name__}.")
        if len(experts) == 0:
            raise ValueError("`experts` must hold at least one expert model, got an empty list.")
        allowed = {"blend_width", "sharpness", "num_knots", "learned_init", "weight_threshold", "expert_sources"}
        unknown = sorted(set(routing_kwargs) - allowed)
        if unknown:
            raise TypeError(f"Unknown routing argument(s) {unknown}; valid: {sorted(allowed)}.")
        models, references = cls._load_experts(experts, routing_kwargs.get("expert_sources"))
        if any(ref is not None for ref in references):
            routing_kwargs["expert_sources"] = references
        boundaries = R.normalize_boundaries(boundaries, len(models), num_train_timesteps, boundary_units, scheduler)
        return cls(
            expert_classes=[expert_class_name(type(m)) for m in models],
            boundaries=boundaries,
            routing=routing,
            num_train_timesteps=num_train_timesteps,
            experts=models,
            **routing_kwargs,
        )

    @staticmethod
    def _load_experts(experts: Sequence, expert_sources: Sequence | None) -> tuple[list, list]:
        """(expert models, per-expert reference or None) for `from_experts`: loads paths, repo ids and references."""
        if expert_sources is not None and any(isinstance(e, Mapping) for e in experts):
            raise ValueError(
                "Pass expert references either as dict entries of `experts` or as `expert_sources`, not both."
            )
        models, references, fit_config = [], [], None
        for k, expert in enumerate(experts):
            reference = None
            if isinstance(expert, Mapping):
                reference = check_expert_source(expert, k)
                expert = load_referenced_expert(reference, k, mixture_config=fit_config)
            elif isinstance(expert, (str, os.PathLike)) and not os.path.isdir(os.fspath(expert)):
                expert = load_referenced_expert({"repo_id": os.fspath(expert)}, k, mixture_config=fit_config)
            elif isinstance(expert, (str, os.PathLike)):
                expert = class_from_model_folder(os.fspath(expert)).from_pretrained(os.fspath(expert))
            if not isinstance(expert, ModelMixin):
                raise TypeError(
                    f"`experts[{k}]` must be a diffusers ModelMixin denoiser (e.g. UNet2DModel, IUNet2DModel), a "
                    f"path or repo id of one, or a reference dict, got {type(expert).__name__}."
                )
            if fit_config is None:
                fit_config = {key: expert.config.get(key) for key in ("in_channels", "out_channels", "sample_size")}
            models.append(expert)
            references.append(reference)
        return models, references

    # ------------------------------------------------------------------ what the experts share

    def _register_expert_config(self, experts: Sequence[nn.Module], given: Mapping) -> None:
        """Put every config key all experts share into the mixture's config (pipelines read `in_channels`,
        `time_cond_proj_dim`, `patch_size`, ... from it); remember the keys they disagree on, for a clear error."""
        reserved = set(inspect.signature(type(self).__init__).parameters)
        shared, disagreements, required = expert_config_keys(experts, reserved=reserved - set(given))
        for key, values in required.items():
            raise ValueError(
                f"All experts must share `{key}`, got {values!r} for experts 0..{len(experts) - 1}. A mixture "
                f"denoises one kind of sample: use experts with equal `{key}`."
            )
        for key, value in given.items():
            if value is not None and _listed(value) != _listed(shared.get(key)):
                raise ValueError(f"`{key}`={value!r} does not match the experts' `{key}` ({shared.get(key)!r}).")
        self.register_to_config(**{**dict.fromkeys(given), **shared})
        self._expert_disagreements = disagreements

    @property
    def config(self) -> MixtureConfig:
        """The mixture's config: its routing keys, plus every config key its experts share (`in_channels`,
        `sample_size`, `time_cond_proj_dim`, `patch_size`, ...). Reading a key the experts disagree on raises an
        error naming each expert's value."""
        internal = self._internal_dict
        cached = self.__dict__.get("_config_view")
        if cached is None or cached[0] is not internal:
            view = MixtureConfig(internal, disagreements=self.__dict__.get("_expert_disagreements"))
            self.__dict__["_config_view"] = cached = (internal, view)
        return cached[1]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError as error:
            experts = self.__dict__.get("_modules", {}).get("experts")
            if name.startswith("_") or experts is None:
                raise
            values = [getattr(expert, name, AttributeError) for expert in experts]
            if all(value is AttributeError for value in values):
                raise error  # nn.Module's own message: "'ExpertMixtureUNet' object has no attribute ..."
            if name in _BROADCAST_METHODS and all(callable(value) for value in values):
                return _broadcast(name, values)
            if name == "attn_processors" and all(isinstance(value, dict) for value in values):
                return _shared_processors(values)
            return _shared_submodule(name, values)

    def enable_layerwise_casting(
        self,
        storage_dtype: torch.dtype = torch.float8_e4m3fn,
        compute_dtype: torch.dtype | None = None,
        skip_modules_pattern: tuple[str, ...] | None = None,
        skip_modules_classes: tuple[type[nn.Module], ...] | None = None,
        non_blocking: bool = False,
    ) -> None:
        """diffusers' layerwise casting, applied by every expert to itself: each keeps the modules its own class keeps
        in the compute dtype (`_skip_layerwise_casting_patterns`, `_keep_in_fp32_modules`, anchored default patterns
        such as `^proj_out$`, which would not match the mixture's `experts.k.proj_out`)."""
        for expert in self.experts:
            expert.enable_layerwise_casting(
                storage_dtype=storage_dtype,
                compute_dtype=compute_dtype,
                skip_modules_pattern=skip_modules_pattern,
                skip_modules_classes=skip_modules_classes,
                non_blocking=non_blocking,
            )

    def _load_ip_adapter_weights(self, state_dicts, **kwargs) -> None:
        """diffusers' IP-Adapter loading (`pipeline.load_ip_adapter(...)` calls it on the denoiser): the same adapter
        is loaded into every expert, and the mixture's config follows the experts' `encoder_hid_dim_type`."""
        lacking = [k for k, expert in enumerate(self.experts) if not hasattr(expert, "_load_ip_adapter_weights")]
        if lacking:
            raise AttributeError(
                f"Experts {lacking} ({type(self.experts[lacking[0]]).__name__}) cannot load IP-Adapter weights."
            )
        for expert in self.experts:
            expert._load_ip_adapter_weights(state_dicts, **kwargs)
        if "encoder_hid_dim_type" in self.config:  # UNets: diffusers sets `unet.config.encoder_hid_dim_type`
            self.register_to_config(encoder_hid_dim_type=self.experts[0].config.encoder_hid_dim_type)

    def _load_ip_adapter_loras(self, state_dicts) -> dict:
        """The LoRA weights of FaceID IP-Adapters (`pipeline.load_ip_adapter(...)` asks the UNet for them; `{}` for
        other IP-Adapters), named after expert 0's attention layers, which all experts share. Loading them needs PEFT
        on the denoiser: a mixture takes LoRAs per expert instead (`set_expert_adapters`)."""
        return self.experts[0]._load_ip_adapter_loras(state_dicts)

    @property
    def call_parameters(self) -> tuple[str, ...]:
        """Names of the experts' (and so the mixture's) `forward` arguments; the first is the noisy input
        (`"sample"` for UNets, `"hidden_states"` for transformers)."""
        return tuple(self._call_signature.parameters)

    def set_expert_adapters(self, adapter_names, weights=None) -> None:
        r"""
        Activate LoRA adapters per expert with per-expert strengths (diffusers' `set_adapters`, expert by expert).
        See [`~diffusers_experts.models.expert_adapters.set_expert_adapters`].
        """
        set_expert_adapters(self.experts, adapter_names, weights)

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """diffusers' `CacheMixin.cache_context` for every expert that has one (Wan/SD3-style pipelines call it
        around each denoiser call)."""
        with contextlib.ExitStack() as stack:
            for expert in self.experts:
                if hasattr(type(expert), "cache_context"):
                    stack.enter_context(expert.cache_context(name, **kwargs))
            yield

    # ------------------------------------------------------------------ routing

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def dtype(self) -> torch.dtype:
        """The experts' dtype (the float32 routing logits do not count): what pipelines draw noise in."""
        return self.experts[0].dtype

    def _apply(self, fn, recurse: bool = True):
        # `.to(dtype)`, `.half()`, `.bfloat16()` cast the experts; the learned routing logits stay float32 (a softmax
        # of small logit differences) and only change device
        logits = None if self.routing_logits is None else self.routing_logits.data
        super()._apply(fn, recurse)
        if logits is not None and self.routing_logits.dtype != logits.dtype:
            self.routing_logits.data = logits.to(self.routing_logits.device)
        return self

    @property
    def expert_intervals(self) -> list[tuple[float, float]]:
        """`[(b_k, b_{k+1})]` per expert, in training timesteps (expert 0 = lowest noise)."""
        edges = [0.0, *self.config.boundaries, float(self.config.num_train_timesteps)]
        return list(zip(edges[:-1], edges[1:]))

    @property
    def owned_timesteps(self) -> list[range]:
        """The integer training timesteps each expert owns under hard routing (expert 0 first), e.g.
        `[range(0, 250), range(250, 500), ...]`; a timestep within 1e-4 below a boundary counts as on it."""
        return R.owned_timesteps(self.config.boundaries, self.config.num_train_timesteps)

    def _boundaries_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._boundary_cache:
            self._boundary_cache[key] = torch.tensor(self.config.boundaries, device=device, dtype=dtype)
        return self._boundary_cache[key]

    def _routing_timesteps(self, timestep, batch_size: int | None) -> torch.Tensor:
        """Timesteps as a float64 `(1,)` or `(B,)` tensor, on the timestep's device (CPU for Python numbers).

        Routing runs in float64 so that tensor timesteps and the Python-number fast path of `forward` take the same
        decisions ([`~diffusers_experts.routing.expert_index`] decides both, with its boundary tolerance).
        """
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        if t.device.type == "mps":  # routing runs in float64, which MPS lacks
            t = t.cpu()
        t = t.double()
        if t.ndim > 1:
            raise ValueError(f"`timestep` must be a scalar or a 1-D tensor, got shape {tuple(t.shape)}.")
        t = t.reshape(-1)
        if batch_size is not None and t.numel() not in (1, batch_size):
            raise ValueError(
                f"`timestep` must be a scalar or hold one value per sample ({batch_size}), got {t.numel()} values."
            )
        return t

    def expert_weights(self, timesteps, batch_size: int | None = None) -> torch.Tensor:
        r"""
        Routing weights `(batch, N)` at training `timesteps` (scalar or `(batch,)`; floats allowed, as Euler-type
        schedulers produce). Each row is >= 0 and sums to 1. Computed on the timesteps' device, or on the device of
        the learned parameters for `routing="learned"` (differentiable w.r.t. them).
        """
        t = self._routing_timesteps(timesteps, batch_size)
        cfg = self.config
        if cfg.routing == "learned":
            logits = self.routing_logits
            weights = R.learned_weights(t.to(logits.device, logits.dtype), logits, cfg.num_train_timesteps)
        else:
            weights = R.schedule_weights(
                t,
                self._boundaries_on(t.device, t.dtype),
                cfg.routing,
                cfg.num_train_timesteps,
                cfg.blend_width or float(cfg.num_train_timesteps),
                cfg.sharpness,
            ).float()
        if cfg.weight_threshold > 0 and cfg.routing != "hard":
            weights = torch.where(weights < cfg.weight_threshold, torch.zeros_like(weights), weights)
            weights = weights / weights.sum(dim=1, keepdim=True)
        if batch_size is not None and weights.shape[0] != batch_size:
            weights = weights.expand(batch_size, -1)
        return weights

    def active_experts(self, timesteps) -> list[int]:
        """Experts with non-zero weight for any of `timesteps` (the ones a call at these timesteps runs)."""
        return _active(self.expert_weights(timesteps))

    def steps_per_expert(self, scheduler, num_inference_steps: int, **set_timesteps_kwargs) -> list[int]:
        r"""
        How many denoiser calls each expert gets when `scheduler` samples in `num_inference_steps` steps: the split
        preview of a two-expert model, for any number of experts, under the scheduler's own configuration (timestep
        spacing, Karras sigmas, flow shift, second-order solvers' extra calls). Counts the calls in which an expert
        has non-zero weight (with blends, a call can count for two experts).

        Args:
            scheduler (`SchedulerMixin`): The sampling scheduler (not changed: a copy sets its timesteps).
            num_inference_steps (`int`): Sampling steps.
            set_timesteps_kwargs: Passed to the copy's `set_timesteps` (e.g. `mu=` for dynamically shifted flow
                matching, `sigmas=`).

        Example:
            ```py
            >>> from diffusers import DPMSolverMultistepScheduler
            >>> mixture.steps_per_expert(DPMSolverMultistepScheduler(use_karras_sigmas=True), 25)  # doctest: +SKIP
            [14, 6, 3, 2]
            ```
        """
        if (
            not isinstance(num_inference_steps, int)
            or isinstance(num_inference_steps, bool)
            or num_inference_steps < 1
        ):
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        preview = copy.deepcopy(scheduler)
        if "mixture" in inspect.signature(preview.set_timesteps).parameters:  # a BlendedScheduler aligns to us
            set_timesteps_kwargs.setdefault("mixture", self)
        preview.set_timesteps(num_inference_steps, device="cpu", **set_timesteps_kwargs)
        counts = [0] * self.num_experts
        for timestep in preview.timesteps:
            for k in self.active_experts(timestep):
                counts[k] += 1
        return counts

    def sample_training_timesteps(
        self,
        batch_size: int,
        expert: int,
        strategy: str = "soft",
        expertization_probs: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        r"""
        Integer training timesteps for training expert `expert` (MEME's soft expert strategy): with probability
        `p_k` from its own interval, otherwise uniform on `[0, T)`; `"hard"` = own interval only, `"uniform"` =
        anywhere. `expertization_probs` defaults to [`~diffusers_experts.routing.default_expertization_probs`]
        (`[0.8, 0.4, 0.2, 0.1]` for 4 experts).
        """
        probs = R.default_expertization_probs(self.num_experts)
        if expertization_probs is not None:
            probs = R.check_expertization_probs(expertization_probs, self.num_experts)
        if not isinstance(expert, int) or not 0 <= expert < self.num_experts:
            raise ValueError(f"`expert` must be an integer in [0, {self.num_experts - 1}], got {expert!r}.")
        return R.sample_training_timesteps(
            batch_size,
            expert,
            self.config.boundaries,
            self.config.num_train_timesteps,
            strategy,
            probs[expert],
            generator,
            device,
        )

    # ------------------------------------------------------------------ forward

    def _hard_owner(self, timestep) -> int | None:
        """Expert owning a single CPU/Python timestep under hard routing (no tensor work), else None."""
        if self.config.routing != "hard":
            return None
        if torch.is_tensor(timestep):
            if timestep.numel() != 1 or timestep.device.type != "cpu" or timestep.ndim > 1:
                return None
            timestep = timestep.item()
        elif not isinstance(timestep, (int, float)):
            return None
        return R.expert_index(float(timestep), self.config.boundaries)

    def _check_weights(self, weights: torch.Tensor, batch_size: int) -> torch.Tensor:
        if not torch.is_tensor(weights) or tuple(weights.shape) != (batch_size, self.num_experts):
            shape = tuple(weights.shape) if torch.is_tensor(weights) else type(weights).__name__
            raise ValueError(
                f"`expert_weights` must be a tensor of shape (batch, num_experts) = ({batch_size}, "
                f"{self.num_experts}), got {shape}."
            )
        sums = weights.detach().float().sum(dim=1)
        if bool((weights.detach() < 0).any()) or not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            raise ValueError(
                f"`expert_weights` must be >= 0 and sum to 1 over experts for every sample, got row sums "
                f"{sums.tolist()} and minimum {weights.min().item()}."
            )
        return weights

    def _check_class_labels(self, arguments: Mapping) -> None:
        """Class labels of experts with a class table (`num_class_embeds`): required by conditional ones, refused
        by unconditional ones (`UNet2DModel` would ignore them silently)."""
        if not self._has_class_table:
            return
        class_labels = arguments.get("class_labels")
        if class_labels is not None and self.config.num_class_embeds is None:
            raise ValueError(
                "`class_labels` were given, but the experts are unconditional (num_class_embeds=None): pass "
                "class_labels=None or use class-conditional experts."
            )
        if class_labels is None and self.config.num_class_embeds is not None:
            raise ValueError(
                f"`class_labels` must be given: the experts are class-conditional "
                f"(num_class_embeds={self.config.num_class_embeds})."
            )

    def forward(self, *args, expert_weights: torch.Tensor | None = None, **kwargs):
        r"""
        Denoise with the experts that own each sample's noise level: `sum_k w_k(t) * expert_k(sample, t, ...)`.

        Takes exactly the experts' own arguments (e.g. `UNet2DModel`: `sample, timestep, class_labels, return_dict`;
        `UNet2DConditionModel`: `..., encoder_hidden_states, timestep_cond, cross_attention_kwargs,
        added_cond_kwargs, ...`; DiT/SD3/Wan transformers: `hidden_states, timestep, encoder_hidden_states,
        pooled_projections, attention_kwargs, ...`) and returns the experts' own output class (a tuple with
        `return_dict=False`). Every conditioning argument is passed through.

        Args:
            timestep (`torch.Tensor` or `float` or `int`): The timestep the experts are conditioned on, a scalar or
                one per sample (a training batch may mix noise levels); routing is in its units. A `(batch, tokens)`
                timestep (Wan's per-token timesteps) is routed by each sample's largest value.
            expert_weights (`torch.Tensor`, *optional*):
                Override the routing with explicit `(batch, N)` weights (>= 0, rows summing to 1).

        Each expert runs only on the samples where its weight is > 0, with the batch-shaped conditioning tensors
        (nested ones too, e.g. `added_cond_kwargs`) cut to those samples; a batch routed entirely to one expert with
        weight 1 calls that expert with the arguments as given (bit-identical to the expert alone), so hard routing
        costs one expert call.
        """
        arguments = bind_call(self._call_signature, args, kwargs)
        sample_name = self.call_parameters[0]
        sample, timestep = arguments.get(sample_name), arguments.get("timestep")
        if not torch.is_tensor(sample):
            raise TypeError(f"`{sample_name}` must be a tensor (the noisy input), got {type(sample).__name__}.")
        if timestep is None:
            raise ValueError("`timestep` is required: the mixture routes every call by the timestep it is given.")
        batch_size = sample.shape[0]
        self._check_class_labels(arguments)

        # 1. route: a hard-routed shared timestep needs no tensor work; otherwise (batch, N) weights
        weights = None
        owner = self._hard_owner(timestep) if expert_weights is None else None
        if owner is None:
            if expert_weights is None:
                routed = timestep.amax(dim=1) if torch.is_tensor(timestep) and timestep.ndim == 2 else timestep
                weights = self.expert_weights(routed, batch_size)
            else:
                weights = self._check_weights(expert_weights, batch_size)
            owner = _sole_owner(weights)

        # 2. one expert with weight 1 for the whole batch: call it as is (bit-identical to the expert alone)
        if owner is not None:
            return self.experts[owner](*args, **kwargs)

        # 3. otherwise each active expert on its own samples, weighted sum
        return_dict = arguments.get("return_dict", True)  # bound arguments omit defaults (diffusers': True)
        active = weights.detach().gt(0).to(sample.device)
        weights = weights.to(sample.device)
        output = output_class = None
        for k in _active(weights):
            rows = torch.nonzero(active[:, k]).flatten()
            if rows.numel() == batch_size:
                arguments_k, w_k = arguments, weights[:, k]
            else:
                arguments_k = {name: take_rows(value, rows, batch_size) for name, value in arguments.items()}
                w_k = weights[rows, k]
            result = self.experts[k](**arguments_k)
            out_k = sample_of(result)
            if output is None:
                output_class = type(result) if hasattr(result, "sample") else None
                output = torch.zeros((batch_size, *out_k.shape[1:]), dtype=out_k.dtype, device=out_k.device)
            weighted = w_k.to(out_k.dtype).view(-1, *([1] * (out_k.ndim - 1))) * out_k
            output = output + weighted if rows.numel() == batch_size else output.index_add(0, rows, weighted)
        if return_dict is False:
            return (output,)
        return (output_class or UNet2DOutput)(sample=output)

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        save_function=None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        r"""
        Save the mixture config (`config.json`), learned routing parameters (`routing.safetensors`, learned routing
        only) and each expert as a normal diffusers model folder `expert_k/`, written by the expert's own
        `save_pretrained` (loadable alone with its class's `from_pretrained(dir, subfolder="expert_k")`). The folder is
        written atomically: a temporary folder is filled and then swapped in, so an interrupted save leaves the
        previous content intact.

        Args:
            save_directory (`str` or `os.PathLike`): Target folder (created if needed).
            is_main_process (`bool`, defaults to `True`): Only the main process writes (distributed training).
            save_function (`Callable`, *optional*): Passed to each expert's `save_pretrained` (diffusers' argument).
            safe_serialization (`bool`, defaults to `True`): Save the experts' weights as safetensors; `False` writes
                them as diffusers writes that model (`diffusion_pytorch_model.bin`). The routing logits are always
                safetensors.
            variant (`str`, *optional*): Weights variant, e.g. `"fp16"` (`diffusion_pytorch_model.fp16.safetensors`,
                `routing.fp16.safetensors`); load it back with `from_pretrained(..., variant="fp16")`.
            max_shard_size (`int` or `str`, defaults to `"10GB"`): Largest weights file of an expert before it is
                sharded (e.g. `"5MB"`).
            push_to_hub (`bool`, defaults to `False`): Also push to the Hub (`repo_id=...` in `kwargs`).
            kwargs: Hub options when pushing (`repo_id`, `commit_message`, `private`, `token`, `create_pr`).
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` {os.fspath(save_directory)!r} is a file, not a folder.")
        hub_options = ("repo_id", "commit_message", "private", "token", "create_pr")
        unknown = sorted(set(kwargs) - set(hub_options))
        if unknown:
            raise TypeError(
                f"Unknown argument(s) {unknown} for save_pretrained; valid extra ones: {list(hub_options)}."
            )
        expert_kwargs = {
            "safe_serialization": safe_serialization,
            "variant": variant,
            "max_shard_size": max_shard_size,
        }
        if save_function is not None:
            expert_kwargs["save_function"] = save_function
        if is_main_process:
            with atomic_directory(save_directory, stale=_mixture_entries(save_directory)) as tmp:
                self.save_config(tmp)
                for k, expert in enumerate(self.experts):
                    if not self._expert_is_referenced(k):
                        expert.save_pretrained(os.path.join(tmp, EXPERT_FOLDER.format(k)), **expert_kwargs)
                extra = self._mixture_state_dict()
                if extra:
                    save_file(extra, os.path.join(tmp, routing_weights_name(variant)))
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.fspath(save_directory).rstrip("/").split("/")[-1])
            self.push_to_hub(repo_id, safe_serialization=safe_serialization, variant=variant, **kwargs)

    def _expert_is_referenced(self, k: int) -> bool:
        sources = self.config.expert_sources
        return sources is not None and sources[k] is not None

    def _mixture_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters that belong to the mixture itself (not to an expert): the learned routing logits."""
        return {
            name: tensor.detach().cpu().contiguous()
            for name, tensor in self.state_dict().items()
            if not name.startswith("experts.")
        }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> ExpertMixtureUNet:
        r"""
        Load a mixture saved by [`~ExpertMixtureUNet.save_pretrained`]: the config, each `expert_k/` with its own
        class (resolved from an allow-list, see [`resolve_expert_class`]) and the learned routing parameters.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): A local folder or a Hub repo id.
            subfolder (`str`, *optional*): Folder of the mixture inside the repo / folder (e.g. `"unet"`).
            torch_dtype (`torch.dtype`, *optional*): Load every expert in this dtype.
            kwargs: Hub options (`revision`, `cache_dir`, `local_files_only`, `token`) and options passed to each
                expert's `from_pretrained`.
        """
        subfolder = kwargs.pop("subfolder", None)
        hub_options = pop_hub_options(kwargs)
        root = resolve_mixture_folder(pretrained_model_name_or_path, subfolder=subfolder, **hub_options)
        config = read_model_config(cls, root)
        sources = config.get("expert_sources") or [None] * len(config["expert_classes"])
        experts = []
        for k, class_name in enumerate(config["expert_classes"]):
            expert_cls = resolve_expert_class(class_name)
            if sources[k] is not None:
                experts.append(load_referenced_expert(sources[k], k, expert_cls, config, hub_options, kwargs))
                continue
            folder = os.path.join(root, EXPERT_FOLDER.format(k))
            if not os.path.isdir(folder):
                raise ValueError(
                    f"Expert {k} ({class_name}) is missing: no folder {EXPERT_FOLDER.format(k)!r} in {root!r}."
                )
            experts.append(expert_cls.from_pretrained(folder, **kwargs))
        mixture = cls(**config, experts=experts)
        routing_name = routing_weights_name(kwargs.get("variant"))
        if mixture.routing_logits is not None:
            routing_file = os.path.join(root, routing_name)
            if not os.path.isfile(routing_file):
                raise ValueError(f"Learned routing parameters are missing: no {routing_name} in {root!r}.")
            mixture.load_state_dict(load_file(routing_file), strict=False)
            mixture.routing_logits.data = mixture.routing_logits.data.float()
        mixture.eval()
        return mixture
