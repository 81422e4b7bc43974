"""unetops: a reproducible DVC + MLflow + Optuna pipeline for U-Net segmentation of biomedical images."""

import os

# Quiet TensorFlow before anything imports it (DESIGN §7), and keep DVC from phoning home.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

__version__ = "0.1.0"
