"""unetops: a reproducible DVC + MLflow + Optuna pipeline for U-Net segmentation of biomedical images."""

import os

# Quiet TensorFlow before anything imports it (DESIGN §7), and keep DVC from phoning home.
# TensorFlow's oneDNN CPU kernels stay on (its default): measured 1.7-2x faster training and
# prediction on the 2-core CI CPU, and same params still give the same weights run to run.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

__version__ = "0.1.0"
