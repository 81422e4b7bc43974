"""Stage ``evaluate``: whole-image probabilities of validation and test, metrics of record, MLflow.

Protocol of record (DESIGN §4): each case's preprocessed image goes through overlap-tile
prediction (:class:`unetops.predict.Predictor`) and is resized back to the image's native size
(``data/split.csv``'s image, mask and FOV files); probabilities outside the FOV are set to 0.
Metrics count pixels inside the FOV, pooled over all images of a subset: AUC-ROC, AUC-PR
(average precision), and F1 (Dice), IoU, precision, recall (sensitivity), specificity, accuracy
of the map binarised at p >= threshold, for two thresholds:

- 0.5, the top-level keys of ``reports/metrics.json`` (``threshold: 0.5``);
- the threshold that maximises F1 on the pooled *validation* pixels, applied unchanged to test
  (``val_best_threshold`` block). Test pixels never choose anything (but in ISBI 2012's swept
  errors, below, which reproduce the challenge's own rule).

Beside them: ``per_image`` (mean and sample SD over test images, FOV, 0.5), ``val`` (validation
metrics at 0.5; ``evaluate.champion_metric`` of it decides promotion) and, for STARE, ``seed000``:
seed 000's protocol — prediction and ground truth resized to 512×512 (area interpolation), the
prediction binarised at p > 0.1, the resized truth min-max scaled and binarised at > 0.1, all
pixels (no FOV), precision, recall, IoU, accuracy and F1 per image, then averaged. For ISBI 2012,
``isbi2012``: pixel error, adapted Rand error and membrane F1 on the held-out slices at 0.5, and
the pixel and Rand errors the way the challenge scored them, best of 10 thresholds chosen on the
test labels (:func:`isbi_metrics`).

Outputs: ``data/predictions/<case>.png`` (16-bit, round(p × 65535), native size; validation and
test cases), ``reports/metrics.json``, ``reports/per_image.csv`` (one row per case and protocol),
``reports/roc.csv`` and ``reports/pr.csv`` (test, FOV, pooled; ~``curve_points`` points for DVC
plots) and ``reports/overlays/<case>.png`` (test cases at 0.5 on the dimmed image: white = true
positive, magenta = missed vessel, green = false alarm; a colour-blind-safe pair).

Everything is logged to the training run (``models/mlflow_run.json``), and the model becomes the
registry's ``champion`` (model ``mlflow.register_model``) only when its validation metric beats the
current champion's (see :func:`promote`).
"""

import math
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

from unetops.config import Config
from unetops.console import log, track
from unetops.errors import UnetopsError
from unetops.io import (atomic_dir, load_arrays, read_image, read_mask, write_csv, write_json,
                        write_png)
from unetops.metrics import (ALL_METRICS, THRESHOLD_METRICS, Counts, average_precision,
                             best_f1_threshold, confusion_counts, counts_metrics, curve_points,
                             isbi_swept_errors, rand_error, ranking_curve, roc_auc)
from unetops.overlays import error_overlay
from unetops.predict import Predictor, load_model, probability_to_uint16, resize_probability
from unetops.preprocessing import read_split

FIXED_THRESHOLD = 0.5
SEED000_SIZE = 512
SEED000_THRESHOLD = 0.1
SEED000_METRICS = ("precision", "recall", "iou", "accuracy", "f1")
CHAMPION_ALIAS = "champion"
PER_IMAGE_COLUMNS = [
    "case", "subset", "protocol", "threshold", *ALL_METRICS, "tp", "fp", "fn", "tn"]


@dataclass
class CaseResult:
    """One case at native size: probability map, ground truth and FOV."""

    case: str
    subset: str
    probability: np.ndarray
    truth: np.ndarray
    fov: np.ndarray


# --- prediction (I/O at the edge) ---------------------------------------------------------------

def predict_case(row, predictor: Predictor, cfg: Config) -> CaseResult:
    npz = cfg.paths.preprocessed / f"{row.case}.npz"
    if not npz.is_file():
        raise UnetopsError(f"{cfg.paths.rel(npz)}: file not found (run unetops preprocess first)")
    image = load_arrays(npz)["image"]
    truth = read_mask(cfg.paths.abs(row.mask))
    fov = read_mask(cfg.paths.abs(row.fov)) if row.fov else np.ones(truth.shape, bool)
    if fov.shape != truth.shape:
        raise UnetopsError(f"{row.fov}: shape {fov.shape} differs from the mask's {truth.shape}")
    probability = resize_probability(predictor(image), truth.shape)
    return CaseResult(row.case, row.subset, np.where(fov, probability, np.float32(0.0)), truth, fov)


# --- metrics (pure numpy) -----------------------------------------------------------------------

def pooled(results: list[CaseResult], subset: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores and truth of every FOV pixel of ``subset``, concatenated over its cases."""
    chosen = [r for r in results if r.subset == subset]
    if not chosen:
        return np.zeros(0, np.float32), np.zeros(0, bool)
    return (np.concatenate([r.probability[r.fov] for r in chosen]),
            np.concatenate([r.truth[r.fov] for r in chosen]))


def seed000_counts(probability: np.ndarray, truth: np.ndarray) -> Counts:
    """Seed 000's counts: 512×512, prediction > 0.1, min-max-scaled truth > 0.1, all pixels."""
    size = (SEED000_SIZE, SEED000_SIZE)
    predicted = cv2.resize(probability.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    resized = cv2.resize(truth.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    low, high = float(resized.min()), float(resized.max())
    scaled = (resized - low) / (high - low) if high > low else resized
    return confusion_counts(predicted > SEED000_THRESHOLD, scaled > SEED000_THRESHOLD)


def _case_row(result: CaseResult, protocol: str, threshold: float, counts: Counts,
              with_ranking: bool) -> dict:
    row = {"case": result.case, "subset": result.subset, "protocol": protocol,
           "threshold": threshold, **counts_metrics(counts),
           "tp": counts.tp, "fp": counts.fp, "fn": counts.fn, "tn": counts.tn}
    if with_ranking:
        curve = ranking_curve(result.probability[result.fov], result.truth[result.fov])
        row.update(auc_roc=roc_auc(curve), auc_pr=average_precision(curve))
    return row


def per_image_table(results: list[CaseResult], val_threshold: float | None,
                    seed000: bool) -> pd.DataFrame:
    """One row per case and protocol: ``fov@0.5``, ``fov@val_best`` and (STARE) ``seed000``."""
    rows = []
    for result in results:
        scores, truth = result.probability[result.fov], result.truth[result.fov]
        rows.append(_case_row(result, "fov@0.5", FIXED_THRESHOLD,
                              confusion_counts(scores >= FIXED_THRESHOLD, truth), True))
        if val_threshold is not None:
            rows.append(_case_row(result, "fov@val_best", val_threshold,
                                  confusion_counts(scores >= val_threshold, truth), False))
        if seed000:
            rows.append(_case_row(result, "seed000", SEED000_THRESHOLD,
                                  seed000_counts(result.probability, result.truth), False))
    return pd.DataFrame(rows).reindex(columns=PER_IMAGE_COLUMNS)


def _finite(value):
    """JSON has no NaN: undefined metrics (one class only, one image's SD) become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def summarize(results: list[CaseResult], dataset: str, n_curve_points: int = 200) -> dict:
    """Every number of the stage from the native-size results: metrics, per-image table, curves."""
    test_scores, test_truth = pooled(results, "test")
    if test_scores.size == 0:
        raise UnetopsError("data/split.csv: no test pixels inside the FOV (expect test cases)")
    test_curve = ranking_curve(test_scores, test_truth)
    metrics = {"auc_roc": roc_auc(test_curve), "auc_pr": average_precision(test_curve),
               **counts_metrics(confusion_counts(test_scores >= FIXED_THRESHOLD, test_truth)),
               "threshold": FIXED_THRESHOLD}

    val_scores, val_truth = pooled(results, "val")
    val_threshold = None
    if val_scores.size:
        val_curve = ranking_curve(val_scores, val_truth)
        val_threshold, val_f1 = best_f1_threshold(val_curve)
        metrics["val"] = {"auc_roc": roc_auc(val_curve), "auc_pr": average_precision(val_curve),
                          **counts_metrics(confusion_counts(val_scores >= FIXED_THRESHOLD,
                                                            val_truth)),
                          "threshold": FIXED_THRESHOLD}
        metrics["val_best_threshold"] = {
            **counts_metrics(confusion_counts(test_scores >= val_threshold, test_truth)),
            "threshold": val_threshold, "val_f1": val_f1}
    else:
        log.warning("evaluate: no validation cases; only threshold 0.5 is reported")

    seed000 = dataset == "stare"
    table = per_image_table(results, val_threshold, seed000)
    test_rows = table[table["subset"] == "test"]
    fixed = test_rows[test_rows["protocol"] == "fov@0.5"]
    metrics["per_image"] = {}
    for name in ALL_METRICS:
        metrics["per_image"][f"{name}_mean"] = float(fixed[name].mean())
        metrics["per_image"][f"{name}_sd"] = float(fixed[name].std(ddof=1))
    if seed000:
        seeded = test_rows[test_rows["protocol"] == "seed000"]
        metrics["seed000"] = {name: float(seeded[name].mean()) for name in SEED000_METRICS}
        metrics["seed000"].update(threshold=SEED000_THRESHOLD, size=SEED000_SIZE)
    if dataset == "isbi2012":
        metrics["isbi2012"] = isbi_metrics([r for r in results if r.subset == "test"], metrics)
    metrics["n_images"] = {subset: sum(r.subset == subset for r in results)
                           for subset in ("val", "test")}

    points = curve_points(test_curve, n_curve_points)
    roc = pd.DataFrame({"fpr": points["fpr"], "tpr": points["tpr"],
                        "threshold": points["threshold"]})
    pr = pd.DataFrame({"recall": points["tpr"], "precision": points["precision"],
                       "threshold": points["threshold"]})
    return {"metrics": _json_safe(metrics), "per_image": table, "roc": roc, "pr": pr}


def isbi_metrics(test: list[CaseResult], pooled_metrics: dict) -> dict:
    """ISBI 2012's own measures on the held-out slices: at 0.5 like every other metric, the pixel
    error (1 - accuracy, all pixels), mean adapted Rand error and membrane F1; and the errors as
    the challenge scored them, each the best of its 10 thresholds (:func:`isbi_swept_errors`)."""
    return {"pixel_error": 1.0 - pooled_metrics["accuracy"],
            "rand_error": float(np.mean([rand_error(r.probability, r.truth, FIXED_THRESHOLD)
                                         for r in test])),
            "foreground_f1": pooled_metrics["f1"], "threshold": FIXED_THRESHOLD,
            **isbi_swept_errors([r.probability for r in test], [r.truth for r in test])}


def _json_safe(tree):
    if isinstance(tree, dict):
        return {key: _json_safe(value) for key, value in tree.items()}
    if isinstance(tree, (np.floating, float)):
        return _finite(float(tree))
    if isinstance(tree, np.integer):
        return int(tree)
    return tree


def flat_metrics(metrics: dict) -> dict[str, float]:
    """``metrics.json`` as MLflow metrics (``eval_`` prefix: training's ``val_*`` stay apart)."""
    flat = {f"eval_test_{name}": metrics[name] for name in ALL_METRICS}
    blocks = {"val": ("eval_val_", ALL_METRICS),
              "val_best_threshold": ("eval_test_valbest_", (*THRESHOLD_METRICS, "threshold")),
              "per_image": ("eval_test_image_", tuple(metrics.get("per_image", {}))),
              "seed000": ("eval_seed000_", SEED000_METRICS),
              "isbi2012": ("eval_isbi2012_", ("pixel_error", "rand_error", "foreground_f1",
                                              "pixel_error_swept", "pixel_error_fscore",
                                              "rand_error_swept"))}
    for block, (prefix, names) in blocks.items():
        for name in names if block in metrics else ():
            flat[prefix + name] = metrics[block][name]
    return {key: float(value) for key, value in flat.items() if value is not None}


# --- MLflow: log to the training run, promote the champion ------------------------------------

def promote(cfg: Config, run_id: str, val_metrics: dict | None, model) -> str | None:
    """Register this run's model and move the ``champion`` alias if it beats the current one.

    Each evaluated training run has one version (``train`` registers it; else it is registered
    here once), tagged with its latest validation metrics and dataset. The alias moves only when there is no
    champion yet, or when ``evaluate.champion_metric`` on validation is strictly higher than the
    champion's and both were measured on the same dataset (validation sets of different datasets
    are not comparable: use another ``mlflow.register_model`` name per dataset). Returns the
    champion's version.
    """
    import mlflow
    from mlflow import MlflowClient

    name = cfg.mlflow.register_model
    metric = cfg.evaluate.champion_metric
    score = (val_metrics or {}).get(metric)
    client = MlflowClient()
    version = _registered_version(client, name, run_id)
    if version is None:
        uri = _logged_model_uri(client, run_id) or _log_model(model)
        version = mlflow.register_model(uri, name).version
    tags = {f"val_{k}": str(v) for k, v in (val_metrics or {}).items() if v is not None}
    tags["dataset"] = cfg.data.dataset
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    champion_version = client.get_registered_model(name).aliases.get(CHAMPION_ALIAS)
    champion = client.get_model_version(name, champion_version) if champion_version else None
    if champion is not None and champion.version == version:
        return version
    if score is None:
        log.warning("evaluate: no validation %s; %s stays %s", metric, CHAMPION_ALIAS,
                    champion.version if champion else "unset")
        return champion.version if champion else None
    if champion is not None:
        their_score = champion.tags.get(f"val_{metric}")
        if champion.tags.get("dataset") != cfg.data.dataset:
            log.warning("evaluate: %s@%s was evaluated on %s, not %s; the alias stays",
                        name, CHAMPION_ALIAS, champion.tags.get("dataset"), cfg.data.dataset)
            return champion.version
        if their_score is not None and float(their_score) >= score:
            log.info("evaluate: val %s %.4f does not beat %s v%s (%.4f); the alias stays", metric,
                     score, CHAMPION_ALIAS, champion.version, float(their_score))
            return champion.version
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    log.info("evaluate: %s v%s is now models:/%s@%s (val %s %.4f)", name, version, name,
             CHAMPION_ALIAS, metric, score)
    return version


def _registered_version(client, name: str, run_id: str) -> str | None:
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return str(max(int(v.version) for v in versions)) if versions else None


def _logged_model_uri(client, run_id: str) -> str | None:
    """The model training logged in its run (MLflow 3 logged models), newest first."""
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'",
                                         order_by=[{"field_name": "creation_time",
                                                    "ascending": False}])
    return models[0].model_uri if models else None


def model_requirements() -> list[str]:
    """Pinned keras and tensorflow: given explicitly, MLflow skips inferring them in a subprocess
    that reloads the model (~6 s per ``log_model``)."""
    import mlflow.keras
    import tensorflow as tf

    return [*mlflow.keras.get_default_pip_requirements(), f"tensorflow=={tf.__version__}"]


def _log_model(model) -> str:
    """Log the evaluated model into the active (training) run when training logged none."""
    import mlflow.keras

    return mlflow.keras.log_model(model, name="model",
                                  pip_requirements=model_requirements()).model_uri


def _log_figures(roc: pd.DataFrame, pr: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    for frame, x, y, title in ((roc, "fpr", "tpr", "roc"), (pr, "recall", "precision", "pr")):
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(frame[x], frame[y])
        ax.set(xlabel=x, ylabel=y, xlim=(0, 1), ylim=(0, 1.01), title=f"test {title.upper()} (FOV)")
        mlflow.log_figure(fig, f"evaluate/{title}.png")
        plt.close(fig)


def log_to_training_run(cfg: Config, summary: dict, model) -> None:
    """Metrics, reports, overlays and curve figures into the training run; then :func:`promote`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from unetops import tracking

    paths = cfg.paths
    with tracking.resume_training_run(cfg) as run:
        try:
            mlflow.log_metrics(flat_metrics(summary["metrics"]))
            mlflow.set_tag("evaluate.dataset", cfg.data.dataset)
            for path in (paths.metrics, paths.per_image, paths.roc_csv, paths.pr_csv):
                mlflow.log_artifact(str(path), "evaluate")
            mlflow.log_artifacts(str(paths.overlays), "evaluate/overlays")
            _log_figures(summary["roc"], summary["pr"])
            if cfg.mlflow.register_model:
                promote(cfg, run.info.run_id, summary["metrics"].get("val"), model)
        except MlflowException as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else "error"
            raise UnetopsError(f"MLflow: {message}") from None


# --- the stage ----------------------------------------------------------------------------------

def run(cfg: Config) -> None:
    paths = cfg.paths
    split = read_split(cfg)
    split = split[split["subset"].isin(["val", "test"])].sort_values(["subset", "case"],
                                                                    ascending=[False, True])
    if not (split["subset"] == "test").any():
        raise UnetopsError(f"{paths.rel(paths.split_csv)}: no test cases")
    model = load_model(None, cfg)
    predictor = Predictor.from_config(model, cfg, name=paths.rel(paths.model))
    log.info("evaluate: %s forward pass in %s", predictor.engine, predictor.precision)
    results = []
    with atomic_dir(paths.predictions) as staged:
        for row in track(split.itertuples(index=False), "evaluate", total=len(split)):
            result = predict_case(row, predictor, cfg)
            write_png(staged / f"{row.case}.png", probability_to_uint16(result.probability))
            results.append(result)
    summary = summarize(results, cfg.data.dataset, cfg.evaluate.curve_points)
    images = dict(zip(split["case"], split["image"], strict=True))
    with atomic_dir(paths.overlays) as staged:
        for result in (r for r in results if r.subset == "test"):
            write_png(staged / f"{result.case}.png",
                      error_overlay(read_image(paths.abs(images[result.case])),
                                    result.probability >= FIXED_THRESHOLD, result.truth,
                                    result.fov))
    write_csv(paths.per_image, summary["per_image"])
    write_csv(paths.roc_csv, summary["roc"])
    write_csv(paths.pr_csv, summary["pr"])
    write_json(paths.metrics, summary["metrics"])
    m = summary["metrics"]
    log.info("evaluate: test (FOV, pooled) AUC-ROC %s, F1 %.4f at 0.5%s", _fmt(m["auc_roc"]),
             m["f1"],
             f", F1 {m['val_best_threshold']['f1']:.4f} at val-best "
             f"{m['val_best_threshold']['threshold']:.3f}" if "val_best_threshold" in m else "")
    log_to_training_run(cfg, summary, model)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
