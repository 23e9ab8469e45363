"""File names, folder names and config keys shared by the mixture, its loaders, its Hub code and its trainers.

Defined once here; every other module imports them.
"""

CONFIG_NAME = "config.json"
MODEL_INDEX_NAME = "model_index.json"
ROUTING_WEIGHTS_NAME = "routing.safetensors"
EXPERT_FOLDER = "expert_{}"
# Top-level packages whose ModelMixin classes may be named in a saved config (never an arbitrary import).
TRUSTED_LIBRARIES = ("diffusers", "diffusers_experts")
# Config keys every expert of a mixture must share (a mixture denoises one kind of sample).
SHARED_CONFIG_KEYS = ("in_channels", "out_channels", "sample_size", "num_class_embeds")
