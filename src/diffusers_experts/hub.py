"""Hub access for mixtures and experts: resolve a local folder or a Hub repo id to a local folder; model cards."""

from __future__ import annotations

import os

from .model_card import expert_model_card, mixture_model_card, save_model_cards


__all__ = ["expert_model_card", "mixture_model_card", "resolve_model_folder", "save_model_cards"]


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
    if os.path.isdir(path):
        folder = os.path.join(path, subfolder) if subfolder else path
        if not os.path.isdir(folder):
            raise ValueError(f"No folder {subfolder!r} in {path!r}.")
        return folder
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ValueError(f"{path!r} is neither a model folder nor a Hub repo id of the form 'org/name'.")
    from huggingface_hub import snapshot_download

    allow_patterns = [f"{subfolder.strip('/')}/*"] if subfolder else None
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
