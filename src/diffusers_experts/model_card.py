"""Model cards for mixtures, pipelines and single experts, rendered from the templates in `model_card_templates/`.

The canonical templates live in `model_cards/` at the repository root; an identical copy ships inside the package
(`diffusers_experts/model_card_templates/`, package data) so that a pip-installed package renders the same cards.
A test keeps the two byte-identical.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib import resources

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from .constants import EXPERT_FOLDER
from .loading import repo_path
from .models import ExpertMixtureUNet
from .saving import atomic_file


PACKAGE_URL = "https://github.com/diffusers-experts/diffusers-experts"
MODEL_CARD_NAME = "README.md"
MIXTURE_TEMPLATE = "mixture_card.md"
EXPERT_TEMPLATE = "expert_card.md"
BASE_TAGS = ("diffusers", "mixture-of-experts", "diffusers-experts")
PIPELINE_TAG = "unconditional-image-generation"
# Architecture entries of an expert's config shown on its card (when present).
ARCHITECTURE_KEYS = (
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "high_ratios",
    "mid_high_ratio",
    "attention_head_dim",
    "base_model_class",
    "adapter_name",
    "rank",
    "lora_alpha",
    "target_modules",
)
METADATA_KEYS = {
    "repo_id": "Hub repo of the mixture / pipeline (links and usage snippets).",
    "model_name": "Title of the card.",
    "description": "A paragraph under the title.",
    "license": "Hub license id, e.g. 'apache-2.0'.",
    "datasets": "Hub dataset ids the model was trained on.",
    "dataset": "Free-text description of the training data.",
    "training_steps": "Total optimisation steps.",
    "metrics": "Mapping metric name -> value for the whole model (e.g. {'fid': 12.3}).",
    "hyperparameters": "Mapping name -> value of training settings shown on the card.",
    "tags": "Extra Hub tags.",
    "base_model": "Hub id(s) of the model(s) this one was fine-tuned from.",
    "experts": "Per expert: a mapping with any of "
    + ", ".join(repr(k) for k in ("repo_id", "description", "training_steps", "metrics", "macs", "base_model")),
}
EXPERT_METADATA_KEYS = ("repo_id", "description", "training_steps", "metrics", "macs", "base_model")


def _template(name: str) -> str:
    """Text of a packaged model card template."""
    return resources.files("diffusers_experts").joinpath("model_card_templates", name).read_text(encoding="utf-8")


def _library_name(class_names: Sequence[str]) -> str:
    """`"diffusers"` when diffusers alone loads every model on the card, else `"diffusers-experts"`."""
    return "diffusers" if all(name.startswith("diffusers.") for name in class_names) else "diffusers-experts"


def _check_metadata(metadata: Mapping | None, num_experts: int) -> dict:
    """Validated copy of the card metadata (unknown keys are errors, not silently dropped)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"`metadata` must be a dict or None, got {type(metadata).__name__}.")
    unknown = sorted(set(metadata) - set(METADATA_KEYS))
    if unknown:
        raise ValueError(f"Unknown `metadata` key(s) {unknown}; valid keys: {sorted(METADATA_KEYS)}.")
    for key in ("metrics", "hyperparameters"):
        if metadata.get(key) is not None and not isinstance(metadata[key], Mapping):
            raise TypeError(f"`metadata[{key!r}]` must be a dict name -> value, got {metadata[key]!r}.")
    experts = metadata.get("experts")
    if experts is not None:
        if not isinstance(experts, Sequence) or isinstance(experts, str) or len(experts) != num_experts:
            raise ValueError(
                f"`metadata['experts']` must be a list with one dict (or None) per expert ({num_experts}), got "
                f"{experts!r}."
            )
        for k, entry in enumerate(experts):
            if entry is None:
                continue
            if not isinstance(entry, Mapping):
                raise TypeError(f"`metadata['experts'][{k}]` must be a dict or None, got {entry!r}.")
            bad = sorted(set(entry) - set(EXPERT_METADATA_KEYS))
            if bad:
                raise ValueError(
                    f"Unknown key(s) {bad} in `metadata['experts'][{k}]`; valid keys: {list(EXPERT_METADATA_KEYS)}."
                )
            if entry.get("metrics") is not None and not isinstance(entry["metrics"], Mapping):
                raise TypeError(f"`metadata['experts'][{k}]['metrics']` must be a dict, got {entry['metrics']!r}.")
    return dict(metadata)


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _format_config_value(value) -> str:
    """A config value for the card; long lists (e.g. LoRA target modules) are summarised."""
    if isinstance(value, (list, tuple)):
        if len(value) > 8:
            return f"{len(value)} entries: {list(value[:3])} ..."
        return str(list(value))
    return str(value)


def _format_count(n: int) -> str:
    """`1,234,567 (1.23M)`."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n:,} ({n / scale:.3g}{unit})"
    return f"{n:,}"


def _format_metrics(metrics: Mapping | None) -> list[tuple[str, str]]:
    """(name, formatted value) pairs; entries whose value is None (not measured / not used) are left out."""
    return [(str(name), _format_value(value)) for name, value in (metrics or {}).items() if value is not None]


def _parameter_counts(model: nn.Module) -> tuple[int, int | None]:
    """(parameters of `model`, parameters of its own LoRA adapter or None).

    A LoRA expert counts its base (without the LoRA layers of experts sharing that base) plus its own adapter.
    """
    adapter_parameters = getattr(model, "adapter_parameters", None)
    if callable(adapter_parameters) and hasattr(model, "base_model"):
        adapter = sum(p.numel() for p in adapter_parameters())
        base = sum(p.numel() for name, p in model.base_model.named_parameters() if "lora_" not in name)
        return base + adapter, adapter
    return sum(p.numel() for p in model.parameters()), None


def _expert_class_names(mixture) -> list[str]:
    return list(mixture.config.expert_classes)


def _hub_link(repo_id: str, subfolder: str | None = None) -> str:
    url = f"https://huggingface.co/{repo_id}"
    if subfolder:
        return f"[{repo_id}/{subfolder}]({url}/tree/main/{subfolder})"
    return f"[{repo_id}]({url})"


def _expert_rows(mixture, metadata: dict, subfolder: str | None = None) -> list[dict]:
    """One row per expert for the mixture card."""
    sources = mixture.config.expert_sources or [None] * mixture.num_experts
    per_expert = metadata.get("experts") or [None] * mixture.num_experts
    rows = []
    for k, ((start, end), class_name) in enumerate(zip(mixture.expert_intervals, _expert_class_names(mixture))):
        folder = f"`{repo_path(subfolder, EXPERT_FOLDER.format(k))}/`"
        entry = per_expert[k] or {}
        source = sources[k]
        if source is not None:
            location = _hub_link(source["repo_id"], source.get("subfolder"))
            if source.get("revision"):
                location += f" @ `{source['revision']}`"
        elif entry.get("repo_id"):
            location = f"{folder} (also {_hub_link(entry['repo_id'])})"
        else:
            location = folder
        total, _ = _parameter_counts(mixture.experts[k])
        rows.append(
            dict(
                index=k,
                start=_format_value(start),
                end=_format_value(end),
                class_name=class_name,
                params=_format_count(total),
                location=location,
                training_steps=_format_value(entry["training_steps"]) if entry.get("training_steps") else "",
                metrics=", ".join(f"{n}: {v}" for n, v in _format_metrics(entry.get("metrics"))),
            )
        )
    return rows


def _routing_details(config) -> str:
    if config.routing == "linear":
        return f"blend width {_format_value(float(config.blend_width))} timesteps"
    if config.routing == "sigmoid":
        return f"sharpness {_format_value(float(config.sharpness))}"
    if config.routing == "learned":
        return f"{config.num_knots} knots, initialised from `{config.learned_init}`"
    return ""


def _boundaries_text(config) -> str:
    return "[" + ", ".join(_format_value(float(b)) for b in config.boundaries) + "]" if config.boundaries else "none"


def find_mixture(model) -> tuple[ExpertMixtureUNet, str | None, object | None]:
    """(mixture, its subfolder in a pipeline folder or None, pipeline or None) for a mixture or a pipeline."""
    if isinstance(model, ExpertMixtureUNet):
        return model, None, None
    components = getattr(model, "components", None)
    if isinstance(components, Mapping):
        for name, component in components.items():
            if isinstance(component, ExpertMixtureUNet):
                return component, name, model
    raise TypeError(
        f"`mixture` must be an ExpertMixtureUNet or a pipeline with an ExpertMixtureUNet component, got "
        f"{type(model).__name__}."
    )


def mixture_model_card(model, metadata: Mapping | None = None):
    r"""
    The [`huggingface_hub.ModelCard`] of a mixture (or of a pipeline whose denoiser is a mixture).

    Args:
        model (`ExpertMixtureUNet` or `MultiExpertPipeline`): What the card describes.
        metadata (`dict`, *optional*): Training facts and Hub ids, keys listed in `METADATA_KEYS`.
    """
    mixture, subfolder, pipeline = find_mixture(model)
    meta = _check_metadata(metadata, mixture.num_experts)
    config = mixture.config
    repo_id = meta.get("repo_id")
    classes = _expert_class_names(mixture)
    base_models = meta.get("base_model") or sorted(
        {s["repo_id"] for s in (config.expert_sources or []) if s is not None}
    )
    card_data = ModelCardData(
        library_name="diffusers-experts",
        tags=[*BASE_TAGS, *(meta.get("tags") or [])],
        pipeline_tag=pipeline_tag(mixture),
        license=meta.get("license"),
        datasets=meta.get("datasets"),
        base_model=base_models or None,
    )
    name = '"' + (repo_id or "path/to/model") + '"'
    # class-conditional experts reserve their last class index for the null class of classifier-free guidance
    num_classes = config.num_class_embeds - 1 if config.num_class_embeds else None
    if pipeline is not None:
        call = "batch_size=4"
        if num_classes:
            guidance = (meta.get("hyperparameters") or {}).get("guidance_scale")
            call += f", class_labels={[k % num_classes for k in range(4)]}"
            call += f", guidance_scale={guidance}" if guidance is not None else ""
        usage = (
            "from diffusers_experts import MultiExpertPipeline\n\n"
            f"pipeline = MultiExpertPipeline.from_pretrained({name})\n"
            f"images = pipeline({call}).images"
        )
    else:
        usage = (
            "from diffusers_experts import ExpertMixtureUNet\n\n"
            f"mixture = ExpertMixtureUNet.from_pretrained({name})\n"
            "# one expert alone, e.g. the highest-noise one:\n"
            f"# {classes[-1].rpartition('.')[2]}.from_pretrained("
            f'{name}, subfolder="{EXPERT_FOLDER.format(mixture.num_experts - 1)}")'
        )
    kind = "Multi-expert diffusion pipeline" if pipeline is not None else "Expert mixture"
    return ModelCard.from_template(
        card_data,
        template_str=_template(MIXTURE_TEMPLATE),
        model_name=meta.get("model_name") or (f"{kind}: {repo_id}" if repo_id else kind),
        description=meta.get("description") or "",
        is_pipeline=pipeline is not None,
        package_url=PACKAGE_URL,
        mixture_subfolder=subfolder,
        scheduler_class=type(getattr(pipeline, "scheduler", None)).__name__,
        num_experts=mixture.num_experts,
        sample_size=config.sample_size,
        in_channels=config.in_channels,
        num_classes=num_classes,
        experts=_expert_rows(mixture, meta, subfolder),
        routing=config.routing,
        routing_details=_routing_details(config),
        num_train_timesteps=config.num_train_timesteps,
        boundaries=_boundaries_text(config),
        usage=usage,
        dataset=meta.get("dataset"),
        training_steps=_format_value(meta["training_steps"]) if meta.get("training_steps") else None,
        hyperparameters=_format_metrics(meta.get("hyperparameters")),
        metrics=_format_metrics(meta.get("metrics")),
    )


def pipeline_tag(mixture) -> str:
    """The Hub's task of the mixture: text-to-video / text-to-image for text-conditional experts (those that take
    `encoder_hidden_states`; video when their patches are 3-D, as Wan's), unconditional image generation otherwise
    (class-conditional included: the Hub has no class-conditional task)."""
    if "encoder_hidden_states" not in mixture.call_parameters:
        return PIPELINE_TAG
    patch_size = mixture.experts[0].config.get("patch_size")
    return "text-to-video" if isinstance(patch_size, (list, tuple)) and len(patch_size) == 3 else "text-to-image"


def expert_model_card(
    mixture, k: int, metadata: Mapping | None = None, expert_repo_id: str | None = None, subfolder: str | None = None
):
    r"""
    The [`huggingface_hub.ModelCard`] of expert `k` of `mixture`.

    Args:
        mixture (`ExpertMixtureUNet`): The mixture the expert belongs to.
        k (`int`): Expert index (0 = lowest noise).
        metadata (`dict`, *optional*): The mixture's card metadata; `metadata["experts"][k]` holds this expert's facts.
        expert_repo_id (`str`, *optional*): Repo the expert is pushed to on its own (usage snippet).
        subfolder (`str`, *optional*): The expert's folder in the mixture repo, when it lives there (usage snippet).
    """
    mixture, _, _ = find_mixture(mixture)
    if not isinstance(k, int) or not 0 <= k < mixture.num_experts:
        raise ValueError(f"`k` must be an expert index in [0, {mixture.num_experts - 1}], got {k!r}.")
    meta = _check_metadata(metadata, mixture.num_experts)
    entry = (meta.get("experts") or [None] * mixture.num_experts)[k] or {}
    config = mixture.config
    expert = mixture.experts[k]
    class_name = _expert_class_names(mixture)[k]
    start, end = mixture.expert_intervals[k]
    expert_config = getattr(expert, "config", {}) or {}
    base_model = entry.get("base_model") or expert_config.get("base_model_name_or_path")
    repo_id = meta.get("repo_id")
    mixture_link = _hub_link(repo_id) if repo_id else "the mixture in the parent folder"
    total, adapter = _parameter_counts(expert)
    card_data = ModelCardData(
        library_name=_library_name([class_name]),
        tags=[*BASE_TAGS, *(meta.get("tags") or [])],
        pipeline_tag=pipeline_tag(mixture),
        license=meta.get("license"),
        datasets=meta.get("datasets"),
        base_model=base_model or None,
    )
    short_class = class_name.rpartition(".")[2]
    library = "diffusers" if class_name.startswith("diffusers.") else "diffusers_experts"
    target = expert_repo_id or entry.get("repo_id") or repo_id or "path/to/model"
    where = f', subfolder="{subfolder}"' if subfolder and not (expert_repo_id or entry.get("repo_id")) else ""
    call = f'{short_class}.from_pretrained("{target}"{where})'
    usage = f"from {library} import {short_class}\n\nexpert = {call}"
    architecture = [(key, expert_config[key]) for key in ARCHITECTURE_KEYS if expert_config.get(key) is not None]
    return ModelCard.from_template(
        card_data,
        template_str=_template(EXPERT_TEMPLATE),
        model_name=f"Expert {k}: timesteps [{_format_value(start)}, {_format_value(end)})",
        description=entry.get("description") or "",
        index=k,
        num_experts=mixture.num_experts,
        mixture_link=mixture_link,
        class_name=class_name,
        start=_format_value(start),
        end=_format_value(end),
        num_train_timesteps=config.num_train_timesteps,
        base_model=base_model,
        params=_format_count(total),
        adapter_params=_format_count(adapter) if adapter is not None else None,
        macs=_format_count(int(entry["macs"])) if entry.get("macs") else None,
        architecture=[(key, _format_config_value(v)) for key, v in architecture],
        routing=config.routing,
        boundaries=_boundaries_text(config),
        training_steps=_format_value(entry["training_steps"]) if entry.get("training_steps") else None,
        metrics=_format_metrics(entry.get("metrics")),
        usage=usage,
    )


def _save_card(card: ModelCard, path: str) -> str:
    """Write `card` to `path` atomically (temporary file + rename): never half-written."""
    with atomic_file(path) as tmp:
        card.save(tmp)
    return path


def save_model_cards(save_directory: str | os.PathLike, mixture, metadata: Mapping | None = None) -> list[str]:
    r"""
    Write the model cards of a saved mixture (or pipeline): `README.md` in `save_directory` and one `README.md` in
    each `expert_k/` folder stored there (experts referenced from other repos have their card in their own repo).

    Call it after `save_pretrained(save_directory)`. Cards are written atomically (temporary file + rename).

    Args:
        save_directory (`str` or `os.PathLike`): The folder `mixture.save_pretrained` (or the pipeline's) wrote.
        mixture (`ExpertMixtureUNet` or `MultiExpertPipeline`): The saved model; for a pipeline the expert cards go
            into its mixture component's folder (e.g. `unet/expert_0/README.md`).
        metadata (`dict`, *optional*): Training facts and Hub ids:
            `repo_id`, `model_name`, `description`, `license`, `datasets`, `dataset`, `training_steps`, `metrics`,
            `hyperparameters`, `tags`, `base_model`, and `experts`: one dict per expert with `repo_id`,
            `description`, `training_steps`, `metrics`, `macs`, `base_model`.

    Returns:
        `list[str]`: The card files written.

    Example:
        ```py
        >>> from diffusers_experts import save_model_cards
        >>> mixture.save_pretrained("my-mixture")
        >>> save_model_cards("my-mixture", mixture, {"training_steps": 20000, "metrics": {"fid": 11.2}})
        ```
    """
    root = os.fspath(save_directory)
    found, subfolder, _ = find_mixture(mixture)
    mixture_dir = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(mixture_dir):
        raise ValueError(
            f"`save_directory` {root!r} has no saved mixture folder {mixture_dir!r}: save the model first."
        )
    written = [_save_card(mixture_model_card(mixture, metadata), os.path.join(root, MODEL_CARD_NAME))]
    sources = found.config.expert_sources or [None] * found.num_experts
    for k in range(found.num_experts):
        if sources[k] is not None:
            continue
        folder = os.path.join(mixture_dir, EXPERT_FOLDER.format(k))
        if not os.path.isdir(folder):
            raise ValueError(f"Expert {k} has no folder {folder!r}: save the model before writing its cards.")
        card = expert_model_card(found, k, metadata, subfolder=repo_path(subfolder, EXPERT_FOLDER.format(k)))
        written.append(_save_card(card, os.path.join(folder, MODEL_CARD_NAME)))
    return written
