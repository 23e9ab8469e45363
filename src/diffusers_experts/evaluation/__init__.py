"""Evaluation: complexity (params / MACs), sample-quality metrics (torch-fidelity), Fourier analysis, plots, the
bundled MNIST digits, and loading a trained model to sample from.

Nothing here imports matplotlib at import time (the plotting functions import it when called).
"""

from .complexity import (
    attention_flop_formulas,
    count_parameters,
    expert_macs,
    measure_macs,
    mixture_macs_per_call,
    mixture_macs_schedule,
)
from .feature_extractor import (
    CLASSIFIER_EXTRACTOR_NAME,
    MIN_EXTRACTOR_ACCURACY,
    ClassifierFeatureExtractor,
    ReferenceClassifier,
    check_extractor_accuracy,
)
from .fourier import (
    FourierAnalysis,
    capture_feature_maps,
    default_fourier_layers,
    fourier_analysis,
    relative_log_amplitude,
)
from .heldout_loss import DEFAULT_HELDOUT_TIMESTEPS, HeldoutLoss, heldout_digits, heldout_loss
from .metrics import (
    INCEPTION_NAME,
    INCEPTION_WEIGHTS_URL,
    ImageTensorDataset,
    compute_metrics,
    read_image_folder,
    to_uint8_images,
)
from .mnist import MNIST_NUM_CLASSES, MNIST_NUM_DIGITS, mnist_digits
from .plots import (
    attention_shares,
    plot_attention_shares,
    plot_fourier,
    plot_fourier_experts,
    plot_routing,
    save_image_grid,
)
from .trained_model import (
    UsageError,
    add_class_and_guidance_arguments,
    class_labels_for,
    guidance_for,
    load_pipeline,
    usage_errors,
)


__all__ = [
    "UsageError",
    "add_class_and_guidance_arguments",
    "class_labels_for",
    "usage_errors",
    "guidance_for",
    "CLASSIFIER_EXTRACTOR_NAME",
    "DEFAULT_HELDOUT_TIMESTEPS",
    "ClassifierFeatureExtractor",
    "FourierAnalysis",
    "HeldoutLoss",
    "INCEPTION_NAME",
    "INCEPTION_WEIGHTS_URL",
    "ImageTensorDataset",
    "MNIST_NUM_CLASSES",
    "MNIST_NUM_DIGITS",
    "MIN_EXTRACTOR_ACCURACY",
    "ReferenceClassifier",
    "check_extractor_accuracy",
    "attention_flop_formulas",
    "attention_shares",
    "capture_feature_maps",
    "compute_metrics",
    "count_parameters",
    "default_fourier_layers",
    "expert_macs",
    "fourier_analysis",
    "heldout_digits",
    "heldout_loss",
    "load_pipeline",
    "measure_macs",
    "mixture_macs_per_call",
    "mixture_macs_schedule",
    "mnist_digits",
    "plot_attention_shares",
    "plot_fourier",
    "plot_fourier_experts",
    "plot_routing",
    "read_image_folder",
    "relative_log_amplitude",
    "save_image_grid",
    "to_uint8_images",
]
