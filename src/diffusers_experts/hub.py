"""Hub sharing of mixtures, pipelines and single experts: one-commit pushes, per-expert repos, partial pulls, cards.

- [`push_mixture_to_hub`]: an `ExpertMixtureUNet` or a `MultiExpertPipeline` with its model cards in **one commit**
  (`HfApi.create_commit` with every file), so a failed push leaves the previous revision intact.
- [`push_experts_to_hub`]: each expert to its own repo with its own card; returns the `expert_sources` references
  (`{"repo_id", "revision", "subfolder"}`, revision pinned to the pushed commit) a mixture config can hold instead of
  embedding the experts.
- [`resolve_mixture_folder`] / [`resolve_pipeline_folder`] / [`load_expert`]: pull only the files a mixture, a
  pipeline or one expert needs (`allow_patterns`), honouring `revision`, `cache_dir`, `local_files_only`, `token`.
- [`resolve_model_folder`]: a local folder, or a Hub repo id fetched with `snapshot_download`.
- Model cards: [`save_model_cards`], [`mixture_model_card`], [`expert_model_card`] (see `model_card.py`).

Hub failures (repo or revision not found, a missing expert folder, a referenced expert that does not fit the mixture)
raise `ValueError` naming the repo, the revision and the expert; the original Hub error is chained.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from .model_card import _find_mixture, expert_model_card, mixture_model_card, save_model_cards


__all__ = [
    "check_expert_source",
    "expert_model_card",
    "load_expert",
    "load_referenced_expert",
    "mixture_model_card",
    "push_experts_to_hub",
    "push_mixture_to_hub",
    "resolve_mixture_folder",
    "resolve_model_folder",
    "resolve_pipeline_folder",
    "save_model_cards",
]

CONFIG_NAME = "config.json"
ROUTING_WEIGHTS_NAME = "routing.safetensors"
SOURCE_KEYS = ("repo_id", "revision", "subfolder")
# Files a diffusers model folder needs: configs (model, adapter) and safetensors weights (incl. shards, variants).
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors")
# Stale files removed from a dedicated expert repo when a new version is pushed (other files are kept).
STALE_EXPERT_PATTERNS = (
    r"[^/]*\.safetensors",
    r"[^/]*\.safetensors\.index\.json",
    r"[^/]*config\.json",
    r"[^/]*\.bin",
)
_EXPERT_FOLDER = re.compile(r"^expert_\d+$")


# ---------------------------------------------------------------------------------------------------- resolving


def _is_local_path(path: str) -> bool:
    """True for an existing folder; raises for something that is neither a folder nor a repo id."""
    if os.path.isdir(path):
        return True
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ValueError(f"{path!r} is neither a model folder nor a Hub repo id of the form 'org/name'.")
    return False


def _where(repo_id: str, revision: str | None) -> str:
    return f"Hub repo {repo_id!r} (revision {revision or 'main'!r})"


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, what: str, local_files_only: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's not-found errors into `ValueError`s naming `what`, the repo and the revision."""
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"{what}: Hub repo {repo_id!r} was not found (check the repo id, or the `token` for a private repo)."
        ) from error
    except RevisionNotFoundError as error:
        raise ValueError(f"{what}: revision {revision!r} does not exist in Hub repo {repo_id!r}.") from error
    except RemoteEntryNotFoundError as error:
        raise ValueError(f"{what}: a required file is missing in {_where(repo_id, revision)}: {error}") from error
    except LocalEntryNotFoundError as error:
        reason = "`local_files_only=True` and it is" if local_files_only else "the Hub is unreachable and it is"
        raise ValueError(f"{what}: {_where(repo_id, revision)} is needed, but {reason} not in the cache.") from error


def resolve_model_folder(
    name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> str:
    """Local folder holding `name_or_path` (a folder, or a Hub repo id fetched with `snapshot_download`).

    Only the files under `subfolder` are downloaded when it is given.
    """
    path = os.fspath(name_or_path)
    if _is_local_path(path):
        folder = os.path.join(path, subfolder) if subfolder else path
        if not os.path.isdir(folder):
            raise ValueError(f"No folder {subfolder!r} in {path!r}.")
        return folder
    from huggingface_hub import snapshot_download

    allow_patterns = [f"{subfolder.strip('/')}/*"] if subfolder else None
    with _hub_errors(path, revision, f"Loading {path!r}", local_files_only):
        root = snapshot_download(
            path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=allow_patterns,
        )
    folder = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(folder):
        raise ValueError(f"Repo {path!r} (revision {revision or 'main'!r}) has no folder {subfolder!r}.")
    return folder


def _join(*parts: str | None) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _download_mixture_config(repo_id: str, subfolder: str | None, hub_kwargs: dict, what: str) -> dict:
    """The mixture's `config.json` (only this file is downloaded)."""
    from huggingface_hub import hf_hub_download

    revision = hub_kwargs.get("revision")
    filename = _join(subfolder, CONFIG_NAME)
    with _hub_errors(repo_id, revision, what, hub_kwargs.get("local_files_only", False)):
        try:
            config_file = hf_hub_download(repo_id, filename, **hub_kwargs)
        except Exception as error:
            from huggingface_hub.errors import RemoteEntryNotFoundError

            if isinstance(error, RemoteEntryNotFoundError):
                raise ValueError(
                    f"{what}: {_where(repo_id, revision)} has no {filename!r}: not a saved ExpertMixtureUNet"
                    + (f" (is {subfolder!r} the right subfolder?)" if subfolder else "")
                    + "."
                ) from error
            raise
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def resolve_mixture_folder(
    name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> str:
    r"""
    Local folder of a saved `ExpertMixtureUNet`: a folder as is, or, for a Hub repo id, a snapshot holding only what
    loading needs: `config.json`, `routing.safetensors` and the `expert_k/` folders of embedded experts (configs and
    safetensors weights; no model cards, images or experts referenced from other repos).

    Args:
        name_or_path (`str` or `os.PathLike`): A folder or a Hub repo id `"org/name"`.
        subfolder (`str`, *optional*): The mixture's folder inside the repo (e.g. `"unet"` of a pipeline repo).
        revision, cache_dir, local_files_only, token: As in `huggingface_hub.snapshot_download`.
    """
    path = os.fspath(name_or_path)
    if _is_local_path(path):
        return resolve_model_folder(path, subfolder=subfolder)
    from huggingface_hub import snapshot_download

    hub_kwargs = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    what = f"Loading mixture {path!r}"
    patterns = _mixture_patterns(_download_mixture_config(path, subfolder, hub_kwargs, what), subfolder)
    with _hub_errors(path, revision, what, local_files_only):
        root = snapshot_download(path, allow_patterns=patterns, **hub_kwargs)
    return os.path.join(root, subfolder) if subfolder else root


def _mixture_patterns(config: Mapping, subfolder: str | None) -> list[str]:
    """`allow_patterns` of what loading a mixture needs: its config, routing weights and embedded experts."""
    patterns = [_join(subfolder, CONFIG_NAME), _join(subfolder, ROUTING_WEIGHTS_NAME)]
    sources = config.get("expert_sources") or [None] * len(config.get("expert_classes", []))
    for k, source in enumerate(sources):
        if source is None:
            patterns += [_join(subfolder, f"expert_{k}", p) for p in MODEL_FILE_PATTERNS]
    return patterns


def resolve_pipeline_folder(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> str:
    r"""
    Local folder of a saved `MultiExpertPipeline`: a folder as is, or, for a Hub repo id, a snapshot holding
    `model_index.json`, each component's folder and, for the `ExpertMixtureUNet` component, only its config, routing
    weights and embedded experts (no model cards, sample images or experts referenced from other repos).

    Args:
        name_or_path (`str` or `os.PathLike`): A folder or a Hub repo id `"org/name"`.
        revision, cache_dir, local_files_only, token: As in `huggingface_hub.snapshot_download`.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    path = os.fspath(name_or_path)
    if _is_local_path(path):
        return path
    hub_kwargs = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    what = f"Loading pipeline {path!r}"
    with _hub_errors(path, revision, what, local_files_only):
        with open(hf_hub_download(path, "model_index.json", **hub_kwargs), encoding="utf-8") as f:
            model_index = json.load(f)
    patterns = ["model_index.json"]
    for name, value in model_index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or None in value:
            continue
        library, class_name = value  # diffusers writes the module path, e.g. "diffusers_experts.models.expert_mixture"
        if library.split(".")[0] == "diffusers_experts" and class_name == "ExpertMixtureUNet":
            patterns += _mixture_patterns(_download_mixture_config(path, name, hub_kwargs, what), name)
        else:
            patterns.append(f"{name}/*")
    with _hub_errors(path, revision, what, local_files_only):
        return snapshot_download(path, allow_patterns=patterns, **hub_kwargs)


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


def _expert_folder(repo_or_path: str, subfolder: str | None, revision: str | None, hub_kwargs: dict, what: str):
    """Local folder of one expert: configs and safetensors of `subfolder` only (a folder is used as is)."""
    path = os.fspath(repo_or_path)
    if _is_local_path(path):
        folder = os.path.join(path, subfolder) if subfolder else path
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise ValueError(f"{what}: no expert folder {subfolder or '.'!r} with a {CONFIG_NAME} in {path!r}.")
        return folder
    from huggingface_hub import snapshot_download

    options = {**hub_kwargs, "revision": revision}
    with _hub_errors(path, revision, what, options.get("local_files_only", False)):
        root = snapshot_download(path, allow_patterns=[_join(subfolder, p) for p in MODEL_FILE_PATTERNS], **options)
    folder = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise ValueError(
            f"{what}: {_where(path, revision)} has no expert folder {subfolder or '.'!r} (no "
            f"{_join(subfolder, CONFIG_NAME)!r}); folders there: {_repo_folders(path, revision, options)}."
        )
    return folder


def _repo_folders(repo_id: str, revision: str | None, hub_kwargs: dict) -> list[str] | str:
    """Top-level folders of a Hub repo (for error messages), or `"unknown"` when they cannot be listed."""
    from huggingface_hub import HfApi

    if hub_kwargs.get("local_files_only"):
        return "unknown (local_files_only=True)"
    try:
        tree = HfApi(token=hub_kwargs.get("token")).list_repo_tree(repo_id, revision=revision)
        return sorted(entry.path for entry in tree if not hasattr(entry, "size"))
    except Exception:  # only used to enrich an error message
        return "unknown"


def _check_fits_mixture(expert, mixture_config: Mapping, what: str) -> None:
    """A referenced expert must share channels, sample size and classes with the mixture."""
    config = getattr(expert, "config", {}) or {}
    for key in ("in_channels", "out_channels", "sample_size", "num_class_embeds"):
        expected, got = mixture_config.get(key), config.get(key)
        normalize = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
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
    hub_kwargs: Mapping | None = None,
    model_kwargs: Mapping | None = None,
):
    r"""
    Load expert `k` of a mixture from its reference `{"repo_id", "revision", "subfolder"}` (a Hub repo or a folder),
    downloading only its configs and weights.

    The reference's own `revision` is used (the mixture's revision names a revision of the mixture repo, not of the
    expert's); `cache_dir`, `local_files_only` and `token` from `hub_kwargs` apply. The expert's class must match
    `expert_class` and its channels / sample size / classes must match `mixture_config`.
    """
    from .models.expert_mixture import _class_from_model_folder, expert_class_name

    source = check_expert_source(source, k)
    hub_kwargs = {key: value for key, value in (hub_kwargs or {}).items() if key != "revision"}
    where = source["repo_id"] + (f"/{source['subfolder']}" if source.get("subfolder") else "")
    what = f"Expert {k} ({where!r} at revision {source.get('revision') or 'main'!r})"
    folder = _expert_folder(source["repo_id"], source.get("subfolder"), source.get("revision"), hub_kwargs, what)
    found_class = _class_from_model_folder(folder)
    if expert_class is not None and found_class is not expert_class:
        raise ValueError(
            f"{what} is a {expert_class_name(found_class)!r} but the mixture config expects "
            f"{expert_class_name(expert_class)!r}."
        )
    expert = found_class.from_pretrained(folder, **(model_kwargs or {}))
    if mixture_config is not None:
        _check_fits_mixture(expert, mixture_config, what)
    return expert


def load_expert(
    name_or_path: str | os.PathLike,
    expert: int,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    **kwargs,
):
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
        >>> from diffusers_experts.hub import load_expert
        >>> high_noise = load_expert("org/mnist-mixture", 3)  # downloads config.json and expert_3/ only
        ```
    """
    from .models.expert_mixture import resolve_expert_class

    path = os.fspath(name_or_path)
    hub_kwargs = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    what = f"Loading expert {expert} of {path!r}"
    if _is_local_path(path):
        config_file = os.path.join(path, subfolder or "", CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise ValueError(f"{what}: no {CONFIG_NAME} in {os.path.dirname(config_file)!r}: not a saved mixture.")
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    else:
        config = _download_mixture_config(path, subfolder, hub_kwargs, what)
    classes = config.get("expert_classes") or []
    if not isinstance(expert, int) or not 0 <= expert < len(classes):
        raise ValueError(f"`expert` must be an expert index in [0, {len(classes) - 1}], got {expert!r}.")
    expert_class = resolve_expert_class(classes[expert])
    sources = config.get("expert_sources") or [None] * len(classes)
    if sources[expert] is not None:
        return load_referenced_expert(sources[expert], expert, expert_class, config, hub_kwargs, kwargs)
    folder_name = _join(subfolder, f"expert_{expert}")
    if os.path.isdir(path):
        folder = _expert_folder(path, folder_name, None, {}, what)
    else:
        folder = _expert_folder(path, folder_name, revision, hub_kwargs, what)
    return expert_class.from_pretrained(folder, **kwargs)


# ---------------------------------------------------------------------------------------------------- pushing


def _check_repo_id(repo_id, name: str = "repo_id") -> str:
    if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", repo_id):
        raise ValueError(f"`{name}` must be a Hub repo id like 'org/name', got {repo_id!r}.")
    return repo_id


@contextmanager
def _expert_sources_as(mixture, sources: list | None) -> Iterator[None]:
    """Temporarily set the mixture config's `expert_sources` (restored afterwards, even on error)."""
    previous = mixture.config.expert_sources
    if sources == previous:
        yield
        return
    mixture.register_to_config(expert_sources=sources)
    try:
        yield
    finally:
        mixture.register_to_config(expert_sources=previous)


def _check_shareable(expert, k: int, repo_id: str) -> None:
    """A pushed LoRA expert must name a base that others can load: a Hub repo id, not a local folder."""
    config = getattr(expert, "config", {}) or {}
    base = config.get("base_model_name_or_path")
    if base is None:
        return
    if os.path.isabs(base) or base.startswith((".", "~")) or os.path.isdir(base) or base.count("/") > 1:
        raise ValueError(
            f"Cannot push expert {k} to {repo_id!r}: it is a LoRA adapter on the local base model {base!r}, which "
            f"nobody pulling the repo can load. Push the base first (e.g. `base.push_to_hub('org/base')`) and build "
            f"the expert on it by repo id (`LoRAExpert.from_base(base, 'org/base', ...)`)."
        )


def _local_files(folder: str) -> list[str]:
    """Repo paths (posix) of every file under `folder`."""
    files = []
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            files.append(os.path.relpath(os.path.join(dirpath, filename), folder).replace(os.sep, "/"))
    return sorted(files)


def _branch_head(api, repo_id: str, revision: str | None, create_pr: bool) -> tuple[str | None, list[str]]:
    """(head commit sha, files) of the branch a push goes to; creates a missing non-main branch."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        info = api.model_info(repo_id, revision=revision)
    except RevisionNotFoundError:
        if create_pr or revision is None:
            raise
        api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.model_info(repo_id, revision=revision)
    return info.sha, [s.rfilename for s in info.siblings or []]


def _commit_folder(
    api,
    folder: str,
    repo_id: str,
    *,
    is_stale,
    commit_message: str,
    commit_description: str | None,
    revision: str | None,
    create_pr: bool,
    path_in_repo: str | None = None,
):
    """One commit: every file of `folder` (under `path_in_repo`), minus remote files that `is_stale(path)`."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    head, remote_files = _branch_head(api, repo_id, revision, create_pr)
    operations = [
        CommitOperationAdd(
            path_in_repo=_join(path_in_repo, rel), path_or_fileobj=os.path.join(folder, *rel.split("/"))
        )
        for rel in _local_files(folder)
    ]
    new = {op.path_in_repo for op in operations}
    operations += [CommitOperationDelete(path_in_repo=p) for p in remote_files if p not in new and is_stale(p)]
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            parent_commit=head,  # the deletions were computed against this commit: refuse to race another push
        )
    except HfHubHTTPError as error:
        error.append_to_message(
            f"\nPush to {_where(repo_id, revision)} failed: nothing was committed, the repo is unchanged at {head}."
        )
        raise


def _mixture_stale(written_top: set[str], prefix: str):
    """Stale remote files of a mixture / pipeline push: files in a top folder this push writes, old `expert_k/`
    folders and old routing weights of the mixture (at `prefix` in the repo). Other remote files are kept."""

    def is_stale(path: str) -> bool:
        if "/" in path and path.split("/", 1)[0] in written_top:
            return True
        if prefix and not path.startswith(prefix + "/"):
            return False
        rel = path[len(prefix) + 1 :] if prefix else path
        return rel == ROUTING_WEIGHTS_NAME or ("/" in rel and bool(_EXPERT_FOLDER.match(rel.split("/", 1)[0])))

    return is_stale


def push_experts_to_hub(
    mixture,
    repo_ids: Sequence[str | None],
    *,
    metadata: Mapping | None = None,
    mixture_repo_id: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    pin_revision: bool = True,
) -> list[dict | None]:
    r"""
    Push each expert of `mixture` to its own Hub repo (one commit per repo) with its own model card.

    Args:
        mixture (`ExpertMixtureUNet`): The mixture whose experts are pushed.
        repo_ids (`list[str | None]`): One repo id per expert; `None` skips that expert.
        metadata (`dict`, *optional*): Card metadata as in [`save_model_cards`] (`metadata["experts"][k]` holds
            expert k's training steps, metrics, MACs).
        mixture_repo_id (`str`, *optional*): The mixture's repo, linked from each expert card.
        commit_message (`str`, *optional*): Defaults to `"Upload expert k of a diffusers-experts mixture"`.
        private, token: As in `HfApi.create_repo` / `create_commit`.
        revision (`str`, *optional*): Branch to push to (created if missing); defaults to `main`.
        pin_revision (`bool`, defaults to `True`): Return references pinned to the pushed commit sha (reproducible);
            `False` references the branch.

    Returns:
        `list[dict | None]`: Per expert, the reference `{"repo_id", "revision", "subfolder"}` to put in a mixture
        config's `expert_sources` (or `None` for skipped experts).

    Example:
        ```py
        >>> from diffusers_experts.hub import push_experts_to_hub, push_mixture_to_hub
        >>> sources = push_experts_to_hub(mixture, ["org/expert-low-noise", "org/expert-high-noise"])
        >>> push_mixture_to_hub(mixture, "org/mixture", expert_sources=sources)  # config + card, no weights
        ```
    """
    from huggingface_hub import HfApi

    found, _, _ = _find_mixture(mixture)
    if found.num_experts == 0:
        raise ValueError(f"Cannot push experts to {list(repo_ids)!r}: the mixture has no experts.")
    if isinstance(repo_ids, str) or not isinstance(repo_ids, Sequence) or len(repo_ids) != found.num_experts:
        raise ValueError(
            f"`repo_ids` must be a list with one repo id (or None) per expert ({found.num_experts}), got {repo_ids!r}."
        )
    for k, repo_id in enumerate(repo_ids):
        if repo_id is not None:
            _check_repo_id(repo_id, f"repo_ids[{k}]")
            _check_shareable(found.experts[k], k, repo_id)
    card_metadata = {**(metadata or {}), **({"repo_id": mixture_repo_id} if mixture_repo_id else {})}
    api = HfApi(token=token)
    sources: list[dict | None] = [None] * found.num_experts
    for k, repo_id in enumerate(repo_ids):
        if repo_id is None:
            continue
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="diffusers-experts-push-") as tmp:
            found.experts[k].save_pretrained(tmp, safe_serialization=True)
            card = expert_model_card(found, k, card_metadata, expert_repo_id=repo_id)
            card.save(os.path.join(tmp, "README.md"))
            info = _commit_folder(
                api,
                tmp,
                repo_id,
                is_stale=lambda p: any(re.fullmatch(pattern, p) for pattern in STALE_EXPERT_PATTERNS),
                commit_message=commit_message or f"Upload expert {k} of a diffusers-experts mixture",
                commit_description=None,
                revision=revision,
                create_pr=False,
            )
        sources[k] = {"repo_id": repo_id, "revision": info.oid if pin_revision else revision, "subfolder": None}
    return sources


def push_mixture_to_hub(
    model,
    repo_id: str,
    *,
    metadata: Mapping | None = None,
    expert_sources: Sequence[dict | None] | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    subfolder: str | None = None,
    **save_kwargs,
):
    r"""
    Push an `ExpertMixtureUNet` or a `MultiExpertPipeline`, with its model cards, to the Hub in **one commit**.

    Every file (configs, routing parameters, each embedded `expert_k/`, the mixture card and one card per expert) goes
    into a single `create_commit`; stale files of the previous version (old `expert_k/` folders, old routing weights,
    old shards inside the folders written) are deleted in the same commit; other files already in the repo are kept.
    The commit is made against the branch head read before uploading (`parent_commit`), and a failed upload or
    commit leaves the previous revision exactly as it was.

    Args:
        model (`ExpertMixtureUNet` or `MultiExpertPipeline`): What to push.
        repo_id (`str`): Target repo (created if missing).
        metadata (`dict`, *optional*): Card metadata, see [`save_model_cards`]; `repo_id` defaults to this repo.
        expert_sources (`list[dict | None]`, *optional*): References to experts pushed elsewhere (see
            [`push_experts_to_hub`]); those experts are referenced by the pushed config instead of embedded. The
            in-memory model is not changed.
        commit_message, commit_description (`str`, *optional*): Commit texts.
        private, token: As in `HfApi.create_repo` / `create_commit`.
        revision (`str`, *optional*): Branch to push to (created from `main` if missing).
        create_pr (`bool`, defaults to `False`): Open a pull request instead of committing to the branch.
        subfolder (`str`, *optional*): Push a mixture into this folder of the repo (e.g. `"unet"`).
        save_kwargs: Passed to `save_pretrained` (e.g. `variant`, `max_shard_size`).

    Returns:
        `huggingface_hub.CommitInfo`: The commit (`.oid` is its sha, usable as `revision` when loading).
    """
    from huggingface_hub import HfApi

    _check_repo_id(repo_id)
    mixture, component, pipeline = _find_mixture(model)
    if mixture.num_experts == 0:
        raise ValueError(f"Cannot push to {repo_id!r}: the mixture has no experts.")
    if pipeline is not None and subfolder:
        raise ValueError(f"`subfolder` is for pushing a mixture alone; a pipeline fills the repo, got {subfolder!r}.")
    if save_kwargs.pop("safe_serialization", True) is not True:
        raise ValueError("`safe_serialization=False` is not supported: weights are pushed as safetensors only.")
    sources = list(mixture.config.expert_sources or [None] * mixture.num_experts)
    if expert_sources is not None:
        if isinstance(expert_sources, (str, Mapping)) or len(expert_sources) != mixture.num_experts:
            raise ValueError(
                f"`expert_sources` must hold one reference (or None) per expert ({mixture.num_experts}), got "
                f"{expert_sources!r}."
            )
        sources = [
            check_expert_source(new, k) if new is not None else old
            for k, (new, old) in enumerate(zip(expert_sources, sources))
        ]
    for k, expert in enumerate(mixture.experts):
        if sources[k] is None:
            _check_shareable(expert, k, repo_id)
    if metadata is not None and metadata.get("repo_id") not in (None, repo_id):
        raise ValueError(f"`metadata['repo_id']` is {metadata['repo_id']!r} but the push goes to {repo_id!r}.")
    card_metadata = {**(metadata or {}), "repo_id": repo_id}
    kind = "pipeline" if pipeline is not None else "mixture"
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffusers-experts-push-") as tmp:
        with _expert_sources_as(mixture, sources if any(s is not None for s in sources) else None):
            model.save_pretrained(tmp, safe_serialization=True, **save_kwargs)
            save_model_cards(tmp, model, card_metadata)
        written_top = {name for name in os.listdir(tmp) if os.path.isdir(os.path.join(tmp, name))}
        prefix = _join(subfolder, component)
        return _commit_folder(
            api,
            tmp,
            repo_id,
            is_stale=_mixture_stale({_join(subfolder, name).split("/")[0] for name in written_top}, prefix),
            commit_message=commit_message or f"Upload diffusers-experts {kind} ({mixture.num_experts} experts)",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            path_in_repo=subfolder,
        )
