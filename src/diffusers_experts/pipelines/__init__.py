"""Pipelines for multi-expert diffusion."""

from .bulk_generation import BulkGenerationOutput
from .expert_offload import ExpertOffloader
from .pipeline_multi_expert import MultiExpertPipeline, MultiExpertPipelineOutput


__all__ = ["BulkGenerationOutput", "ExpertOffloader", "MultiExpertPipeline", "MultiExpertPipelineOutput"]
