"""Pipelines for multi-expert diffusion."""

from .expert_offload import ExpertOffloader
from .pipeline_multi_expert import BulkGenerationOutput, MultiExpertPipeline


__all__ = ["BulkGenerationOutput", "ExpertOffloader", "MultiExpertPipeline"]
