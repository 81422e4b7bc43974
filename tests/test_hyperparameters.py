"""The hyperparameter table and plots, built from a study assembled trial by trial (no training)."""

import datetime
import logging

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from unetops.hyperparameters import build_table, save_plots, save_table, table_markdown

DISTRIBUTIONS = {
    "train.learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
    "train.batch_size": CategoricalDistribution((16, 32)),
    "train.epochs": IntDistribution(1, 3),
}
START = datetime.datetime(2026, 1, 1, 12, 0, 0)


def add(study, state, value=None, seconds=10.0, lr=1e-3, batch=16, epochs=2, **attrs):
    trial = create_trial(
        state=state, value=value,
        params={"train.learning_rate": lr, "train.batch_size": batch, "train.epochs": epochs},
        distributions=DISTRIBUTIONS, user_attrs=attrs,
        intermediate_values={0: 0.1} if state == TrialState.PRUNED else {},
    )
    trial.datetime_start = START
    trial.datetime_complete = (None if state == TrialState.RUNNING
                               else START + datetime.timedelta(seconds=seconds))
    study.add_trial(trial)


@pytest.fixture
def study():
    """Five trials: two complete (the second is best), pruned, failed, running."""
    study = optuna.create_study(study_name="s", direction="maximize")
    study.set_user_attr("objective", "val_f1")
    add(study, TrialState.COMPLETE, 0.60, lr=1e-3, val_f1=0.60, val_iou=0.43, val_loss=0.3,
        test_f1=0.58, test_iou=0.41, test_loss=0.31)
    add(study, TrialState.COMPLETE, 0.70, seconds=20.0, lr=3e-3, batch=32, val_f1=0.70,
        val_iou=0.54, val_loss=0.2, test_f1=0.66, test_iou=0.49, test_loss=0.25)
    add(study, TrialState.PRUNED, lr=1e-4, val_f1=0.2)
    add(study, TrialState.FAIL, lr=5e-3)
    add(study, TrialState.RUNNING, lr=2e-3)
    return study


def test_rows_are_the_trials_best_first(study):
    frame = build_table(study)
    assert frame["trial"].tolist() == [1, 0, 2, 3, 4]
    assert frame["state"].tolist() == ["complete", "complete", "pruned", "failed", "running"]
    assert frame["best"].tolist() == [True, False, False, False, False]
    assert frame.loc[0, "objective"] == pytest.approx(0.70)
    assert frame.loc[0, "train.learning_rate"] == pytest.approx(3e-3)
    assert frame.loc[0, "train.batch_size"] == 32
    assert frame.loc[0, "seconds"] == pytest.approx(20.0)
    assert frame.loc[2, "val_f1"] == pytest.approx(0.2)
    assert pd.isna(frame.loc[2, "objective"]) and pd.isna(frame.loc[4, "seconds"])


def test_test_metrics_only_for_the_best_trial(study):
    frame = build_table(study)
    assert frame.loc[0, ["test_iou", "test_f1", "test_loss"]].tolist() == pytest.approx(
        [0.49, 0.66, 0.25])
    # Trial 0 carries test numbers from when it was the best, but is not the best any more.
    assert frame.loc[1, ["test_iou", "test_f1", "test_loss"]].isna().all()


def test_minimised_objective_sorts_ascending():
    study = optuna.create_study(direction="minimize")
    add(study, TrialState.COMPLETE, 0.5)
    add(study, TrialState.COMPLETE, 0.2)
    add(study, TrialState.COMPLETE, 0.9)
    assert build_table(study)["trial"].tolist() == [1, 0, 2]


def test_markdown_bolds_the_best_row_only(study):
    text = table_markdown(build_table(study), study)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert "objective (val_f1, max)" in rows[0]
    assert rows[1].startswith("| **1** | **complete** |") and "**0.7000**" in rows[1]
    assert "**" not in "".join(rows[2:])
    assert "| 0.003 |" not in rows[1] and "**0.003**" in rows[1]


def test_save_table_writes_markdown_and_csv(study, tmp_path):
    save_table(study, tmp_path / "h.md", tmp_path / "h.csv")
    csv = pd.read_csv(tmp_path / "h.csv")
    assert len(csv) == 5 and csv.loc[0, "trial"] == 1
    assert (tmp_path / "h.md").read_text().count("\n| ") == 6  # header + 5 rows


def test_plots_are_pngs_and_importance_needs_two_completed(study, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="unetops")
    save_plots(study, tmp_path / "history.png", tmp_path / "importance.png")
    for name in ("history.png", "importance.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    single = optuna.create_study(direction="maximize")
    add(single, TrialState.COMPLETE, 0.5)
    save_plots(single, tmp_path / "h1.png", tmp_path / "i1.png")
    assert (tmp_path / "i1.png").read_bytes()[:4] == b"\x89PNG"
    assert "parameter importance needs 2 completed trials" in caplog.text
