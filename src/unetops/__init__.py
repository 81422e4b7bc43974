"""unetops: a reproducible DVC + MLflow + Optuna pipeline for U-Net segmentation of biomedical images."""

import os

# Quiet TensorFlow before anything imports it (DESIGN §7), and keep DVC from phoning home.
# TensorFlow's oneDNN CPU kernels stay on (its default): measured 1.7-2x faster training and
# prediction on the 2-core CI CPU, and same params still give the same weights run to run.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One op at a time (each op still uses every core): with several ops in flight, graph-mode
# gradients of the ISBI profile's 32-filter U-Net differed in the last bits from run to run
# despite op determinism (with oneDNN's kernels and with Eigen's), and 20 epochs grew that into
# different models; with one, training is bit-exact. Read once, when TensorFlow starts.
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

__version__ = "0.1.0"
