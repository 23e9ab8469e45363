"""`push_to_hub` of the mixture and of the pipeline, whose work is done by the Hub layer above them.

Pushing writes model cards and makes one Hub commit (`diffusers_experts.hub`), which sits above models and pipelines
(DESIGN contract 10). The classes below it reach it through a registered callback instead of an import:
`diffusers_experts.hub` sets `HubPushMixin._hub_pusher` when it is imported, which the package `__init__` does.
"""

from __future__ import annotations

from collections.abc import Callable


class HubPushMixin:
    """Adds `push_to_hub` (diffusers' signature) to [`ExpertMixtureUNet`] and [`MultiExpertPipeline`]."""

    _hub_pusher: Callable | None = None  # `diffusers_experts.hub.push_mixture_to_hub`, registered by that module

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        subfolder: str | None = None,
        **kwargs,
    ):
        r"""
        Push this mixture or pipeline (configs, routing parameters, every embedded expert, the model card and one
        card per expert) to the Hub in **one commit**: a failed push leaves the previous revision intact. Options
        (`metadata`, `expert_sources`, `revision`, `commit_description`, `max_shard_size`): see
        [`~diffusers_experts.hub.push_mixture_to_hub`]; experts can go to their own repos with
        [`~diffusers_experts.hub.push_experts_to_hub`].

        Args:
            repo_id (`str`): Target repo (created if missing).
            commit_message (`str`, *optional*): Commit message.
            private (`bool`, *optional*): Create the repo as private.
            token (`str` or `bool`, *optional*): Hub token.
            create_pr (`bool`, defaults to `False`): Open a pull request instead of committing to the branch.
            safe_serialization (`bool`, defaults to `True`): Must be `True`: weights are pushed as safetensors only.
            variant (`str`, *optional*): Weights variant (e.g. `"fp16"`).
            subfolder (`str`, *optional*): Push a mixture into this folder of the repo (not a pipeline).

        Returns:
            `huggingface_hub.CommitInfo`: The commit (`.oid` is its sha).
        """
        if variant is not None:
            kwargs["variant"] = variant
        if subfolder is not None:
            kwargs["subfolder"] = subfolder
        return type(self)._hub_pusher(
            self,
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            create_pr=create_pr,
            safe_serialization=safe_serialization,
            **kwargs,
        )
