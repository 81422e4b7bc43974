"""Segmentation losses (and the F1 training metric) for a sigmoid output ``(batch, H, W, 1)`` against a 0/1 mask of that shape.

Pixelwise losses return ``(batch, H, W)`` so Keras can multiply a per-pixel ``sample_weight``
(the U-Net weight map from ``augment``) before its mean; region losses (Dice) return one value
per sample. Plain functions built from ``keras.ops``: backend-agnostic, and never saved into
``models/model.keras`` (the exported model is uncompiled).
"""

from collections.abc import Callable

import keras
from keras import ops

from unetops.errors import UnetopsError

EPSILON = 1e-7
DICE_SMOOTH = 1.0
"""Added to numerator and denominator of the soft Dice: an empty mask predicted empty scores 0."""


def _pixel_bce(y_true, y_pred, pos_weight: float = 1.0):
    y_true = ops.cast(y_true, y_pred.dtype)
    y_pred = ops.clip(y_pred, EPSILON, 1.0 - EPSILON)
    loss = -(pos_weight * y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred))
    return ops.squeeze(loss, axis=-1)


def bce(y_true, y_pred):
    """Binary cross entropy per pixel (seeds 000, 003, 004); with a weight map as sample weight
    it is the U-Net paper's weight-map cross entropy."""
    return _pixel_bce(y_true, y_pred)


def weighted_bce(pos_weight: float) -> Callable:
    """Class-weighted BCE: vessel pixels count ``pos_weight`` times (the cure for all-black maps)."""

    def weighted_bce(y_true, y_pred):
        return _pixel_bce(y_true, y_pred, pos_weight)

    return weighted_bce


def _tversky(y_true, y_pred, beta: float, pooled: bool = False):
    """1 − soft Tversky index per sample; false negatives weigh ``beta``, false positives 1 − beta.

    Written as (2·TP + s) / (2·TP + 2(1 − β)·FP + 2β·FN + s), so β = 0.5 is exactly the soft Dice.
    ``pooled``: one index over the whole batch (nnU-Net's batch Dice), repeated for every sample.
    """
    y_true = ops.cast(y_true, y_pred.dtype)
    axes = tuple(range(0 if pooled else 1, len(y_pred.shape)))
    overlap = ops.sum(y_true * y_pred, axis=axes)
    false_positive = ops.sum((1.0 - y_true) * y_pred, axis=axes)
    false_negative = ops.sum(y_true * (1.0 - y_pred), axis=axes)
    denominator = 2.0 * (overlap + (1.0 - beta) * false_positive + beta * false_negative)
    loss = 1.0 - (2.0 * overlap + DICE_SMOOTH) / (denominator + DICE_SMOOTH)
    return ops.ones_like(y_pred[:, 0, 0, 0]) * loss if pooled else loss


def soft_dice(y_true, y_pred):
    """1 − soft Dice per sample: 0 for a perfect prediction, → 1 for disjoint masks."""
    return _tversky(y_true, y_pred, 0.5)


def tversky(beta: float, pooled: bool = False) -> Callable:
    """Soft Tversky loss (Salehi et al. 2017): β > 0.5 trades precision for recall.

    Like Dice it drives probabilities towards 0 or 1, so the mask hardly depends on the
    threshold. Per patch, a patch with no vessel makes any false positive cost nearly the whole
    loss; ``pooled`` (``train.batch_dice``) scores the batch as one image instead.
    """

    def tversky(y_true, y_pred):
        return _tversky(y_true, y_pred, beta, pooled)

    return tversky


def plus_bce(region: Callable) -> Callable:
    """BCE (mean per sample) + a region loss: BCE's stable gradients, the region term's
    indifference to class imbalance."""

    def bce_and_region(y_true, y_pred):
        return ops.mean(_pixel_bce(y_true, y_pred), axis=(1, 2)) + region(y_true, y_pred)

    return bce_and_region


bce_dice = plus_bce(soft_dice)


def make_loss(name: str, pos_weight: float = 1.0, tversky_beta: float = 0.5,
              batch_dice: bool = False) -> Callable:
    """The loss called ``name`` in ``train.loss``; ``weight_map`` is BCE fed per-pixel weights."""
    if name in ("bce", "weight_map"):
        return bce
    if name == "weighted_bce":
        return weighted_bce(pos_weight)
    if name not in ("dice", "bce_dice", "tversky", "bce_tversky"):
        raise UnetopsError(f"train.loss: unknown loss {name!r}")
    region = tversky(0.5 if name.endswith("dice") else tversky_beta, batch_dice)
    return plus_bce(region) if name.startswith("bce_") else region


class F1Score(keras.metrics.Metric):
    """F1 (= Dice) of the map thresholded at ``threshold``, pixels pooled over the epoch.

    Keras' own ``F1Score`` wants (batch, classes) inputs; this one takes segmentation maps and
    a per-pixel ``sample_weight`` of shape (batch, H, W).
    """

    def __init__(self, threshold: float = 0.5, name: str = "f1", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold
        self.true_positives = self.add_variable((), initializer="zeros", name="true_positives")
        self.false_positives = self.add_variable((), initializer="zeros", name="false_positives")
        self.false_negatives = self.add_variable((), initializer="zeros", name="false_negatives")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.cast(ops.greater(y_true, 0.5), "float32")
        predicted = ops.cast(ops.greater_equal(y_pred, self.threshold), "float32")
        weight = 1.0
        if sample_weight is not None:
            weight = ops.cast(sample_weight, "float32")
            while len(weight.shape) < len(truth.shape):
                weight = ops.expand_dims(weight, -1)
        self.true_positives.assign_add(ops.sum(weight * truth * predicted))
        self.false_positives.assign_add(ops.sum(weight * (1.0 - truth) * predicted))
        self.false_negatives.assign_add(ops.sum(weight * truth * (1.0 - predicted)))

    def result(self):
        return ops.divide_no_nan(
            2.0 * self.true_positives,
            2.0 * self.true_positives + self.false_positives + self.false_negatives)

    def reset_state(self):
        for variable in self.variables:
            variable.assign(ops.zeros_like(variable))

    def get_config(self):
        return super().get_config() | {"threshold": self.threshold}


def on_every_map(loss: Callable) -> Callable:
    """``loss`` averaged over the maps stacked on the last axis (deep supervision of IterNet's passes).

    Each map is scored on its own against the one mask, so a pixel- or region-wise ``loss``
    keeps its meaning and its output shape.
    """

    def every_map(y_true, y_pred):
        maps = y_pred.shape[-1]
        return sum(loss(y_true, y_pred[..., i:i + 1]) for i in range(maps)) / maps

    every_map.__name__ = f"{getattr(loss, '__name__', 'loss')}_every_map"
    return every_map


class LastMap(keras.metrics.Metric):
    """``metric`` of the last map stacked on the last axis: the one the saved model outputs."""

    def __init__(self, metric: keras.metrics.Metric, **kwargs):
        super().__init__(name=metric.name, **kwargs)
        self.metric = metric

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.metric.update_state(y_true, y_pred[..., -1:], sample_weight)

    def result(self):
        return self.metric.result()

    def reset_state(self):
        self.metric.reset_state()
