"""``params.yaml`` parsed once into typed, frozen pydantic models.

Every stage receives the whole :class:`Config` and reads only its own section; DVC's ``params``
lists in ``dvc.yaml`` name the dotted keys each stage reads, so a change to
``train.learning_rate`` never reruns ``preprocess``. Unknown keys, wrong types and out-of-range
values are errors that name the key. Paths are declared once, in :class:`Paths`.
"""

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from unetops.errors import UnetopsError

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- data -------------------------------------------------------------------------------------

class FolderData(Section):
    """A user's own folder of image/mask pairs matched by file stem (or an nnU-Net raw folder)."""

    images: Path | None = None
    masks: Path | None = None
    fov: Path | None = None


class SyntheticData(Section):
    """Fundus-like images drawn from a seed; for tests and the quick start, never for accuracy."""

    n_images: Annotated[int, Field(ge=3, le=1000)] = 12
    size: Annotated[int, Field(ge=32, le=2048)] = 128
    seed: int = 0


class DataConfig(Section):
    dataset: Literal["stare", "drive", "isbi2012", "folder", "synthetic"] = "stare"
    stare_labels: Literal["ah", "vk"] = "ah"
    folder: FolderData = FolderData()
    synthetic: SyntheticData = SyntheticData()

    @model_validator(mode="after")
    def _folder_needs_paths(self):
        if self.dataset == "folder" and (self.folder.images is None or self.folder.masks is None):
            raise ValueError("data.folder.images and data.folder.masks are required "
                             "when data.dataset is 'folder'")
        return self


class SplitConfig(Section):
    """How cases are assigned to train/val/test; the seeds' fixed splits win where they exist."""

    seed: int = 42
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25
    isbi_test_slices: Annotated[int, Field(ge=1, le=28)] = 6


# --- image pipeline ---------------------------------------------------------------------------

class PreprocessConfig(Section):
    channel: Literal["green", "luminance", "rgb"] = "green"
    standardize: bool = True
    clahe: bool = True
    clahe_clip_limit: Annotated[float, Field(gt=0.0, le=100.0)] = 2.0
    clahe_tile_grid: Annotated[int, Field(ge=1, le=64)] = 8
    gamma: Annotated[float, Field(gt=0.0, le=10.0)] = 1.2
    resize_max_side: Annotated[int, Field(ge=32)] | None = None


class Transform(Section):
    """One random transform: applied with probability ``prob``, strength drawn up to ``max``."""

    prob: Probability = 0.0
    max: Annotated[float, Field(ge=0.0)] = 0.0


class ElasticTransform(Section):
    prob: Probability = 0.0
    alpha: Annotated[float, Field(ge=0.0)] = 34.0
    sigma: Annotated[float, Field(gt=0.0)] = 6.0


class AugmentConfig(Section):
    seed: int = 0
    copies: Annotated[int, Field(ge=0, le=1000)] = 4
    flip: Transform = Transform(prob=0.5)
    rotate: Transform = Transform(prob=0.8, max=180.0)
    zoom: Transform = Transform(prob=0.3, max=0.15)
    shear: Transform = Transform(prob=0.2, max=10.0)
    elastic: ElasticTransform = ElasticTransform(prob=0.3)
    brightness: Transform = Transform(prob=0.3, max=0.1)
    contrast: Transform = Transform(prob=0.3, max=0.2)
    gamma: Transform = Transform(prob=0.3, max=0.2)
    noise: Transform = Transform(prob=0.2, max=0.02)
    weight_map: bool = False
    weight_w0: Annotated[float, Field(ge=0.0)] = 10.0
    weight_sigma: Annotated[float, Field(gt=0.0)] = 5.0


# --- model and training -----------------------------------------------------------------------

class ModelConfig(Section):
    depth: Annotated[int, Field(ge=1, le=6)] = 3
    base_filters: Annotated[int, Field(ge=1, le=256)] = 16
    convs_per_level: Annotated[int, Field(ge=1, le=4)] = 2
    norm: Literal["batch", "instance", "none"] = "batch"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    dropout_levels: Annotated[int, Field(ge=0)] = 1
    upsampling: Literal["transpose", "bilinear"] = "transpose"
    padding: Literal["same", "valid"] = "same"


class TrainConfig(Section):
    seed: int = 0
    epochs: Annotated[int, Field(ge=1, le=10000)] = 20
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-3
    patch_size: Annotated[int, Field(ge=8, le=1024)] = 48
    patches_per_epoch: Annotated[int, Field(ge=1)] = 4096
    val_patches: Annotated[int, Field(ge=1)] = 1024
    vessel_fraction: Probability = 0.0
    loss: Literal["bce", "weighted_bce", "weight_map", "dice", "bce_dice"] = "bce"
    lr_schedule: Literal["constant", "cosine", "triangular", "exp_range"] = "constant"
    lr_min: Annotated[float, Field(gt=0.0)] = 1e-5
    cycle_steps: Annotated[int, Field(ge=1)] = 500
    cycle_gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.999
    reduce_lr_patience: Annotated[int, Field(ge=0)] = 0
    early_stopping_patience: Annotated[int, Field(ge=0)] = 0
    monitor: Literal["val_iou", "val_f1", "val_auc", "val_loss"] = "val_f1"
    use_tuned: bool = False


class EvaluateConfig(Section):
    tile: Annotated[int, Field(ge=8, le=4096)] = 256
    overlap: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25
    blend: Literal["gaussian", "uniform"] = "gaussian"
    batch_size: PositiveInt = 4
    flip_tta: bool = False


class SearchSpace(Section):
    epochs: tuple[int, int] = (1, 3)
    batch_size: tuple[int, ...] = (16, 32, 64)
    learning_rate: tuple[float, float] = (1e-4, 1e-2)
    depth: tuple[int, ...] | None = None
    base_filters: tuple[int, ...] | None = None
    loss: tuple[str, ...] | None = None


class TuneConfig(Section):
    n_trials: PositiveInt = 8
    seed: int = 0
    study_name: str = "unetops"
    storage: str | None = None
    pruner: Literal["median", "none"] = "median"
    search: SearchSpace = SearchSpace()


class MlflowConfig(Section):
    experiment: str = "unetops"
    register_model: str | None = "unetops"


# --- the whole file ---------------------------------------------------------------------------

class Paths:
    """Every file and folder the pipeline reads or writes, relative to the project root, once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.data = self.root / "data"
        self.archives = self.data / "archives"
        self.raw = self.data / "raw"
        self.raw_cases = self.raw / "cases.csv"
        self.fov = self.data / "fov"
        self.split_csv = self.data / "split.csv"
        self.preprocessed = self.data / "preprocessed"
        self.augmented = self.data / "augmented"
        self.predictions = self.data / "predictions"
        self.optuna_db = self.data / "optuna.db"
        self.models = self.root / "models"
        self.model = self.models / "model.keras"
        self.checkpoints = self.models / "checkpoints"
        self.mlflow_run = self.models / "mlflow_run.json"
        self.reports = self.root / "reports"
        self.train_summary = self.reports / "train.json"
        self.train_history = self.reports / "train_history.csv"
        self.metrics = self.reports / "metrics.json"
        self.per_image = self.reports / "per_image.csv"
        self.hyperparameters_md = self.reports / "hyperparameters.md"
        self.hyperparameters_csv = self.reports / "hyperparameters.csv"
        self.best_params = self.reports / "best_params.yaml"
        self.mlflow_db = self.root / "mlflow.db"

    def rel(self, path: Path) -> str:
        """``path`` relative to the root, as written into manifests (POSIX separators)."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def abs(self, rel: str | Path) -> Path:
        """A manifest path (relative to the root, or absolute) as an absolute path."""
        rel = Path(rel)
        return rel if rel.is_absolute() else self.root / rel


class Config(Section):
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tune: TuneConfig = TuneConfig()
    mlflow: MlflowConfig = MlflowConfig()

    _root: Path = PrivateAttr(default=Path("."))

    @cached_property
    def paths(self) -> Paths:
        return Paths(self._root)

    def with_overrides(self, overrides: dict) -> "Config":
        """A copy with dotted-key overrides applied and validated (used by tuning and tests)."""
        data = self.model_dump(mode="json")
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return config_from_dict(data, self._root, source="overrides")


def config_from_dict(data: dict, root: Path, source: str = "params.yaml") -> Config:
    try:
        cfg = Config.model_validate(data or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        raise UnetopsError(f"{source}: {key}: {message}") from None
    cfg._root = Path(root).resolve()
    return cfg


def load_config(path: Path | str = "params.yaml") -> Config:
    """Parse ``params.yaml``; its folder is the project root that every path is relative to."""
    path = Path(path)
    if not path.is_file():
        raise UnetopsError(f"{path}: file not found (run unetops from the project folder)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UnetopsError(f"{path.name}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is not None and not isinstance(data, dict):
        raise UnetopsError(f"{path.name}: (top level): expected a mapping of sections")
    return config_from_dict(data, path.parent, source=path.name)
