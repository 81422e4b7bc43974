"""The evaluate stage: protocol (thresholds, FOV, seed 000), outputs, MLflow run and champion."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from unetops.io import read_image, save_arrays, write_csv, write_png
from unetops.stages import evaluate
from unetops.stages.evaluate import CaseResult, seed000_counts, summarize

KEYS = ("auc_roc", "auc_pr", "f1", "iou", "precision", "recall", "specificity", "accuracy",
        "threshold")


def case(name, subset, probability, truth, fov=None):
    probability = np.asarray(probability, np.float32)
    truth = np.asarray(truth, bool)
    fov = np.ones(truth.shape, bool) if fov is None else np.asarray(fov, bool)
    return CaseResult(name, subset, probability, truth, fov)


def test_threshold_is_chosen_on_validation_never_on_test():
    truth = np.array([[1, 1, 0, 0]])
    results = [case("v", "val", [[0.35, 0.4, 0.2, 0.1]], truth),      # val's best: 0.35 (F1 1)
               case("t", "test", [[0.85, 0.9, 0.6, 0.4]], truth)]     # test's best would be 0.85
    metrics = summarize(results, "drive")["metrics"]
    block = metrics["val_best_threshold"]
    assert block["threshold"] == pytest.approx(0.35)
    assert block["val_f1"] == pytest.approx(1.0)
    assert block["f1"] == pytest.approx(skm.f1_score([1, 1, 0, 0], [1, 1, 1, 1]))  # 0.35 on test
    assert metrics["threshold"] == 0.5
    assert metrics["f1"] == pytest.approx(skm.f1_score([1, 1, 0, 0], [1, 1, 1, 0]))


def test_pooled_fov_metrics_equal_sklearn_and_ignore_pixels_outside_the_fov():
    rng = np.random.default_rng(0)
    results = []
    for i, subset in enumerate(["val", "test", "test", "val", "test"]):
        truth = rng.random((20, 30)) < 0.15
        probability = np.clip(truth * 0.4 + rng.random((20, 30)) * 0.7, 0, 1)
        fov = np.zeros((20, 30), bool)
        fov[2:18, 3:27] = True
        probability[~fov] = 1.0 - truth[~fov]  # outside the FOV: all wrong, must not count
        results.append(case(f"c{i}", subset, probability, truth, fov))
    summary = summarize(results, "drive", n_curve_points=40)
    metrics = summary["metrics"]
    test = [r for r in results if r.subset == "test"]
    scores = np.concatenate([r.probability[r.fov] for r in test])
    truth = np.concatenate([r.truth[r.fov] for r in test])
    assert metrics["auc_roc"] == pytest.approx(skm.roc_auc_score(truth, scores), abs=1e-9)
    assert metrics["auc_pr"] == pytest.approx(skm.average_precision_score(truth, scores), abs=1e-9)
    assert metrics["iou"] == pytest.approx(skm.jaccard_score(truth, scores >= 0.5), abs=1e-9)
    assert metrics["specificity"] == pytest.approx(skm.recall_score(~truth, scores < 0.5), abs=1e-9)
    assert set(KEYS) <= set(metrics) and "seed000" not in metrics
    table = summary["per_image"]
    assert len(table) == 2 * len(results)
    fixed = table[(table.subset == "test") & (table.protocol == "fov@0.5")]
    assert metrics["per_image"]["f1_mean"] == pytest.approx(fixed.f1.mean())
    assert metrics["per_image"]["f1_sd"] == pytest.approx(np.std(fixed.f1, ddof=1))
    assert 2 <= len(summary["roc"]) <= 42
    assert list(summary["pr"].columns)[:2] == ["recall", "precision"]
    assert metrics["n_images"] == {"val": 2, "test": 3}


def test_seed000_protocol_uses_all_pixels_at_512_and_threshold_0_1():
    truth = np.zeros((64, 80), bool)
    truth[10:30, 20:60] = True
    perfect = seed000_counts(np.where(truth, 0.2, 0.05), truth)  # 0.2 > 0.1: positive
    assert perfect.fp == 0 and perfect.fn == 0 and perfect.tp + perfect.tn == 512 * 512
    fov = np.zeros_like(truth)
    fov[:32] = True
    results = [case("a", "test", np.where(truth, 0.2, 0.05), truth, fov),
               case("b", "val", np.where(truth, 0.9, 0.0), truth, fov)]
    metrics = summarize(results, "stare")["metrics"]
    assert metrics["seed000"]["f1"] == pytest.approx(1.0)
    assert metrics["seed000"]["threshold"] == 0.1 and metrics["seed000"]["size"] == 512


def test_isbi2012_reports_pixel_error_and_rand_error_of_the_test_slices():
    truth = np.zeros((32, 32), bool)
    truth[::8, :] = truth[:, ::8] = True
    missed = truth.astype(np.float32)
    missed[8, :] = 0.0
    results = [case("s0", "test", truth.astype(np.float32), truth), case("s1", "test", missed, truth)]
    metrics = summarize(results, "isbi2012")["metrics"]
    block = metrics["isbi2012"]
    wrong = 32 / (2 * 32 * 32)
    assert block["pixel_error"] == pytest.approx(wrong)
    assert block["pixel_error"] == pytest.approx(1 - metrics["accuracy"])
    assert block["foreground_f1"] == metrics["f1"]
    assert 0 < block["rand_error"] < 0.5
    assert block["pixel_error_swept"] == pytest.approx(wrong)        # binary maps: any level
    assert block["pixel_error_fscore"] > 0 and block["rand_error_swept"] <= block["rand_error"]
    assert "isbi2012" not in summarize(results, "drive")["metrics"]


def test_no_validation_cases_reports_threshold_05_only():
    truth = np.array([[1, 0, 1, 0]])
    metrics = summarize([case("t", "test", [[0.9, 0.1, 0.4, 0.6]], truth)], "drive")["metrics"]
    assert "val_best_threshold" not in metrics and "val" not in metrics
    assert metrics["per_image"]["f1_sd"] is None  # one image has no SD (JSON null, not NaN)


# --- the stage on a tiny project ----------------------------------------------------------------

def tiny_model():
    import keras

    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid",
                                  kernel_initializer=keras.initializers.Constant(10.0),
                                  bias_initializer=keras.initializers.Constant(-4.5))(inputs)
    return keras.Model(inputs, outputs)


def write_tiny_project(cfg, n_cases=5, size=32):
    """Raw PNGs, FOV, split.csv and npz (one case stored at half size) for a 32×32 dataset."""
    rng = np.random.default_rng(0)
    rows = []
    subsets = ["val", "val", "test", "test", "test", "train"][:n_cases]
    for i, subset in enumerate(subsets):
        name = f"im{i}"
        truth = rng.random((size, size)) < 0.2
        image = np.where(truth, 200, 40).astype(np.uint8) + rng.integers(0, 30, (size, size),
                                                                          dtype=np.uint8)
        fov = np.ones((size, size), bool)
        fov[:3] = False
        paths = {"image": f"data/raw/images/{name}.png", "mask": f"data/raw/masks/{name}.png",
                 "fov": f"data/fov/{name}.png"}
        write_png(cfg.paths.abs(paths["image"]), np.dstack([image] * 3))
        write_png(cfg.paths.abs(paths["mask"]), truth)
        write_png(cfg.paths.abs(paths["fov"]), fov)
        stored = image.astype(np.float32)[..., None] / 255 * fov[..., None]
        if i == 2:  # as if preprocess.resize_max_side had halved it
            stored = stored[::2, ::2]
        save_arrays(cfg.paths.preprocessed / f"{name}.npz", image=stored,
                    mask=truth.astype(np.uint8), fov=fov.astype(np.uint8))
        rows.append({"case": name, "subset": subset, **paths})
    write_csv(cfg.paths.split_csv, pd.DataFrame(rows))
    return rows


def start_training_run(cfg, model, log_model=True):
    import mlflow

    from unetops import tracking

    cfg.paths.models.mkdir(parents=True, exist_ok=True)
    model.save(cfg.paths.model)
    tracking.setup(cfg)
    with mlflow.start_run() as run:
        mlflow.log_param("stage", "train")
        if log_model:
            mlflow.keras.log_model(model, name="model",  # as train does: logged and registered
                                   pip_requirements=evaluate.model_requirements(),
                                   registered_model_name=cfg.mlflow.register_model)
    tracking.write_run_id(cfg, run.info.run_id)
    return run.info.run_id


@pytest.fixture
def tiny_project(project):
    cfg = project(data={"dataset": "stare"}, evaluate={"tile": 32, "curve_points": 50})
    write_tiny_project(cfg)
    return cfg


@pytest.mark.slow
def test_evaluate_writes_every_output_and_logs_to_the_training_run(tiny_project):
    import mlflow
    from mlflow import MlflowClient

    cfg = tiny_project
    model = tiny_model()
    run_id = start_training_run(cfg, model)
    evaluate.run(cfg)

    for name in ("im0", "im1", "im2", "im3", "im4"):
        stored = read_image(cfg.paths.predictions / f"{name}.png")
        assert stored.dtype == np.uint16 and stored.shape == (32, 32)
        assert (stored[:3] == 0).all()  # outside the FOV
    assert not (cfg.paths.predictions / "im5.png").exists()  # train cases are not evaluated
    assert sorted(p.name for p in (cfg.paths.reports / "overlays").iterdir()) == \
        ["im2.png", "im3.png", "im4.png"]
    assert read_image(cfg.paths.reports / "overlays" / "im2.png").shape == (32, 32, 3)
    metrics = json.loads(cfg.paths.metrics.read_text())
    assert set(KEYS) <= set(metrics)
    assert {"val_best_threshold", "val", "per_image", "seed000"} <= set(metrics)
    assert metrics["auc_roc"] > 0.9
    per_image = pd.read_csv(cfg.paths.per_image)
    assert set(per_image.protocol) == {"fov@0.5", "fov@val_best", "seed000"}
    assert set(per_image.case) == {"im0", "im1", "im2", "im3", "im4"}
    roc = pd.read_csv(cfg.paths.reports / "roc.csv")
    pr = pd.read_csv(cfg.paths.reports / "pr.csv")
    assert list(roc.columns) == ["fpr", "tpr", "threshold"] and len(roc) >= 2
    assert list(pr.columns) == ["recall", "precision", "threshold"]

    client = MlflowClient()
    logged = client.get_run(run_id).data.metrics
    assert logged["eval_test_f1"] == pytest.approx(metrics["f1"])
    assert logged["eval_seed000_f1"] == pytest.approx(metrics["seed000"]["f1"])
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluate")}
    assert {"evaluate/metrics.json", "evaluate/roc.png", "evaluate/overlays"} <= artifacts
    champion = client.get_model_version_by_alias("unetops", "champion")
    assert champion.run_id == run_id
    assert float(champion.tags["val_f1"]) == pytest.approx(metrics["val"]["f1"])

    evaluate.run(cfg)  # re-evaluating the same run registers no second version
    assert len(client.search_model_versions("name = 'unetops'")) == 1

    # users load the champion by alias
    from unetops.predict import load_model
    loaded = load_model("models:/unetops@champion", cfg)
    x = np.random.default_rng(1).random((1, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    assert mlflow.active_run() is None


@pytest.mark.slow
def test_champion_moves_only_when_validation_beats_it(tiny_project):
    import mlflow
    from mlflow import MlflowClient

    cfg = tiny_project
    first = start_training_run(cfg, tiny_model())
    evaluate.run(cfg)
    client = MlflowClient()  # after tracking.setup: this test's store
    champion_f1 = float(client.get_model_version_by_alias("unetops", "champion").tags["val_f1"])

    def challenger(val_f1):
        run_id = start_training_run(cfg, tiny_model(), log_model=False)
        with mlflow.start_run(run_id=run_id):
            return evaluate.promote(cfg, run_id, {"f1": val_f1}, tiny_model())

    worse = challenger(champion_f1 - 0.1)
    assert worse == client.get_model_version_by_alias("unetops", "champion").version
    assert client.get_model_version_by_alias("unetops", "champion").run_id == first
    assert challenger(champion_f1) is not None  # a tie does not move it either
    assert client.get_model_version_by_alias("unetops", "champion").run_id == first
    better = challenger(champion_f1 + 0.01)
    assert client.get_model_version_by_alias("unetops", "champion").version == better
    assert len(client.search_model_versions("name = 'unetops'")) == 4


def test_missing_model_and_missing_npz_are_one_line_errors(tiny_project):
    from unetops.errors import UnetopsError

    cfg = tiny_project
    with pytest.raises(UnetopsError, match=r"^models/model.keras: file not found"):
        evaluate.run(cfg)
    cfg.paths.models.mkdir(parents=True, exist_ok=True)
    tiny_model().save(cfg.paths.model)
    (cfg.paths.preprocessed / "im3.npz").unlink()
    with pytest.raises(UnetopsError, match=r"^data/preprocessed/im3.npz: file not found"):
        evaluate.run(cfg)
