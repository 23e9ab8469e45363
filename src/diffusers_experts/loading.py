"""Finding and loading saved models: the expert-class allow-list, local folders and Hub repos, partial downloads.

This module sits below `models/` (the models load through it) and imports none of the package's models, pipelines,
model cards or push code (DESIGN contract 10).

- [`register_expert_class`] / [`resolve_expert_class`]: the allow-list of classes a saved config may name (never an
  import of an arbitrary module read from a file); [`class_from_model_folder`] reads a folder's `_class_name`.
- [`resolve_model_folder`]: a local folder, or a Hub repo id fetched with `snapshot_download`.
- [`resolve_mixture_folder`] / [`resolve_pipeline_folder`] / [`load_expert`]: pull only the files a mixture, a
  pipeline or one expert needs (`allow_patterns`).
- [`check_expert_source`] / [`load_referenced_expert`]: experts referenced from other repos (`expert_sources`).

Every function takes the Hub options `revision`, `cache_dir`, `local_files_only` and `token` ([`HUB_OPTIONS`]).
Hub failures (repo or revision not found, a missing expert folder, a referenced expert that does not fit the mixture)
raise `ValueError` naming the repo, the revision and the expert; the original Hub error is chained.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .constants import (
    CONFIG_NAME,
    EXPERT_FOLDER,
    MODEL_INDEX_NAME,
    ROUTING_WEIGHTS_NAME,
    SHARED_CONFIG_KEYS,
    TRUSTED_LIBRARIES,
)


__all__ = [
    "HUB_OPTIONS",
    "check_expert_source",
    "class_from_model_folder",
    "expert_class_name",
    "is_mixture_entry",
    "is_repo_id",
    "load_expert",
    "load_referenced_expert",
    "pop_hub_options",
    "read_model_config",
    "register_expert_class",
    "repo_path",
    "resolve_expert_class",
    "resolve_mixture_folder",
    "resolve_model_folder",
    "resolve_pipeline_folder",
    "routing_weights_name",
]

# Download options every loader takes, as `huggingface_hub.snapshot_download` names them.
HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "token")
# Keys of an `expert_sources[k]` reference to an expert stored in another repo.
SOURCE_KEYS = ("repo_id", "revision", "subfolder")
# Files a diffusers model folder needs: configs (model, adapter) and safetensors weights (incl. shards, variants).
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors")
_EXPERT_FOLDER_NAME = re.compile(EXPERT_FOLDER.format(r"\d+"))
_ROUTING_STEM, _ROUTING_EXTENSION = os.path.splitext(ROUTING_WEIGHTS_NAME)
_REGISTERED_EXPERT_CLASSES: dict[str, type] = {}


class _ModelConfig(ConfigMixin):
    """`_ModelConfig.load_config(folder_or_file)` reads a model's `config.json` (diffusers' ModelMixin has no
    `load_config`: it is not a ConfigMixin)."""

    config_name = CONFIG_NAME


# ---------------------------------------------------------------------------------------------------- allow-list


def expert_class_name(cls: type) -> str:
    """`"<top-level package>.<class name>"`, the name stored in a mixture config (e.g. `"diffusers.UNet2DModel"`)."""
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def register_expert_class(cls: type) -> type:
    """Allow a custom `ModelMixin` denoiser class as a mixture expert when loading; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise TypeError(f"`cls` must be a subclass of diffusers' ModelMixin, got {cls!r}.")
    _REGISTERED_EXPERT_CLASSES[expert_class_name(cls)] = cls
    return cls


def resolve_expert_class(name: str) -> type:
    """The expert class named `name`, from an allow-list: never imports an arbitrary module named in a file.

    Allowed: `ModelMixin` classes exported at the top level of `diffusers` or `diffusers_experts`, and classes
    registered with [`register_expert_class`].
    """
    if name in _REGISTERED_EXPERT_CLASSES:
        return _REGISTERED_EXPERT_CLASSES[name]
    library, _, class_name = str(name).rpartition(".")
    if library in TRUSTED_LIBRARIES:
        candidate = getattr(importlib.import_module(library), class_name, None)
        if isinstance(candidate, type) and issubclass(candidate, ModelMixin):
            return candidate
    raise ValueError(
        f"Unknown expert class {name!r}. Valid choices: a ModelMixin class exported by {list(TRUSTED_LIBRARIES)} "
        f"(e.g. 'diffusers.UNet2DModel', 'diffusers_experts.IUNet2DModel') or one registered with "
        f"`register_expert_class` ({sorted(_REGISTERED_EXPERT_CLASSES)})."
    )


def class_from_model_folder(path: str) -> type:
    """Class of the model saved in a diffusers model folder, from its config's `_class_name` (allow-listed)."""
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise ValueError(f"Expert path {path!r} has no {CONFIG_NAME}: not a saved diffusers model folder.")
    class_name = _ModelConfig.load_config(path).get("_class_name")
    for library in ("diffusers_experts", "diffusers"):
        try:
            return resolve_expert_class(f"{library}.{class_name}")
        except ValueError:
            continue
    return resolve_expert_class(str(class_name))


def read_model_config(cls: type, folder: str) -> dict:
    """The `__init__` arguments of the `cls` saved in `folder` (its `config.json`, read with `cls.load_config`)."""
    config_file = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise ValueError(f"No {CONFIG_NAME} in {folder!r}: not a saved {cls.__name__}.")
    config = cls.load_config(folder)
    if config.get("_class_name") != cls.__name__:
        raise ValueError(
            f"{config_file!r} describes a {config.get('_class_name')!r} (`_class_name`), not a {cls.__name__!r}: load "
            f"it with its own class."
        )
    return {key: value for key, value in config.items() if not key.startswith("_")}


# ---------------------------------------------------------------------------------------------------- names


def pop_hub_options(kwargs: dict) -> dict:
    """Remove the Hub options ([`HUB_OPTIONS`]) from a `from_pretrained`'s `kwargs` and return them."""
    return {key: kwargs.pop(key) for key in HUB_OPTIONS if key in kwargs}


def _check_hub_options(options: Mapping) -> dict:
    unknown = sorted(set(options) - set(HUB_OPTIONS))
    if unknown:
        raise TypeError(f"Unknown Hub option(s) {unknown}; valid: {list(HUB_OPTIONS)}.")
    return dict(options)


def repo_path(*parts: str | None) -> str:
    """Posix path inside a repo or model folder from `parts`, skipping empty ones (`repo_path(None, "x")` is `"x"`)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def is_repo_id(name: str) -> bool:
    """Whether `name` can only be a Hub repo id (`"org/name"` or `"name"`): not an existing or path-like location."""
    return not (os.path.exists(name) or os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1)


def routing_weights_name(variant: str | None = None) -> str:
    """`routing.safetensors`, or `routing.<variant>.safetensors` for a weights variant (diffusers' naming)."""
    return ROUTING_WEIGHTS_NAME if variant is None else f"{_ROUTING_STEM}.{variant}{_ROUTING_EXTENSION}"


def is_expert_folder(name: str) -> bool:
    """Whether `name` is an expert folder name of a mixture (`expert_0`, `expert_1`, ...)."""
    return bool(_EXPERT_FOLDER_NAME.fullmatch(name))


def is_mixture_entry(name: str) -> bool:
    """Whether a top-level entry of a mixture folder is the mixture's own: an `expert_k/` folder or routing weights
    (any variant). A new save or push replaces these and keeps every other entry."""
    is_routing = name.startswith(f"{_ROUTING_STEM}.") and name.endswith(_ROUTING_EXTENSION)
    return is_routing or is_expert_folder(name)


# ---------------------------------------------------------------------------------------------------- resolving


def _is_local_path(path: str) -> bool:
    """True for an existing folder; raises for something that is neither a folder nor a repo id."""
    if os.path.isdir(path):
        return True
    if not is_repo_id(path):
        raise ValueError(f"{path!r} is neither a model folder nor a Hub repo id of the form 'org/name'.")
    return False


def _where(repo_id: str, revision: str | None) -> str:
    return f"Hub repo {repo_id!r} (revision {revision or 'main'!r})"


@contextmanager
def _hub_errors(repo_id: str, hub_options: Mapping, what: str) -> Iterator[None]:
    """Turn huggingface_hub's not-found errors into `ValueError`s naming `what`, the repo and the revision."""
    revision = hub_options.get("revision")
    # a bare name may have been meant as a local folder: say that there is none
    local = "" if "/" in repo_id else f" There is no local folder {repo_id!r} either (relative to {os.getcwd()!r})."
    try:
        yield
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"{what}: Hub repo {repo_id!r} was not found (check the repo id, or the `token` for a private repo).{local}"
        ) from error
    except RevisionNotFoundError as error:
        raise ValueError(f"{what}: revision {revision!r} does not exist in Hub repo {repo_id!r}.") from error
    except RemoteEntryNotFoundError as error:
        raise ValueError(f"{what}: a required file is missing in {_where(repo_id, revision)}: {error}") from error
    except LocalEntryNotFoundError as error:
        offline = hub_options.get("local_files_only", False)
        reason = "`local_files_only=True` and it is" if offline else "the Hub is unreachable and it is"
        raise ValueError(
            f"{what}: {_where(repo_id, revision)} is needed, but {reason} not in the cache.{local}"
        ) from error


def _snapshot(repo_id: str, allow_patterns: list[str] | None, hub_options: Mapping, what: str) -> str:
    """`snapshot_download` of the files of `repo_id` matching `allow_patterns`; Hub errors name `what`."""
    with _hub_errors(repo_id, hub_options, what):
        return snapshot_download(repo_id, allow_patterns=allow_patterns, **hub_options)


def resolve_model_folder(name_or_path: str | os.PathLike, subfolder: str | None = None, **hub_options) -> str:
    r"""
    Local folder holding `name_or_path`: a folder as is, or a Hub repo id fetched with `snapshot_download` (only the
    files under `subfolder` when it is given).

    Args:
        name_or_path (`str` or `os.PathLike`): A folder or a Hub repo id `"org/name"`.
        subfolder (`str`, *optional*): A folder inside it.
        hub_options: `revision`, `cache_dir`, `local_files_only`, `token`, as in `huggingface_hub.snapshot_download`.
    """
    hub_options = _check_hub_options(hub_options)
    path = os.fspath(name_or_path)
    if _is_local_path(path):
        folder = os.path.join(path, subfolder) if subfolder else path
        if not os.path.isdir(folder):
            raise ValueError(f"No folder {subfolder!r} in {path!r}.")
        return folder
    root = _snapshot(path, [repo_path(subfolder, "*")] if subfolder else None, hub_options, f"Loading {path!r}")
    folder = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(folder):
        raise ValueError(
            f"Repo {path!r} (revision {hub_options.get('revision') or 'main'!r}) has no folder {subfolder!r}."
        )
    return folder


def _mixture_config(path: str, subfolder: str | None, hub_options: Mapping, what: str) -> dict:
    """The mixture's `config.json`, from a folder or a Hub repo (only this file is downloaded)."""
    filename = repo_path(subfolder, CONFIG_NAME)
    if _is_local_path(path):
        config_file = os.path.join(path, *filename.split("/"))
        if not os.path.isfile(config_file):
            raise ValueError(f"{what}: no {CONFIG_NAME} in {os.path.dirname(config_file)!r}: not a saved mixture.")
        return _ModelConfig.load_config(config_file)
    with _hub_errors(path, hub_options, what):
        try:
            config_file = hf_hub_download(path, filename, **hub_options)
        except RemoteEntryNotFoundError as error:
            raise ValueError(
                f"{what}: {_where(path, hub_options.get('revision'))} has no {filename!r}: not a saved "
                f"ExpertMixtureUNet" + (f" (is {subfolder!r} the right subfolder?)" if subfolder else "") + "."
            ) from error
    return _ModelConfig.load_config(config_file)


def _mixture_patterns(config: Mapping, subfolder: str | None) -> list[str]:
    """`allow_patterns` of what loading a mixture needs: its config, routing weights and embedded experts."""
    routing_variants = f"{_ROUTING_STEM}.*{_ROUTING_EXTENSION}"
    patterns = [repo_path(subfolder, name) for name in (CONFIG_NAME, ROUTING_WEIGHTS_NAME, routing_variants)]
    sources = config.get("expert_sources") or [None] * len(config.get("expert_classes", []))
    for k, source in enumerate(sources):
        if source is None:
            patterns += [repo_path(subfolder, EXPERT_FOLDER.format(k), p) for p in MODEL_FILE_PATTERNS]
    return patterns


def resolve_mixture_folder(name_or_path: str | os.PathLike, subfolder: str | None = None, **hub_options) -> str:
    r"""
    Local folder of a saved `ExpertMixtureUNet`: a folder as is, or, for a Hub repo id, a snapshot holding only what
    loading needs: `config.json`, the routing weights and the `expert_k/` folders of embedded experts (configs and
    safetensors weights; no model cards, images or experts referenced from other repos).

    Args:
        name_or_path (`str` or `os.PathLike`): A folder or a Hub repo id `"org/name"`.
        subfolder (`str`, *optional*): The mixture's folder inside the repo (e.g. `"unet"` of a pipeline repo).
        hub_options: `revision`, `cache_dir`, `local_files_only`, `token`, as in `huggingface_hub.snapshot_download`.
    """
    hub_options = _check_hub_options(hub_options)
    path = os.fspath(name_or_path)
    if _is_local_path(path):
        return resolve_model_folder(path, subfolder=subfolder)
    what = f"Loading mixture {path!r}"
    patterns = _mixture_patterns(_mixture_config(path, subfolder, hub_options, what), subfolder)
    root = _snapshot(path, patterns, hub_options, what)
    return os.path.join(root, subfolder) if subfolder else root


def resolve_pipeline_folder(name_or_path: str | os.PathLike, **hub_options) -> str:
    r"""
    Local folder of a saved `MultiExpertPipeline`: a folder as is, or, for a Hub repo id, a snapshot holding
    `model_index.json`, each component's folder and, for the `ExpertMixtureUNet` component, only its config, routing
    weights and embedded experts (no model cards, sample images or experts referenced from other repos).

    Args:
        name_or_path (`str` or `os.PathLike`): A folder or a Hub repo id `"org/name"`.
        hub_options: `revision`, `cache_dir`, `local_files_only`, `token`, as in `huggingface_hub.snapshot_download`.
    """
    hub_options = _check_hub_options(hub_options)
    path = os.fspath(name_or_path)
    if _is_local_path(path):
        return path
    what = f"Loading pipeline {path!r}"
    with _hub_errors(path, hub_options, what):
        model_index = DiffusionPipeline.load_config(hf_hub_download(path, MODEL_INDEX_NAME, **hub_options))
    patterns = [MODEL_INDEX_NAME]
    for name, value in model_index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or None in value:
            continue
        library, class_name = value  # diffusers writes the module path, e.g. "diffusers_experts.models.expert_mixture"
        if library.split(".")[0] == "diffusers_experts" and class_name == "ExpertMixtureUNet":
            patterns += _mixture_patterns(_mixture_config(path, name, hub_options, what), name)
        else:
            patterns.append(f"{name}/*")
    return _snapshot(path, patterns, hub_options, what)


# ---------------------------------------------------------------------------------------------------- experts


def check_expert_source(source, k: int) -> dict:
    """A validated `expert_sources[k]` entry: a dict with a `repo_id` and optional `revision`, `subfolder`."""
    if not isinstance(source, Mapping) or not isinstance(source.get("repo_id"), str):
        raise ValueError(
            f"`expert_sources[{k}]` must be None or a dict with a 'repo_id' (and optional 'revision', 'subfolder'), "
            f"got {source!r}."
        )
    unknown = sorted(set(source) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"`expert_sources[{k}]` has unknown key(s) {unknown}; valid keys: {list(SOURCE_KEYS)}.")
    return {key: source.get(key) for key in SOURCE_KEYS}


def _expert_folder(repo_or_path: str, subfolder: str | None, hub_options: Mapping, what: str) -> str:
    """Local folder of one expert: configs and safetensors of `subfolder` only (a folder is used as is)."""
    path = os.fspath(repo_or_path)
    if _is_local_path(path):
        folder = os.path.join(path, subfolder) if subfolder else path
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise ValueError(f"{what}: no expert folder {subfolder or '.'!r} with a {CONFIG_NAME} in {path!r}.")
        return folder
    root = _snapshot(path, [repo_path(subfolder, p) for p in MODEL_FILE_PATTERNS], hub_options, what)
    folder = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise ValueError(
            f"{what}: {_where(path, hub_options.get('revision'))} has no expert folder {subfolder or '.'!r} (no "
            f"{repo_path(subfolder, CONFIG_NAME)!r}); folders there: {_repo_folders(path, hub_options)}."
        )
    return folder


def _repo_folders(repo_id: str, hub_options: Mapping) -> list[str] | str:
    """Top-level folders of a Hub repo (for error messages), or `"unknown"` when they cannot be listed."""
    if hub_options.get("local_files_only"):
        return "unknown (local_files_only=True)"
    try:
        tree = HfApi(token=hub_options.get("token")).list_repo_tree(repo_id, revision=hub_options.get("revision"))
        return sorted(entry.path for entry in tree if not hasattr(entry, "size"))
    except Exception:  # only used to enrich an error message
        return "unknown"


def _check_fits_mixture(expert, mixture_config: Mapping, what: str) -> None:
    """A referenced expert must share channels, sample size and classes with the mixture."""
    config = getattr(expert, "config", {}) or {}
    normalize = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    for key in SHARED_CONFIG_KEYS:
        expected, got = mixture_config.get(key), config.get(key)
        if expected is not None and normalize(got) != normalize(expected):
            raise ValueError(
                f"{what} does not fit the mixture: it has `{key}`={got!r}, the mixture needs {expected!r}. A mixture "
                f"denoises one kind of sample: reference an expert with equal `{key}`."
            )


def load_referenced_expert(
    source: Mapping,
    k: int,
    expert_class: type | None = None,
    mixture_config: Mapping | None = None,
    hub_options: Mapping | None = None,
    model_kwargs: Mapping | None = None,
):
    r"""
    Load expert `k` of a mixture from its reference `{"repo_id", "revision", "subfolder"}` (a Hub repo or a folder),
    downloading only its configs and weights.

    The reference's own `revision` is used (the mixture's revision names a revision of the mixture repo, not of the
    expert's); `cache_dir`, `local_files_only` and `token` from `hub_options` apply. The expert's class must match
    `expert_class` and its channels / sample size / classes must match `mixture_config`.
    """
    source = check_expert_source(source, k)
    options = {**_check_hub_options(hub_options or {}), "revision": source["revision"]}
    where = repo_path(source["repo_id"], source["subfolder"])
    what = f"Expert {k} ({where!r} at revision {source['revision'] or 'main'!r})"
    folder = _expert_folder(source["repo_id"], source["subfolder"], options, what)
    found_class = class_from_model_folder(folder)
    if expert_class is not None and found_class is not expert_class:
        raise ValueError(
            f"{what} is a {expert_class_name(found_class)!r} but the mixture config expects "
            f"{expert_class_name(expert_class)!r}."
        )
    expert = found_class.from_pretrained(folder, **(model_kwargs or {}))
    if mixture_config is not None:
        _check_fits_mixture(expert, mixture_config, what)
    return expert


def load_expert(name_or_path: str | os.PathLike, expert: int, subfolder: str | None = None, **kwargs):
    r"""
    Load one expert of a saved mixture, downloading only the mixture's `config.json` and that expert's files (or
    following its reference to another repo).

    Args:
        name_or_path (`str` or `os.PathLike`): The mixture: a folder or a Hub repo id.
        expert (`int`): Expert index (0 = lowest noise).
        subfolder (`str`, *optional*): The mixture's folder inside the repo (e.g. `"unet"`).
        revision, cache_dir, local_files_only, token: Hub options for the mixture repo.
        kwargs: Passed to the expert class's `from_pretrained` (e.g. `torch_dtype`).

    Example:
        ```py
        >>> from diffusers_experts import load_expert
        >>> high_noise = load_expert("org/mnist-mixture", 3)  # downloads config.json and expert_3/ only
        ```
    """
    hub_options = pop_hub_options(kwargs)
    path = os.fspath(name_or_path)
    what = f"Loading expert {expert} of {path!r}"
    config = _mixture_config(path, subfolder, hub_options, what)
    classes = config.get("expert_classes") or []
    if not isinstance(expert, int) or not 0 <= expert < len(classes):
        raise ValueError(f"`expert` must be an expert index in [0, {len(classes) - 1}], got {expert!r}.")
    expert_class = resolve_expert_class(classes[expert])
    sources = config.get("expert_sources") or [None] * len(classes)
    if sources[expert] is not None:
        return load_referenced_expert(sources[expert], expert, expert_class, config, hub_options, kwargs)
    folder = _expert_folder(path, repo_path(subfolder, EXPERT_FOLDER.format(expert)), hub_options, what)
    return expert_class.from_pretrained(folder, **kwargs)
