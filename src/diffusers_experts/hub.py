"""Hub sharing of mixtures, pipelines and single experts: one-commit pushes with model cards, per-expert repos.

- [`push_mixture_to_hub`]: an `ExpertMixtureUNet` or a `MultiExpertPipeline` with its model cards in **one commit**
  (`HfApi.create_commit` with every file), so a failed push leaves the previous revision intact. It is what
  `ExpertMixtureUNet.push_to_hub` and `MultiExpertPipeline.push_to_hub` run (registered at the bottom of this module:
  the models sit below it and do not import it).
- [`push_experts_to_hub`]: each expert to its own repo with its own card; returns the `expert_sources` references
  (`{"repo_id", "revision", "subfolder"}`, revision pinned to the pushed commit) a mixture config can hold instead of
  embedding the experts.
- Pulling (`resolve_mixture_folder`, `resolve_pipeline_folder`, `load_expert`, ...) lives in `loading.py`, below the
  models; model cards ([`save_model_cards`], [`mixture_model_card`], [`expert_model_card`]) in `model_card.py`. Both
  are re-exported here.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

from .hub_mixin import HubPushMixin
from .loading import (
    check_expert_source,
    is_mixture_entry,
    is_repo_id,
    load_expert,
    load_referenced_expert,
    repo_path,
    resolve_mixture_folder,
    resolve_model_folder,
    resolve_pipeline_folder,
)
from .model_card import MODEL_CARD_NAME, expert_model_card, find_mixture, mixture_model_card, save_model_cards


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

# Stale files removed from a dedicated expert repo when a new version is pushed (other files are kept).
STALE_EXPERT_PATTERNS = (
    r"[^/]*\.safetensors",
    r"[^/]*\.safetensors\.index\.json",
    r"[^/]*config\.json",
    r"[^/]*\.bin",
)


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
    base = (getattr(expert, "config", {}) or {}).get("base_model_name_or_path")
    if base is not None and not is_repo_id(base):
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


def _branch_head(api: HfApi, repo_id: str, revision: str | None, create_pr: bool) -> tuple[str | None, list[str]]:
    """(head commit sha, files) of the branch a push goes to; creates a missing non-main branch."""
    try:
        info = api.model_info(repo_id, revision=revision)
    except RevisionNotFoundError:
        if create_pr or revision is None:
            raise
        api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.model_info(repo_id, revision=revision)
    return info.sha, [s.rfilename for s in info.siblings or []]


def _commit_folder(
    api: HfApi,
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
    """One commit: every file of `folder` (under `path_in_repo`), minus remote files that `is_stale(path)`.

    Built by hand rather than with `HfApi.upload_folder(delete_patterns=..., parent_commit=...)`, which would do the
    same (deleting matches except the files it uploads) in one `create_commit` only when `hf_xet` is absent. With
    `hf_xet` (installed with huggingface_hub by default) `upload_folder` streams a folder into several commits (above
    ~250 files or 100 MB of non-LFS content, and when a failed commit of more than 20 files is retried in smaller
    ones), `parent_commit` guarding only the first: the repo could show a half-pushed mixture. `create_commit` uploads
    through xet as well and always makes exactly one commit.
    """
    head, remote_files = _branch_head(api, repo_id, revision, create_pr)
    operations = [
        CommitOperationAdd(
            path_in_repo=repo_path(path_in_repo, rel), path_or_fileobj=os.path.join(folder, *rel.split("/"))
        )
        for rel in _local_files(folder)
    ]
    new = {op.path_in_repo for op in operations}  # a re-uploaded file is replaced, never deleted
    operations += [CommitOperationDelete(path_in_repo=p) for p in remote_files if p not in new and is_stale(p)]
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
            f"\nPush to Hub repo {repo_id!r} (revision {revision or 'main'!r}) failed: nothing was committed, the repo "
            f"is unchanged at {head}."
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
        return is_mixture_entry(rel.split("/", 1)[0])

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
    found, _, _ = find_mixture(mixture)
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
            card.save(os.path.join(tmp, MODEL_CARD_NAME))
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
    _check_repo_id(repo_id)
    mixture, component, pipeline = find_mixture(model)
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
        prefix = repo_path(subfolder, component)
        return _commit_folder(
            api,
            tmp,
            repo_id,
            is_stale=_mixture_stale({repo_path(subfolder, name).split("/")[0] for name in written_top}, prefix),
            commit_message=commit_message or f"Upload diffusers-experts {kind} ({mixture.num_experts} experts)",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            path_in_repo=subfolder,
        )


# The models' `push_to_hub` calls this pusher (dependency inversion: they sit below this module and cannot import it).
# The package `__init__` imports this module, so it is registered before any user code runs.
HubPushMixin._hub_pusher = staticmethod(push_mixture_to_hub)
