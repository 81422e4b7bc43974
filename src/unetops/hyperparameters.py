"""The hyperparameter table and plots, rebuilt from the Optuna study alone on every ``tune`` run.

Nothing here is written by hand or kept between runs: :func:`build_table` reads every trial
from the storage (so a trial changed in the storage changes the table), :func:`save_table` and
:func:`save_plots` render it. The numbers a trial contributes besides its params and value are
its user attributes, set by ``unetops.stages.tune`` while the trial runs (names below).
"""

import io
import math
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from unetops.console import log
from unetops.io import write_bytes, write_csv, write_text

#: Study user attribute: the validation metric the study optimises (``train.monitor``).
OBJECTIVE_ATTR = "objective"
#: Trial user attributes: validation metrics at the trial's best (or last) epoch.
VAL_ATTRS = ("val_iou", "val_f1", "val_loss")
#: Trial user attributes: test metrics, set only when the trial was the study's best on finishing.
TEST_ATTRS = ("test_iou", "test_f1", "test_loss")

STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}
#: Row order after the completed trials (which are ordered by the objective).
STATE_ORDER = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
               TrialState.WAITING)


def objective_name(study: optuna.Study) -> str:
    return study.user_attrs.get(OBJECTIVE_ATTR, "value")


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best completed trial, or None while no trial has completed."""
    try:
        return study.best_trial
    except ValueError:
        return None


def _param_names(trials: list[FrozenTrial]) -> list[str]:
    """Every param any trial used, in first-seen order (the search space may grow over reruns)."""
    names: dict[str, None] = {}
    for trial in trials:
        names.update(dict.fromkeys(trial.params))
    return list(names)


def _row_order(study: optuna.Study, trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Completed trials best first (ties: lower number first), then the others by number."""
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0

    def key(trial: FrozenTrial):
        value = sign * trial.value if trial.state == TrialState.COMPLETE else 0.0
        return STATE_ORDER.index(trial.state), value, trial.number

    return sorted(trials, key=key)


def build_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, best first: trial, state, each searched param, the objective, the
    validation metrics, the duration, and test metrics for the best trial only.

    ``best`` marks the best trial's row. A function of the study alone, so the table can always
    be rebuilt from the storage.
    """
    trials = study.get_trials(deepcopy=False)
    params = _param_names(trials)
    best = best_trial(study)
    rows = []
    for trial in _row_order(study, trials):
        is_best = best is not None and trial.number == best.number
        row = {"trial": trial.number, "state": STATE_NAMES[trial.state]}
        row.update({name: trial.params.get(name) for name in params})
        row["objective"] = trial.value if trial.state == TrialState.COMPLETE else None
        row.update({name: trial.user_attrs.get(name) for name in VAL_ATTRS})
        row["seconds"] = (trial.duration.total_seconds() if trial.duration is not None
                          else None)
        row.update({name: trial.user_attrs.get(name) if is_best else None
                    for name in TEST_ATTRS})
        row["best"] = is_best
        rows.append(row)
    columns = ["trial", "state", *params, "objective", *VAL_ATTRS, "seconds", *TEST_ATTRS, "best"]
    dtypes = {"trial": "int64", "best": "bool"}
    dtypes.update(dict.fromkeys(["objective", *VAL_ATTRS, "seconds", *TEST_ATTRS], "Float64"))
    for name in params:
        values = [trial.params[name] for trial in trials if name in trial.params]
        if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
            dtypes[name] = "Int64"
        elif all(isinstance(value, (int, float)) for value in values):
            dtypes[name] = "Float64"
    return pd.DataFrame(rows, columns=columns).astype(dtypes)


def _cell(value, column: str) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (float, np.floating)):
        if column == "seconds":
            return f"{value:.1f}"
        if column in ("objective", *VAL_ATTRS, *TEST_ATTRS):
            return f"{value:.4f}"
        return f"{value:.3g}"
    return str(value)


def table_markdown(frame: pd.DataFrame, study: optuna.Study) -> str:
    """The table as GitHub Markdown, the best row in bold, with a caption saying what it shows."""
    columns = [column for column in frame.columns if column != "best"]
    objective = objective_name(study)
    direction = "max" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "min"
    headers = [f"objective ({objective}, {direction})" if column == "objective" else column
               for column in columns]
    lines = [
        f"# Hyperparameters: study `{study.study_name}`",
        "",
        (f"{len(frame)} trials, best first by {objective} on the validation subset; the test "
         "subset is never used to choose, and its numbers are shown for the best trial only. "
         "Rebuilt from the Optuna study on every `unetops tune`."),
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(frame[column]) else "---"
                       for column in columns) + "|",
    ]
    for record in frame.to_dict("records"):
        cells = [_cell(record[column], column) for column in columns]
        if record["best"]:
            cells = [f"**{cell}**" if cell else cell for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_table(study: optuna.Study, markdown_path: Path, csv_path: Path) -> pd.DataFrame:
    """Rebuild the table from ``study`` and write it as Markdown and CSV (atomically)."""
    frame = build_table(study)
    write_text(markdown_path, table_markdown(frame, study))
    write_csv(csv_path, frame)
    return frame


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def save_plots(study: optuna.Study, history_path: Path, importance_path: Path,
               seed: int = 0) -> None:
    """Optuna's optimisation-history and parameter-importance plots as PNGs (matplotlib, Agg).

    Importance needs two completed trials and a param that varies; short of that the file is a
    placeholder that says so (DVC expects every declared output), and a log line says why.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    objective = objective_name(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = optuna_plots.plot_optimization_history(study, target_name=objective)
        write_bytes(history_path, _figure_png(axes.figure))
        plt.close(axes.figure)

        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        varying = [name for name in _param_names(completed)
                   if len({repr(trial.params.get(name)) for trial in completed}) > 1]
        if len(completed) >= 2 and varying:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
            axes = optuna_plots.plot_param_importances(study, evaluator=evaluator,
                                                       target_name=objective)
            figure = axes.figure
        else:
            reason = (f"parameter importance needs 2 completed trials with a varying param "
                      f"({len(completed)} completed)")
            log.info("tune: %s; %s is a placeholder", reason, importance_path.name)
            figure, axes = plt.subplots(figsize=(6.4, 2.0))
            axes.axis("off")
            axes.text(0.5, 0.5, reason, ha="center", va="center", wrap=True)
        write_bytes(importance_path, _figure_png(figure))
        plt.close(figure)
