"""Segmentation metrics in pure numpy, defined exactly as scikit-learn defines them.

Why not call scikit-learn: pooled pixels of a whole test set are millions of values, and one
sort (:func:`ranking_curve`) gives AUC-ROC, average precision, the F1-maximising threshold and the
plotted curves at once, where scikit-learn would sort once per function. The tests check every
number against scikit-learn to 1e-9.

Conventions: a pixel is positive when its probability is ``>= threshold``; a ratio whose
denominator is 0 is 0.0 (scikit-learn's ``zero_division=0``); ranking metrics of a set that
holds only one class are NaN (scikit-learn raises).
"""

from dataclasses import dataclass

import numpy as np

#: The confusion-matrix metrics, in the order reports list them.
THRESHOLD_METRICS = ("f1", "iou", "precision", "recall", "specificity", "accuracy")
#: Every metric of one set of pixels (DESIGN §2's ``metrics.json`` keys, less ``threshold``).
ALL_METRICS = ("auc_roc", "auc_pr") + THRESHOLD_METRICS


@dataclass(frozen=True)
class Counts:
    """Confusion-matrix counts of one binarised map (or of pooled pixels)."""

    tp: int
    fp: int
    fn: int
    tn: int

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                      self.tn + other.tn)


@dataclass(frozen=True)
class RankingCurve:
    """Cumulative true and false positives at every distinct score, highest score first.

    ``tps[i]``/``fps[i]`` count the pixels with score ``>= thresholds[i]`` (scikit-learn's
    ``_binary_clf_curve``).
    """

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray

    @property
    def positives(self) -> int:
        return int(self.tps[-1])

    @property
    def negatives(self) -> int:
        return int(self.fps[-1])


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def confusion_counts(predicted: np.ndarray, truth: np.ndarray) -> Counts:
    """Counts of two same-shape boolean arrays (predicted positive, truly positive)."""
    predicted = np.asarray(predicted, bool)
    truth = np.asarray(truth, bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"shapes differ: {predicted.shape} vs {truth.shape}")
    tp = int(np.count_nonzero(predicted & truth))
    n_pred = int(np.count_nonzero(predicted))
    n_true = int(np.count_nonzero(truth))
    return Counts(tp=tp, fp=n_pred - tp, fn=n_true - tp, tn=truth.size - n_pred - n_true + tp)


def counts_metrics(counts: Counts) -> dict[str, float]:
    """F1 (= Dice), IoU (Jaccard), precision, recall (sensitivity), specificity, accuracy."""
    tp, fp, fn, tn = counts.tp, counts.fp, counts.fn, counts.tn
    return {
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
    }


def ranking_curve(scores: np.ndarray, truth: np.ndarray) -> RankingCurve:
    """One descending sort of the scores: the basis of every threshold-free metric."""
    scores = np.asarray(scores).ravel()
    truth = np.asarray(truth, bool).ravel()
    if scores.shape != truth.shape:
        raise ValueError(f"shapes differ: {scores.shape} vs {truth.shape}")
    order = np.argsort(scores, kind="stable")[::-1]
    scores = scores[order]
    truth = truth[order]
    if scores.size == 0:
        raise ValueError("no pixels to rank")
    last_of_each_value = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(truth, dtype=np.int64)[last_of_each_value]
    fps = last_of_each_value + 1 - tps
    return RankingCurve(thresholds=scores[last_of_each_value], tps=tps, fps=fps)


def roc_auc(curve: RankingCurve) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); NaN with one class only."""
    if curve.positives == 0 or curve.negatives == 0:
        return float("nan")
    tpr = np.r_[0.0, curve.tps / curve.positives]
    fpr = np.r_[0.0, curve.fps / curve.negatives]
    return float(np.trapezoid(tpr, fpr))


def average_precision(curve: RankingCurve) -> float:
    """Area under the precision-recall curve as a step sum (``average_precision_score``).

    The step sum, not the trapezoid, because linear interpolation between PR points is
    optimistic (Davis & Goadrich 2006); NaN without positives.
    """
    if curve.positives == 0:
        return float("nan")
    precision = curve.tps / (curve.tps + curve.fps)
    recall_steps = np.diff(np.r_[0.0, curve.tps / curve.positives])
    return float(np.sum(recall_steps * precision))


def best_f1_threshold(curve: RankingCurve) -> tuple[float, float]:
    """(threshold, F1) of the threshold that maximises F1; the highest such threshold on ties."""
    if curve.positives == 0:
        return 0.5, 0.0
    f1 = 2 * curve.tps / (curve.tps + curve.fps + curve.positives)
    best = int(np.argmax(f1))
    return float(curve.thresholds[best]), float(f1[best])


def pixel_metrics(scores: np.ndarray, truth: np.ndarray, threshold: float) -> tuple[dict, Counts]:
    """Every metric of one set of pixels at ``threshold``: ranking metrics and confusion metrics."""
    curve = ranking_curve(scores, truth)
    counts = confusion_counts(np.asarray(scores) >= threshold, truth)
    metrics = {"auc_roc": roc_auc(curve), "auc_pr": average_precision(curve)}
    metrics.update(counts_metrics(counts))
    return metrics, counts


def curve_points(curve: RankingCurve, max_points: int = 200) -> dict[str, np.ndarray]:
    """ROC and PR points at about ``max_points`` thresholds spread evenly along the ROC curve.

    Millions of distinct scores make plots that nobody can render; sampling where
    ``fpr + tpr`` advances keeps both curves' shape, including both ends.
    """
    if curve.positives == 0 or curve.negatives == 0:
        empty = np.zeros(0)
        return {"threshold": empty, "fpr": empty, "tpr": empty, "precision": empty}
    tpr = curve.tps / curve.positives
    fpr = curve.fps / curve.negatives
    progress = tpr + fpr
    picks = np.searchsorted(progress, np.linspace(0.0, progress[-1], max_points))
    picks = np.unique(np.r_[0, np.clip(picks, 0, progress.size - 1), progress.size - 1])
    return {
        "threshold": curve.thresholds[picks],
        "fpr": fpr[picks],
        "tpr": tpr[picks],
        "precision": curve.tps[picks] / (curve.tps[picks] + curve.fps[picks]),
    }


#: ISBI 2012's 10 levels, as thresholds on the membrane probability (membrane at p >= t): the
#: challenge binarised the submitted non-membrane map at 0.0, 0.1, ..., 0.9, i.e. at 1 - t.
ISBI_SWEEP_THRESHOLDS = tuple(round(1.0 - level / 10, 1) for level in range(10))


def isbi_swept_errors(probabilities: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """ISBI 2012's errors scored as the challenge scored a probability map: best of 10 thresholds.

    The organisers binarised each submission at 10 levels and reported every error's minimum
    over them (the U-Net paper: "thresholding the map at 10 different levels"; Fiji's
    ``trainableSegmentation.metrics``), so the threshold is picked on the test labels, as it was
    for every leaderboard entry, unlike the rest of ``metrics.json``. Two pixel errors, because
    the organisers describe it both ways: ``pixel_error_swept``, the smallest fraction of pixels
    whose class differs (the squared Euclidean distance of the binary labels), with its
    ``pixel_error_swept_threshold``; and ``pixel_error_fscore``, 1 - the best F-score of the
    non-membrane pixels (``PixelError.getPixelErrorMaximalFScore``, whose positives are the
    labels' white, non-membrane pixels). ``rand_error_swept``: the smallest mean of
    :func:`rand_error` over the slices. Slices are pooled (they have one size, as ISBI's).
    """
    membrane = np.concatenate([np.ravel(t).astype(bool) for t in truths])
    scores = np.concatenate([np.ravel(p) for p in probabilities])
    pixel_errors, fscores, rand_errors = [], [], []
    for threshold in ISBI_SWEEP_THRESHOLDS:
        cell = counts_metrics(confusion_counts(scores < threshold, ~membrane))
        pixel_errors.append(1.0 - cell["accuracy"])
        fscores.append(cell["f1"])
        rand_errors.append(float(np.mean([rand_error(p, t, threshold)
                                          for p, t in zip(probabilities, truths, strict=True)])))
    best = int(np.argmin(pixel_errors))
    return {"pixel_error_swept": pixel_errors[best],
            "pixel_error_swept_threshold": ISBI_SWEEP_THRESHOLDS[best],
            "pixel_error_fscore": 1.0 - max(fscores), "rand_error_swept": min(rand_errors)}


def rand_error(probability: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    """ISBI 2012's adapted Rand error of one slice whose foreground is the membrane.

    Cells are the 4-connected components of non-membrane pixels, in the truth and in the map
    binarised at ``threshold``; scikit-image's ``adapted_rand_error`` (the SNEMI3D definition the
    ISBI 2012 leaderboard reports, 1 - Rand F-score) scores the two labelings, ignoring the
    truth's membrane pixels. The challenge thins membranes and sweeps thresholds first, so this is
    a like-for-like estimate on held-out slices, not the leaderboard's exact number.
    """
    from scipy import ndimage
    from skimage.metrics import adapted_rand_error

    true_cells, _ = ndimage.label(~truth.astype(bool))
    predicted_cells, _ = ndimage.label(probability < threshold)
    return float(adapted_rand_error(true_cells, predicted_cells)[0])
