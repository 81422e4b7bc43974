"""Each loss on known arrays: perfect predictions score their minimum; Dice of disjoint masks ≈ 1."""

import keras
import numpy as np
import pytest

from unetops.errors import UnetopsError
from unetops.losses import (F1Score, LastMap, bce, bce_dice, make_loss, on_every_map, soft_dice,
                             tversky, weighted_bce)


def masks(n=2, size=8):
    truth = np.zeros((n, size, size, 1), np.float32)
    truth[:, 2:5, 3:7] = 1.0
    return truth


def value(tensor) -> np.ndarray:
    return keras.ops.convert_to_numpy(tensor)


def test_bce_is_per_pixel_and_near_zero_for_a_perfect_prediction():
    truth = masks()
    loss = value(bce(truth, truth))
    assert loss.shape == (2, 8, 8)
    assert loss.max() < 1e-5
    assert value(bce(truth, 1.0 - truth)).min() > 10.0


def test_bce_at_one_half_is_log_two():
    truth = masks()
    np.testing.assert_allclose(value(bce(truth, np.full_like(truth, 0.5))), np.log(2.0), rtol=1e-5)


def test_weighted_bce_scales_only_vessel_pixels():
    truth = masks()
    half = np.full_like(truth, 0.5)
    plain, weighted = value(bce(truth, half)), value(weighted_bce(4.0)(truth, half))
    vessel = truth[..., 0] > 0
    np.testing.assert_allclose(weighted[vessel], 4.0 * plain[vessel], rtol=1e-6)
    np.testing.assert_allclose(weighted[~vessel], plain[~vessel], rtol=1e-6)


def test_weight_map_loss_is_bce_weighted_per_pixel():
    truth = masks(n=1)
    prediction = np.full_like(truth, 0.3)
    weights = np.ones(truth.shape[:3], np.float32)
    weights[0, 0, 0] = 100.0
    identity = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Identity()])
    identity.compile(loss=make_loss("weight_map"))  # the path Keras takes in fit()
    loss = identity.evaluate(prediction, truth, sample_weight=weights, verbose=0)
    expected = (value(bce(truth, prediction)) * weights).mean()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert loss > 2 * value(bce(truth, prediction)).mean()


def test_dice_is_zero_when_perfect_and_about_one_for_disjoint_masks():
    truth = masks()
    assert value(soft_dice(truth, truth)).shape == (2,)
    np.testing.assert_allclose(value(soft_dice(truth, truth)), 0.0, atol=1e-6)
    disjoint = 1.0 - truth
    np.testing.assert_allclose(value(soft_dice(truth, disjoint)), 1.0, atol=0.02)
    empty = np.zeros_like(truth)
    np.testing.assert_allclose(value(soft_dice(empty, empty)), 0.0, atol=1e-6)


def test_bce_dice_is_the_sum_and_minimal_when_perfect():
    truth = masks()
    prediction = np.clip(truth + 0.2, 0, 1) * 0.9
    expected = value(bce(truth, prediction)).mean(axis=(1, 2)) + value(soft_dice(truth, prediction))
    np.testing.assert_allclose(value(bce_dice(truth, prediction)), expected, rtol=1e-5)
    assert value(bce_dice(truth, truth)).max() < 1e-5


def test_tversky_at_one_half_is_dice_and_beta_weighs_false_negatives():
    truth = masks()
    prediction = np.clip(truth + 0.2, 0, 1) * 0.9
    np.testing.assert_allclose(value(tversky(0.5)(truth, prediction)),
                               value(soft_dice(truth, prediction)), rtol=1e-6)
    np.testing.assert_allclose(value(tversky(0.7)(truth, truth)), 0.0, atol=1e-6)
    missed = truth.copy()
    missed[:, 2] = 0.0  # one row of vessel pixels missed: false negatives only
    extra = truth.copy()
    extra[:, 0, :4] = 1.0  # as many background pixels added: false positives only
    assert value(tversky(0.7)(truth, missed)).mean() > value(tversky(0.7)(truth, extra)).mean()
    assert value(tversky(0.3)(truth, missed)).mean() < value(tversky(0.3)(truth, extra)).mean()


def test_make_loss_passes_beta_and_adds_bce():
    truth = masks()
    prediction = np.clip(truth + 0.2, 0, 1) * 0.9
    expected = (value(bce(truth, prediction)).mean(axis=(1, 2))
                + value(tversky(0.8)(truth, prediction)))
    np.testing.assert_allclose(value(make_loss("bce_tversky", tversky_beta=0.8)(truth, prediction)),
                               expected, rtol=1e-5)
    np.testing.assert_allclose(value(make_loss("tversky", tversky_beta=0.8)(truth, prediction)),
                               value(tversky(0.8)(truth, prediction)), rtol=1e-6)
    np.testing.assert_allclose(value(make_loss("dice", tversky_beta=0.8)(truth, prediction)),
                               value(soft_dice(truth, prediction)), rtol=1e-6)


def test_batch_dice_scores_the_batch_as_one_image():
    truth = masks()
    truth[1] = 0.0  # a patch without vessels
    prediction = truth.copy()
    prediction[1, 0, 0] = 0.5  # one weak false alarm on it
    per_patch = value(make_loss("dice")(truth, prediction))
    assert per_patch[0] < 1e-6 and per_patch[1] > 0.3  # the empty patch dominates
    pooled = value(make_loss("dice", batch_dice=True)(truth, prediction))
    assert pooled.shape == (2,) and pooled[0] == pooled[1]
    whole = value(soft_dice(truth.reshape(1, 16, 8, 1), prediction.reshape(1, 16, 8, 1)))
    np.testing.assert_allclose(pooled, whole[0], rtol=1e-6)
    assert pooled[0] < 0.05


def test_unknown_loss_is_a_user_error():
    with pytest.raises(UnetopsError, match="train.loss"):
        make_loss("focal")


def test_f1_pools_counts_and_honours_pixel_weights():
    truth = np.array([1, 1, 1, 0, 0], np.float32).reshape(1, 1, 5, 1)
    prediction = np.array([0.9, 0.8, 0.1, 0.7, 0.2], np.float32).reshape(1, 1, 5, 1)
    metric = F1Score()
    metric.update_state(truth, prediction)  # tp 2, fn 1, fp 1
    assert float(metric.result()) == pytest.approx(4 / 6)
    metric.reset_state()
    metric.update_state(truth, prediction, sample_weight=np.array([[[1, 1, 0, 0, 1]]], np.float32))
    assert float(metric.result()) == pytest.approx(1.0)


def test_every_map_loss_averages_each_map_against_the_mask_and_metrics_read_the_last():
    truth = masks()
    rng = np.random.default_rng(1)
    first, second = (rng.random(truth.shape).astype(np.float32) for _ in range(2))
    stacked = np.concatenate([first, second], axis=-1)
    for loss in (bce, make_loss("bce_tversky", tversky_beta=0.6)):
        expected = (value(loss(truth, first)) + value(loss(truth, second))) / 2
        np.testing.assert_allclose(value(on_every_map(loss)(truth, stacked)), expected, rtol=1e-6)
    metric, reference = LastMap(F1Score()), F1Score()
    assert metric.name == "f1"
    metric.update_state(truth, stacked)
    reference.update_state(truth, second)
    assert float(metric.result()) == pytest.approx(float(reference.result()))
    metric.reset_state()
    assert float(metric.result()) == 0.0
