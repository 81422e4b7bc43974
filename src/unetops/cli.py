"""The ``unetops`` command: one thin command per DVC stage, each calling ``stages.<name>.run(cfg)``.

Exit codes: 0 when the stage wrote its outputs, 1 with one ``unetops: error: …`` line when it
did not. A stage whose MLflow logging failed part-way (the tracking server went away during
training) still exits 0, its outputs written, after one ``unetops: warning: MLflow …: run …
incomplete, not logged: …`` line (:func:`unetops.tracking.take_unlogged`).
"""

import importlib
import shlex
import sys
from pathlib import Path

import typer

from unetops.config import load_config
from unetops.errors import UnetopsError

app = typer.Typer(
    help="Reproducible U-Net segmentation of biomedical images: DVC stages, MLflow runs, Optuna.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p",
                            help="The params file; its folder is the project root.")


def fail(exc: UnetopsError) -> typer.Exit:
    typer.echo(f"unetops: error: {exc}", err=True)
    return typer.Exit(code=1)


def warn_unlogged() -> None:
    """Say what MLflow did not take, if anything (only a stage that tracks imported tracking)."""
    tracking = sys.modules.get("unetops.tracking")
    message = tracking.take_unlogged() if tracking is not None else None
    if message:
        typer.echo(f"unetops: warning: {message}", err=True)


def run_stage(name: str, params: Path) -> None:
    try:
        cfg = load_config(params)
        importlib.import_module(f"unetops.stages.{name}").run(cfg)
    except UnetopsError as exc:
        warn_unlogged()
        raise fail(exc) from None
    warn_unlogged()


@app.command()
def download(params: Path = ParamsOption) -> None:
    """Fetch the dataset (mirror first, SHA256-verified) and unpack it into data/raw/."""
    run_stage("download", params)


@app.command()
def split(params: Path = ParamsOption) -> None:
    """Assign cases to train/val/test, compute missing FOV masks, validate, write data/split.csv."""
    run_stage("split", params)


@app.command()
def preprocess(params: Path = ParamsOption) -> None:
    """Channel, standardisation, CLAHE and gamma for every case, into data/preprocessed/."""
    run_stage("preprocess", params)


@app.command()
def augment(params: Path = ParamsOption) -> None:
    """Seeded augmented copies of the training cases, into data/augmented/."""
    run_stage("augment", params)


@app.command()
def train(params: Path = ParamsOption) -> None:
    """Train the U-Net on patches (resumable), tracked in MLflow; writes models/model.keras."""
    run_stage("train", params)


@app.command()
def evaluate(params: Path = ParamsOption) -> None:
    """Overlap-tile prediction and FOV metrics on validation and test; writes reports/."""
    run_stage("evaluate", params)


@app.command()
def tune(params: Path = ParamsOption) -> None:
    """Optuna search over the params.yaml search space; rebuilds reports/hyperparameters.md."""
    run_stage("tune", params)


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files and/or folders of images."),
    out: Path = typer.Option(..., "--out", "-o",
                             help="Folder for <stem>_prob.png and <stem>_mask.png."),
    model: str | None = typer.Option(None, "--model", "-m",
                              help="A .keras file (default models/model.keras) or an MLflow URI "
                                   "such as models:/unetops@champion or runs:/<id>/model."),
    threshold: float = typer.Option(0.5, "--threshold", "-t", help="Mask: probability >= this."),
    fov: str = typer.Option("auto", "--fov", help="auto (estimate for fundus datasets), "
                                                  "estimate, or none (whole image)."),
    params: Path = ParamsOption,
) -> None:
    """Apply a trained model to new images: 16-bit probability and mask PNGs at original size."""
    try:
        from unetops.predict import FovMode, predict_images

        if fov not in FovMode.__members__:
            raise UnetopsError(f"--fov: {fov!r} is not one of auto, estimate, none")
        predict_images(load_config(params), images, out, model_ref=model, threshold=threshold,
                       fov=FovMode(fov))
    except UnetopsError as exc:
        raise fail(exc) from None


@app.command()
def profile(
    name: str = typer.Argument(..., help="A profiles/<name>.yaml file: drive, stare, isbi2012."),
    set_params: bool = typer.Option(False, "--set-params",
                                    help="Print it as `dvc exp run -S key=value ...` arguments "
                                         "instead of writing params.yaml."),
    params: Path = ParamsOption,
) -> None:
    """Apply a dataset profile (the best settings found) to params.yaml; then run `dvc repro`."""
    try:
        from unetops import profiles

        if set_params:
            typer.echo(" ".join(shlex.quote(arg)
                                for arg in profiles.set_param_args(params.parent, name)))
            return
        changed = profiles.apply_profile(params, name)
    except UnetopsError as exc:
        raise fail(exc) from None
    summary = ", ".join(f"{key}={value}" for key, value in changed) or "nothing (already applied)"
    typer.echo(f"{params}: profile {name} applied; changed {summary}")


def main() -> None:
    app()
