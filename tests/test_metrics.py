"""Every metric against scikit-learn's definition, on random maps and masks."""

import numpy as np
import pytest
from sklearn import metrics as skm

from unetops.metrics import (average_precision, best_f1_threshold, confusion_counts, counts_metrics,
                             curve_points, isbi_swept_errors, pixel_metrics, rand_error,
                             ranking_curve, roc_auc)


@pytest.fixture(params=[0, 1, 2])
def scores_truth(request):
    rng = np.random.default_rng(request.param)
    truth = rng.random(3000) < 0.2
    scores = np.clip(truth * 0.3 + rng.random(3000) * 0.8, 0, 1)
    scores = np.round(scores, 2 + request.param)  # many ties for seed 0
    return scores.astype(np.float32), truth


def test_ranking_metrics_equal_sklearn(scores_truth):
    scores, truth = scores_truth
    curve = ranking_curve(scores, truth)
    assert roc_auc(curve) == pytest.approx(skm.roc_auc_score(truth, scores), abs=1e-9)
    assert average_precision(curve) == pytest.approx(
        skm.average_precision_score(truth, scores), abs=1e-9)


@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.77])
def test_confusion_metrics_equal_sklearn(scores_truth, threshold):
    scores, truth = scores_truth
    predicted = scores >= threshold
    got = counts_metrics(confusion_counts(predicted, truth))
    tn, fp, fn, tp = skm.confusion_matrix(truth, predicted, labels=[False, True]).ravel()
    expected = {
        "f1": skm.f1_score(truth, predicted),
        "iou": skm.jaccard_score(truth, predicted),
        "precision": skm.precision_score(truth, predicted, zero_division=0),
        "recall": skm.recall_score(truth, predicted),
        "specificity": skm.recall_score(~truth, ~predicted),
        "accuracy": skm.accuracy_score(truth, predicted),
    }
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-9), name
    counts = confusion_counts(predicted, truth)
    assert (counts.tp, counts.fp, counts.fn, counts.tn) == (tp, fp, fn, tn)


def test_pixel_metrics_binarise_at_the_threshold_inclusive():
    scores = np.array([0.2, 0.5, 0.5, 0.9])
    truth = np.array([0, 1, 0, 1], bool)
    metrics, counts = pixel_metrics(scores, truth, 0.5)
    assert (counts.tp, counts.fp, counts.fn, counts.tn) == (2, 1, 0, 1)
    assert metrics["precision"] == pytest.approx(2 / 3)


def test_best_f1_threshold_is_the_f1_maximum_over_all_thresholds(scores_truth):
    scores, truth = scores_truth
    threshold, f1 = best_f1_threshold(ranking_curve(scores, truth))
    assert f1 == pytest.approx(skm.f1_score(truth, scores >= threshold), abs=1e-9)
    predicted = scores[None, :] >= np.unique(scores)[:, None]  # every threshold at once
    tp = (predicted & truth).sum(axis=1)
    brute = np.max(2 * tp / (predicted.sum(axis=1) + truth.sum()))
    assert f1 == pytest.approx(brute, abs=1e-9)


def test_zero_denominators_and_single_class():
    truth = np.zeros(10, bool)
    scores = np.linspace(0, 0.4, 10)
    metrics, _ = pixel_metrics(scores, truth, 0.5)
    assert np.isnan(metrics["auc_roc"]) and np.isnan(metrics["auc_pr"])
    assert metrics["precision"] == 0.0 and metrics["f1"] == 0.0 and metrics["specificity"] == 1.0
    assert best_f1_threshold(ranking_curve(scores, truth)) == (0.5, 0.0)


def test_curve_points_are_few_and_lie_on_sklearns_curves(scores_truth):
    scores, truth = scores_truth
    points = curve_points(ranking_curve(scores, truth), max_points=50)
    assert 2 <= points["fpr"].size <= 52
    fpr, tpr, thresholds = skm.roc_curve(truth, scores, drop_intermediate=False)
    lookup = {float(t): (f, r) for f, r, t in zip(fpr, tpr, thresholds, strict=True)}
    for t, f, r in zip(points["threshold"], points["fpr"], points["tpr"], strict=True):
        assert lookup[float(t)] == pytest.approx((f, r), abs=1e-12)
    assert points["tpr"][-1] == 1.0 and points["fpr"][-1] == 1.0
    assert np.all(np.diff(points["fpr"]) >= 0)


def membrane_grid(size=32, step=8):
    """Square cells separated by 1-px membranes (membrane = 1, the foreground, as ISBI's masks)."""
    truth = np.zeros((size, size), bool)
    truth[::step, :] = truth[:, ::step] = True
    return truth


def test_rand_error_is_zero_for_the_truth_and_grows_when_cells_merge():
    truth = membrane_grid()
    assert rand_error(truth.astype(np.float32), truth) == pytest.approx(0.0)
    merged = truth.astype(np.float32)
    merged[8, :] = 0.0                                     # one membrane missed: cells fuse
    one = rand_error(merged, truth)
    merged[16, :] = 0.0
    assert 0.0 < one < rand_error(merged, truth) <= 1.0


def test_isbi_swept_errors_take_the_best_of_the_challenges_ten_thresholds():
    truth = membrane_grid()
    faint = np.where(truth, 0.35, 0.2)            # right at 0.3 or 0.4, all-cell at 0.5
    swept = isbi_swept_errors([faint, faint], [truth, truth])
    assert swept["pixel_error_swept"] == 0.0 and swept["pixel_error_fscore"] == 0.0
    assert swept["pixel_error_swept_threshold"] in (0.3, 0.4)
    assert swept["rand_error_swept"] == pytest.approx(0.0)
    assert rand_error(faint, truth) > 0.5                   # at 0.5 every cell fuses into one


def test_isbi_swept_errors_match_scikit_learn_at_every_level():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(3)
    truths = [membrane_grid() for _ in range(2)]
    maps = [np.clip(t * 0.6 + rng.normal(0.2, 0.2, t.shape), 0, 1) for t in truths]
    swept = isbi_swept_errors(maps, truths)
    cells = ~np.concatenate([t.ravel() for t in truths])
    scores = np.concatenate([m.ravel() for m in maps])
    levels = [level / 10 for level in range(10)]                # the challenge's, on 1 - p
    errors = [1 - accuracy_score(cells, (1 - scores) > level) for level in levels]
    fscores = [f1_score(cells, (1 - scores) > level) for level in levels]
    assert swept["pixel_error_swept"] == pytest.approx(min(errors), abs=1e-12)
    assert swept["pixel_error_fscore"] == pytest.approx(1 - max(fscores), abs=1e-12)
    assert swept["pixel_error_swept_threshold"] == pytest.approx(1 - levels[int(np.argmin(errors))])
    assert 0 < swept["pixel_error_swept"] < 1 - accuracy_score(~cells, scores >= 0.5) + 1e-12
