"""LoRAExpert: an expert denoiser that is a named LoRA adapter (peft) on a frozen, shareable base model."""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from peft import LoraConfig, inject_adapter_in_model
from peft.functional import get_peft_model_state_dict, set_adapter, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from ..constants import SHARED_CONFIG_KEYS
from ..loading import (
    expert_class_name,
    pop_hub_options,
    read_model_config,
    resolve_expert_class,
    resolve_model_folder,
)
from ..saving import atomic_directory


ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# Bases loaded by `from_pretrained`, shared by every LoRA expert that names the same base (one copy in memory).
_LOADED_BASES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def default_lora_targets(model: nn.Module) -> list[str]:
    """Every `nn.Linear` and ungrouped `nn.Conv2d` of `model` (the default LoRA targets), ignoring LoRA layers.

    Grouped (e.g. depth-wise) convolutions are left out: peft only adapts them when the rank divides the groups.
    """
    names = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or ".lora_" in f".{name}":
            continue
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            continue
        names.add(name.removesuffix(".base_layer"))
    return sorted(names)


def _adapter_names(model: nn.Module) -> set[str]:
    """Names of the LoRA adapters already injected into `model`."""
    names = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            names.update(module.lora_A.keys())
    return names


class LoRAExpert(ModelMixin, ConfigMixin):
    r"""
    An expert denoiser made of a frozen base model (any `UNet2DModel`-shaped diffusers model, e.g. `UNet2DModel` or
    [`IUNet2DModel`]) plus a LoRA adapter (peft) named `adapter_name`. Several LoRA experts can share one base module
    in memory: each injects its own named adapter into it and activates it before every call. It calls like a
    `UNet2DModel` and can be an expert of [`ExpertMixtureUNet`].

    **Save format** (a normal diffusers model folder, small): `save_pretrained(dir)` writes only

    - `config.json`: `_class_name: "LoRAExpert"`, the base model reference (`base_model_name_or_path`,
      `base_subfolder`, `base_revision`, `base_model_class`) and the LoRA settings (`rank`, `lora_alpha`,
      `lora_dropout`, `target_modules`, `adapter_name`), plus the base's `sample_size`, `in_channels`,
      `out_channels`, `num_class_embeds`;
    - `adapter_model.safetensors`: the adapter weights as returned by `peft.get_peft_model_state_dict` (keys without
      the adapter name, e.g. `conv_in.lora_A.weight`).

    The base weights are never written. `from_pretrained(dir)` loads the base from its reference (a local folder, a
    Hub repo id, or a path starting with `./` or `../` taken relative to `dir`), injects the adapter and loads its
    weights. Bases loaded this way are cached and shared by experts that name the same base.

    Args:
        base_model_name_or_path (`str`): Folder or Hub repo id of the base model.
        base_model_class (`str`): Class of the base, e.g. `"diffusers.UNet2DModel"` (resolved from the expert
            allow-list, [`resolve_expert_class`]).
        base_subfolder (`str`, *optional*): Subfolder of the base inside its folder / repo.
        base_revision (`str`, *optional*): Hub revision of the base.
        adapter_name (`str`, defaults to `"default"`): Name of this expert's adapter inside the (shared) base.
        rank (`int`, defaults to 4): LoRA rank `r`.
        lora_alpha (`float`, *optional*): LoRA scaling `alpha` (update scaled by `alpha / r`); defaults to `rank`.
        lora_dropout (`float`, defaults to 0.0): Dropout on the LoRA branch.
        target_modules (`list[str]`, *optional*): Module names of the base to adapt; defaults to every `nn.Linear`
            and `nn.Conv2d` of the base (the resolved list is stored in the config).
        sample_size, in_channels, out_channels, num_class_embeds: Copied from the base's config.
        base_model (`nn.Module`, *optional*): An already loaded base (not part of the config); loaded from the
            reference when omitted.

    Example:
        ```py
        >>> import torch
        >>> from diffusers import UNet2DModel
        >>> from diffusers_experts import ExpertMixtureUNet, LoRAExpert
        >>> base = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        ...     norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
        >>> base.save_pretrained("base")
        >>> experts = [LoRAExpert.from_base(base, "base", adapter_name=f"expert_{k}", rank=4) for k in range(2)]
        >>> mixture = ExpertMixtureUNet.from_experts(experts)  # both experts share `base` in memory
        >>> mixture(torch.randn(2, 1, 16, 16), torch.tensor([10, 900])).sample.shape
        torch.Size([2, 1, 16, 16])
        >>> experts[0].save_pretrained("expert_0")  # config.json + adapter_model.safetensors only
        ```
    """

    ignore_for_config = ["base_model"]

    @register_to_config
    def __init__(
        self,
        base_model_name_or_path: str,
        base_model_class: str,
        base_subfolder: str | None = None,
        base_revision: str | None = None,
        adapter_name: str = "default",
        rank: int = 4,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        target_modules: Sequence[str] | None = None,
        sample_size: int | Sequence[int] | None = None,
        in_channels: int | None = None,
        out_channels: int | None = None,
        num_class_embeds: int | None = None,
        base_model: nn.Module | None = None,
    ):
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"`rank` must be a positive integer, got {rank!r}.")
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"`adapter_name` must be a non-empty string without '.', got {adapter_name!r}.")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must lie in [0, 1), got {lora_dropout!r}.")
        if base_model is None:
            base_model = self._load_base(base_model_name_or_path, base_model_class, base_subfolder, base_revision)
        if expert_class_name(type(base_model)) != base_model_class:
            raise ValueError(
                f"`base_model_class` is {base_model_class!r} but the base model is a "
                f"{expert_class_name(type(base_model))!r}."
            )
        if adapter_name in _adapter_names(base_model):
            raise ValueError(
                f"The base model already holds an adapter named {adapter_name!r}; give each expert sharing a base its "
                f"own `adapter_name`."
            )
        # the shared fields come from the base; explicit values must agree with it
        for key in SHARED_CONFIG_KEYS:
            base_value = base_model.config.get(key)
            base_value = list(base_value) if isinstance(base_value, tuple) else base_value
            given = locals()[key]
            given = list(given) if isinstance(given, tuple) else given
            if given is not None and given != base_value:
                raise ValueError(f"`{key}`={given!r} does not match the base model's `{key}`={base_value!r}.")
            self.register_to_config(**{key: base_value})
        targets = list(target_modules) if target_modules is not None else default_lora_targets(base_model)
        if not targets:
            raise ValueError("`target_modules` is empty: the base model has no nn.Linear / nn.Conv2d to adapt.")
        self.register_to_config(target_modules=targets, lora_alpha=float(lora_alpha or rank))

        for name, parameter in base_model.named_parameters():
            if "lora_" not in name:  # freeze the base, not the adapters other experts already hold
                parameter.requires_grad_(False)
        lora_config = LoraConfig(
            r=rank, lora_alpha=float(lora_alpha or rank), lora_dropout=lora_dropout, target_modules=targets
        )
        with warnings.catch_warnings():
            # peft warns whenever a second adapter is injected into one model: sharing a base is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(lora_config, base_model, adapter_name=adapter_name)
        self.base_model = base_model
        self.sample_size = self.config.sample_size
        self._activate()
        for parameter in self.adapter_parameters():
            parameter.requires_grad_(True)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(
        cls,
        base_model: ModelMixin,
        base_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        rank: int = 4,
        base_subfolder: str | None = None,
        base_revision: str | None = None,
        **lora_kwargs,
    ) -> LoRAExpert:
        r"""
        A new (zero-initialised, so initially identical to the base) LoRA expert on an already loaded `base_model`.

        Args:
            base_model (`ModelMixin`): The base; experts built on the same object share it in memory.
            base_model_name_or_path (`str`): Where the base can be loaded from later (recorded in the config). A local
                folder is recorded as an absolute path.
            adapter_name, rank, base_subfolder, base_revision, lora_kwargs: See the class arguments.
        """
        reference = os.fspath(base_model_name_or_path)
        if os.path.isdir(reference):
            reference = os.path.abspath(reference)
        return cls(
            base_model_name_or_path=reference,
            base_model_class=expert_class_name(type(base_model)),
            base_subfolder=base_subfolder,
            base_revision=base_revision,
            adapter_name=adapter_name,
            rank=rank,
            base_model=base_model,
            **lora_kwargs,
        )

    @staticmethod
    def _load_base(
        name_or_path: str,
        class_name: str,
        subfolder: str | None,
        revision: str | None,
        relative_to: str | None = None,
        torch_dtype: torch.dtype | None = None,
        hub_options: dict | None = None,
        free_of_adapter: str | None = None,
    ) -> ModelMixin:
        """Load (or reuse from the cache) the base model named by a LoRA expert's config; a cached base that already
        holds an adapter named `free_of_adapter` (another mixture's) is not reused: a private copy is loaded."""
        if name_or_path.startswith(("./", "../")):
            if relative_to is None:
                raise ValueError(
                    f"`base_model_name_or_path`={name_or_path!r} is relative; it can only be resolved when loading "
                    f"from a folder."
                )
            name_or_path = os.path.normpath(os.path.join(relative_to, name_or_path))
        base_cls = resolve_expert_class(class_name)
        folder = resolve_model_folder(name_or_path, subfolder=subfolder, revision=revision, **(hub_options or {}))
        key = (os.path.realpath(folder), class_name, str(torch_dtype))
        cached = _LOADED_BASES.get(key)
        if cached is not None and free_of_adapter not in _adapter_names(cached):
            return cached
        options = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        base = base_cls.from_pretrained(folder, **options)
        if cached is None:
            _LOADED_BASES[key] = base
        return base

    # ------------------------------------------------------------------ adapter

    def _activate(self) -> None:
        """Make this expert's adapter the active one of the (possibly shared) base, keeping every `requires_grad`."""
        # peft's set_adapter also freezes the inactive adapters; trainability stays the user's choice here
        flags = [(p, p.requires_grad) for name, p in self.base_model.named_parameters() if "lora_" in name]
        set_adapter(self.base_model, self.config.adapter_name)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The parameters of this expert's adapter (the only trainable ones)."""
        marker = f".{self.config.adapter_name}."
        return [p for name, p in self.base_model.named_parameters() if "lora_" in name and marker in name + "."]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """This expert's adapter weights, keys as `peft.get_peft_model_state_dict` returns them."""
        state = get_peft_model_state_dict(self.base_model, adapter_name=self.config.adapter_name)
        return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load adapter weights saved by [`~LoRAExpert.adapter_state_dict`]; every adapter weight must be present."""
        expected = set(self.adapter_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"Adapter weights do not match the adapter of this expert: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}."
            )
        set_peft_model_state_dict(self.base_model, state, adapter_name=self.config.adapter_name)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        r"""Same as the base model's `forward`, with this expert's adapter active."""
        self._activate()
        return self.base_model(sample, timestep, class_labels=class_labels, return_dict=return_dict)

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        r"""
        Write `config.json` and `adapter_model.safetensors` (this expert's adapter only) into `save_directory`,
        atomically. The base model is not saved: it is loaded from `config.base_model_name_or_path`.
        """
        if not safe_serialization:
            raise ValueError("`safe_serialization=False` is not supported: adapters are saved as safetensors only.")
        if push_to_hub:
            raise ValueError(
                "`push_to_hub=True` is not supported here; push the folder with the Hub helpers of diffusers_experts."
            )
        if not is_main_process:
            return
        with atomic_directory(save_directory, stale=(ADAPTER_WEIGHTS_NAME,)) as tmp:
            self.save_config(tmp)
            save_file(self.adapter_state_dict(), os.path.join(tmp, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> LoRAExpert:
        r"""
        Load a LoRA expert saved by [`~LoRAExpert.save_pretrained`].

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): A local folder or a Hub repo id.
            subfolder (`str`, *optional*): Folder of the expert inside it.
            base_model (`ModelMixin`, *optional*): Use this base instead of loading the one named in the config
                (it must be of the recorded class).
            torch_dtype (`torch.dtype`, *optional*): Dtype of the loaded base and adapter.
            kwargs: Hub options (`revision`, `cache_dir`, `local_files_only`, `token`); other diffusers loading
                options are accepted and ignored.
        """
        subfolder = kwargs.pop("subfolder", None)
        base_model = kwargs.pop("base_model", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        hub_options = pop_hub_options(kwargs)
        folder = resolve_model_folder(pretrained_model_name_or_path, subfolder=subfolder, **hub_options)
        init_kwargs = read_model_config(cls, folder)
        weights_file = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
        if not os.path.isfile(weights_file):
            raise ValueError(f"No {ADAPTER_WEIGHTS_NAME} in {folder!r}: not a saved {cls.__name__}.")
        if base_model is None:
            base_model = cls._load_base(
                init_kwargs["base_model_name_or_path"],
                init_kwargs["base_model_class"],
                init_kwargs.get("base_subfolder"),
                init_kwargs.get("base_revision"),  # the base's own revision, not the one of this expert's repo
                relative_to=folder,
                torch_dtype=torch_dtype,
                hub_options={k: v for k, v in hub_options.items() if k != "revision"},
                free_of_adapter=init_kwargs.get("adapter_name", "default"),
            )
        expert = cls(**init_kwargs, base_model=base_model)
        state = load_file(weights_file)
        if torch_dtype is not None:
            state = {k: v.to(torch_dtype) for k, v in state.items()}
        expert.load_adapter_state_dict(state)
        expert.eval()
        return expert
