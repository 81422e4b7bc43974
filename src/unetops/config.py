"""``params.yaml`` parsed once into typed, frozen pydantic models.

Every stage receives the whole :class:`Config` and reads only its own section; DVC's ``params``
lists in ``dvc.yaml`` name the dotted keys each stage reads, so a change to
``train.learning_rate`` never reruns ``preprocess``. Unknown keys, wrong types and out-of-range
values are errors that name the key. Paths are declared once, in :class:`Paths`.
"""

from functools import cached_property
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError,
                      field_validator, model_validator)

from unetops.errors import UnetopsError

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- data -------------------------------------------------------------------------------------

class FolderData(Section):
    """A user's own folder of image/mask pairs matched by file stem (or an nnU-Net raw folder).

    Paths are absolute or relative to the project root. ``masks`` may be left out when ``images``
    is an nnU-Net raw dataset folder (``imagesTr/`` + ``labelsTr/``); ``fov`` is optional.
    """

    images: Path | None = None
    masks: Path | None = None
    fov: Path | None = None


class SyntheticData(Section):
    """Fundus-like images drawn from a seed; for tests and the quick start, never for accuracy."""

    n_images: Annotated[int, Field(ge=3, le=1000)] = 12
    size: Annotated[int, Field(ge=32, le=2048)] = 128
    seed: int = 0


class DataConfig(Section):
    """Which dataset ``download`` fetches (mirror first) and converts into ``data/raw``."""

    dataset: Literal["stare", "drive", "isbi2012", "folder", "synthetic"] = "stare"
    stare_labels: Literal["ah", "vk"] = "ah"
    folder: FolderData = FolderData()
    synthetic: SyntheticData = SyntheticData()

    @model_validator(mode="after")
    def _folder_needs_paths(self):
        if self.dataset == "folder" and self.folder.images is None:
            raise ValueError("data.folder.images is required when data.dataset is 'folder'")
        return self


class SplitConfig(Section):
    """How cases are assigned to train/val/test; the seeds' fixed splits win where they exist."""

    seed: int = 42
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25
    isbi_test_slices: Annotated[int, Field(ge=1, le=28)] = 6


# --- image pipeline ---------------------------------------------------------------------------

class PreprocessConfig(Section):
    """Per-image intensity pipeline: resize, channel, standardise, CLAHE, gamma, rescale to [0, 1].

    Defaults are orobix retina-unet's recipe for vessels, made FOV-aware: the green channel (the
    highest vessel contrast), standardisation with statistics from the field of view only, CLAHE
    clip 2.0 on an 8×8 tile grid, gamma 1.2 (seed 001 uses CLAHE 7.0 on 7×7, also gamma 1.2).
    Each step is switchable: ``standardize``/``clahe`` false, ``gamma`` 1.0, ``resize_max_side``
    null (native size, the default). ``foreground_fraction`` is the plausible range of the mask's
    share of FOV pixels (vessels ~0.08–0.15, ISBI membranes ~0.2), checked after the stage.
    """

    channel: Literal["green", "luminance", "rgb"] = "green"
    standardize: bool = True
    standardize_clip_sigma: Annotated[float, Field(gt=0.0, le=100.0)] | None = None
    clahe: bool = True
    clahe_clip_limit: Annotated[float, Field(gt=0.0, le=100.0)] = 2.0
    clahe_tile_grid: Annotated[int, Field(ge=1, le=64)] = 8
    gamma: Annotated[float, Field(gt=0.0, le=10.0)] = 1.2
    mask_outside_fov: bool = True
    resize_max_side: Annotated[int, Field(ge=32, le=65536)] | None = None
    foreground_fraction: tuple[Probability, Probability] = (0.001, 0.5)

    @field_validator("foreground_fraction")
    @classmethod
    def _ordered_range(cls, value):
        if value[0] > value[1]:
            raise ValueError("expected [low, high] with low <= high")
        return value


class Flip(Section):
    """Mirror left-right and, independently, up-down, each with probability ``prob``."""

    prob: Probability = 0.0


class Transform(Section):
    """One random transform: applied with probability ``prob``, strength drawn up to ``max``."""

    prob: Probability = 0.0
    max: Annotated[float, Field(ge=0.0)] = 0.0


class Rotation(Transform):
    """Rotation by an angle in [-max, max] degrees (any angle: max 180), borders reflected."""

    max: Annotated[float, Field(ge=0.0, le=180.0)] = 0.0


class Zoom(Transform):
    """Isotropic scaling by a factor in [1 - max, 1 + max]."""

    max: Annotated[float, Field(ge=0.0, le=0.9)] = 0.0


class Shear(Transform):
    """Horizontal shear by an angle in [-max, max] degrees."""

    max: Annotated[float, Field(ge=0.0, le=60.0)] = 0.0


class Brightness(Transform):
    """Add an offset in [-max, max] to the [0, 1] image (inside the FOV)."""

    max: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


class Contrast(Transform):
    """Scale the image about its FOV mean by a factor in [1 - max, 1 + max]."""

    max: Annotated[float, Field(ge=0.0, le=0.9)] = 0.0


class GammaJitter(Transform):
    """Raise the [0, 1] image to a power in [1 - max, 1 + max]."""

    max: Annotated[float, Field(ge=0.0, le=0.9)] = 0.0


class Noise(Transform):
    """Add Gaussian noise with a standard deviation drawn in [0, max]."""

    max: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


class ElasticTransform(Section):
    """Simard et al. (2003): per axis uniform(-1, 1) noise, smoothed (``sigma`` px), × ``alpha``.

    The displacement's RMS is about ``0.16 * alpha / sigma`` px per axis; one field moves image,
    mask and FOV alike.
    """

    prob: Probability = 0.0
    alpha: Annotated[float, Field(ge=0.0, le=10000.0)] = 400.0
    sigma: Annotated[float, Field(ge=1.0, le=200.0)] = 16.0


class AugmentConfig(Section):
    """Seeded offline augmentation of the training cases (``copies`` per case; 0 passes through).

    Geometric transforms (one affine + one elastic field, one remap) move image, mask and FOV
    alike; photometric ones touch the image alone, inside the FOV. ``weight_map`` stores the
    U-Net paper's weight map (w0, sigma in px) with each copy, for the weighted loss (ISBI 2012).
    """

    seed: Annotated[int, Field(ge=0)] = 0
    copies: Annotated[int, Field(ge=0, le=1000)] = 4
    flip: Flip = Flip(prob=0.5)
    rotate: Rotation = Rotation(prob=0.8, max=180.0)
    zoom: Zoom = Zoom(prob=0.3, max=0.15)
    shear: Shear = Shear(prob=0.2, max=10.0)
    elastic: ElasticTransform = ElasticTransform(prob=0.3)
    brightness: Brightness = Brightness(prob=0.3, max=0.1)
    contrast: Contrast = Contrast(prob=0.3, max=0.2)
    gamma: GammaJitter = GammaJitter(prob=0.3, max=0.2)
    noise: Noise = Noise(prob=0.2, max=0.02)
    weight_map: bool = False
    weight_w0: Annotated[float, Field(ge=0.0, le=1000.0)] = 10.0
    weight_sigma: Annotated[float, Field(gt=0.0, le=1000.0)] = 5.0


# --- model and training -----------------------------------------------------------------------

class ModelConfig(Section):
    """The U-Net that ``unetops.model.build_unet`` builds; every seed's variant is a setting here.

    ``base_filters`` doubles per level; ``depth`` is the number of poolings. ``norm``: batch,
    group (``norm_groups`` groups), instance (one group per channel) or none. ``dropout`` acts on
    the ``dropout_levels`` deepest encoder levels, the bottleneck counting as one (seeds 000/004:
    0.5 on 2). ``valid`` padding crops the skips as in the U-Net paper and shrinks the output by
    ``unetops.model.output_margin`` px per side. Defaults (depth 3, 16 filters, batch norm,
    transposed convolutions, same padding) are the ones measured for a laptop CPU
    (benchmarks/bench_train.py). ``refine_passes`` > 0 appends IterNet's refinement (Li et al.,
    2020): a small U-Net (``refine_depth`` poolings, ``refine_filters`` base filters, otherwise
    the same settings) run that many times with shared weights on the image, the previous map
    and the U-Net's last features; training supervises every map, the saved model outputs the last.
    """

    depth: Annotated[int, Field(ge=1, le=6)] = 3
    base_filters: Annotated[int, Field(ge=1, le=256)] = 16
    convs_per_level: Annotated[int, Field(ge=1, le=4)] = 2
    norm: Literal["batch", "group", "instance", "none"] = "batch"
    norm_groups: Annotated[int, Field(ge=1, le=256)] = 8
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    dropout_levels: Annotated[int, Field(ge=0, le=7)] = 1
    upsampling: Literal["transpose", "bilinear"] = "transpose"
    padding: Literal["same", "valid"] = "same"
    refine_passes: Annotated[int, Field(ge=0, le=8)] = 0
    refine_depth: Annotated[int, Field(ge=1, le=6)] = 2
    refine_filters: Annotated[int, Field(ge=1, le=256)] = 16

    @model_validator(mode="after")
    def _dropout_levels_exist(self):
        if self.dropout_levels > self.depth + 1:
            raise ValueError(f"dropout_levels must be at most depth + 1 ({self.depth + 1})")
        if self.refine_passes and self.padding != "same":
            raise ValueError("refine_passes needs padding same (every pass keeps the map's size)")
        return self


class TrainConfig(Section):
    """Patch training (``unetops train``): sampler, loss, Adam and its learning-rate schedule.

    ``patch_size`` is the network's input; with ``model.padding: valid`` the labels are the
    centred output window. ``patches_per_epoch`` is rounded down to whole batches.
    ``dihedral`` maps every training patch by a random flip / 90° rotation
    (:func:`unetops.patches.random_dihedral`); validation patches are left as drawn.
    ``learning_rate`` is the constant rate, the cosine start or the cyclic maximum; ``lr_min``
    the cosine end or the cyclic minimum; ``cycle_steps`` the cyclic half period in steps and
    ``cycle_gamma`` the exp_range decay per step (seed 002: 1e-5…1e-4, 500, 0.999).
    ``pos_weight`` (weighted_bce) null: background/vessel pixel ratio of the training FOVs.
    ``tversky_beta`` (tversky, bce_tversky): the weight of false negatives, false positives
    weigh 1 − β; 0.5 is Dice, Salehi et al.'s 0.7 favours recall. ``batch_dice`` pools the
    Dice/Tversky term over the batch (nnU-Net's batch Dice) instead of averaging it per patch.
    ``ema_momentum`` (null: off) keeps an exponential moving average of the weights (Keras'
    ``use_ema``); validation, the kept epoch and the saved model then use the averaged weights.
    ``reduce_lr_patience`` / ``early_stopping_patience`` 0 switch those callbacks off;
    ``monitor`` picks the best model, early stopping and plateau detection, and scores tuning
    trials. ``keep`` is the epoch whose weights become the model (and whose ``monitor`` value
    scores a trial): ``best`` by ``monitor``, or ``last``, the final epoch (nnU-Net's final
    checkpoint) — the same epoch on every CPU, where a best epoch a few thousandths ahead of
    its neighbours can move with the CPU's rounding (README, Results).
    ``strategy`` (:mod:`unetops.distribute`): ``default`` one device, no ``tf.distribute``;
    ``mirrored`` all local GPUs; ``multi_worker`` several hosts, the cluster from ``TF_CONFIG``.
    ``batch_size`` is the global batch, split evenly over the strategy's replicas.
    ``precision`` is the training compute dtype (Keras mixed precision: float32 variables,
    half-precision activations and matmuls): ``auto`` is ``mixed_float16`` on a GPU and
    ``float32`` on a CPU, where results then match the float32 figures; ``mixed_bfloat16`` pays
    off on CPUs with native bfloat16 (AVX512_BF16 or AMX) for wide nets only
    (``benchmarks/bench_train.py``). The saved model is float32 whatever trained it.
    """

    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    epochs: Annotated[int, Field(ge=1, le=10000)] = 20
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    strategy: Literal["default", "mirrored", "multi_worker"] = "default"
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-3
    patch_size: Annotated[int, Field(ge=8, le=2048)] = 48
    patches_per_epoch: Annotated[int, Field(ge=1, le=10_000_000)] = 4096
    val_patches: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    vessel_fraction: Probability = 0.0
    dihedral: bool = False
    loss: Literal["bce", "weighted_bce", "weight_map", "dice", "bce_dice", "tversky",
                  "bce_tversky"] = "bce"
    pos_weight: Annotated[float, Field(gt=0.0, le=1000.0)] | None = None
    tversky_beta: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.7
    batch_dice: bool = False
    ema_momentum: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    lr_schedule: Literal["constant", "cosine", "triangular", "exp_range"] = "constant"
    lr_min: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-5
    cycle_steps: Annotated[int, Field(ge=1, le=1_000_000)] = 500
    cycle_gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.999
    reduce_lr_patience: Annotated[int, Field(ge=0, le=1000)] = 0
    reduce_lr_factor: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    early_stopping_patience: Annotated[int, Field(ge=0, le=10000)] = 0
    monitor: Literal["val_iou", "val_f1", "val_auc", "val_loss"] = "val_f1"
    keep: Literal["best", "last"] = "best"
    use_tuned: bool = False

    @model_validator(mode="after")
    def _schedule_is_consistent(self):
        if self.lr_schedule != "constant" and self.lr_min >= self.learning_rate:
            raise ValueError(f"lr_min must be below learning_rate for lr_schedule {self.lr_schedule}")
        if self.reduce_lr_patience and self.lr_schedule != "constant":
            raise ValueError("reduce_lr_patience needs lr_schedule constant "
                             "(a schedule already sets the rate)")
        return self


class EvaluateConfig(Section):
    """Whole-image overlap-tile prediction (``evaluate`` and ``unetops predict``) and model promotion.

    ``tile`` is the largest input tile; each image's tile shrinks to what its tile count needs
    (:func:`unetops.tiling.fit_tile`). ``overlap`` is the fraction of a tile shared with its
    neighbour; ``blend`` weighs overlaps with nnU-Net's Gaussian or uniformly; ``batch_size``
    caps tiles per forward pass; ``flip_tta`` averages the four mirror images (4× the time).
    ``engine`` runs the forward pass: ``openvino`` converts the Keras model to OpenVINO and runs
    it on the CPU (the same float32 probabilities within 1e-5, 1.3-1.4× TensorFlow's speed
    on a 2-core Intel Xeon), ``tensorflow`` calls the model in a ``tf.function``, ``auto`` is
    ``tensorflow`` where TensorFlow sees a GPU and ``openvino`` elsewhere. ``precision:
    bfloat16`` lets OpenVINO compute in bfloat16 (about 3× faster again on CPUs with AVX512_BF16
    or AMX, probabilities within about 0.005, the DRIVE and STARE rows' figures within 0.0016;
    float32 where the CPU has neither); the TensorFlow engine predicts in float32.
    ``jit_compile`` runs TensorFlow's forward pass through XLA (``auto``: only when TensorFlow's
    oneDNN kernels are off, ``TF_ENABLE_ONEDNN_OPTS=0``; with them on, plain TF is faster on CPU).
    ``benchmarks/bench_predict.py`` times each choice. ``curve_points`` is the ROC/PR plot's
    resolution; ``champion_metric`` is the validation metric (pooled FOV pixels, threshold 0.5)
    a new model must beat to take the registry alias ``champion``.
    """

    tile: Annotated[int, Field(ge=16, le=4096)] = 512
    overlap: Annotated[float, Field(ge=0.0, le=0.9)] = 0.25
    blend: Literal["gaussian", "uniform"] = "gaussian"
    batch_size: Annotated[int, Field(ge=1, le=256)] = 8
    flip_tta: bool = False
    engine: Literal["auto", "tensorflow", "openvino"] = "auto"
    precision: Literal["float32", "bfloat16"] = "float32"
    jit_compile: bool | Literal["auto"] = "auto"
    curve_points: Annotated[int, Field(ge=10, le=10000)] = 200
    champion_metric: Literal["f1", "iou", "auc_roc", "auc_pr"] = "f1"

    @model_validator(mode="after")
    def _bfloat16_needs_openvino(self):
        if self.engine == "tensorflow" and self.precision != "float32":
            raise ValueError("precision bfloat16 needs engine openvino (or auto): the TensorFlow "
                             "engine predicts in float32")
        return self


def _like(section: type[Section], field: str):
    """The type of ``section.field`` with its bounds, so a searched value obeys the field's rules."""
    info = section.model_fields[field]
    return Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation


def _choices(item_type):
    """A non-empty list of distinct values, each of ``item_type``."""

    def distinct(values: tuple) -> tuple:
        if len(set(values)) != len(values):
            raise ValueError("choices must be distinct")
        return values

    return Annotated[tuple[item_type, ...], Field(min_length=1), AfterValidator(distinct)]


class SearchRange(Section):
    """A range of values searched by ``tune``; subclasses give ``low``/``high`` their types."""

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError("low must not exceed high")
        return self


class EpochRange(SearchRange):
    """Epochs per trial, ``low``..``high`` inclusive."""

    low: _like(TrainConfig, "epochs")
    high: _like(TrainConfig, "epochs")
    log: bool = False


class LearningRateRange(SearchRange):
    """Adam's learning rate in [low, high]; log scale by default (rates span decades)."""

    low: _like(TrainConfig, "learning_rate")
    high: _like(TrainConfig, "learning_rate")
    log: bool = True


class SearchSpace(Section):
    """What ``tune`` searches: each entry a range or a list of choices (null: not searched).

    ``TARGETS`` maps each entry to the dotted key a trial overrides (the same keys appear in the
    hyperparameter table and in ``reports/best_params.yaml``). Values obey the target key's own
    bounds. Augmentation is not searched: it is the upstream ``augment`` stage's offline output.
    """

    TARGETS: ClassVar[dict[str, str]] = {
        "epochs": "train.epochs",
        "batch_size": "train.batch_size",
        "learning_rate": "train.learning_rate",
        "depth": "model.depth",
        "base_filters": "model.base_filters",
        "loss": "train.loss",
    }

    epochs: EpochRange | None = EpochRange(low=1, high=3)
    batch_size: _choices(_like(TrainConfig, "batch_size")) | None = (16, 32, 64)
    learning_rate: LearningRateRange | None = LearningRateRange(low=1e-4, high=1e-2)
    depth: _choices(_like(ModelConfig, "depth")) | None = None
    base_filters: _choices(_like(ModelConfig, "base_filters")) | None = None
    loss: _choices(_like(TrainConfig, "loss")) | None = None

    def dimensions(self) -> dict:
        """The searched entries as ``{dotted key: range or choices}``, in declaration order."""
        return {target: getattr(self, name) for name, target in self.TARGETS.items()
                if getattr(self, name) is not None}


class PrunerConfig(Section):
    """Optuna's median pruner: stop a trial whose epoch-``k`` val metric is worse than the
    median of earlier trials at epoch ``k`` (never in the first ``startup_trials`` trials or
    before epoch ``warmup_epochs``). ``kind: none`` runs every trial to the end."""

    kind: Literal["median", "none"] = "median"
    startup_trials: Annotated[int, Field(ge=0, le=10000)] = 2
    warmup_epochs: Annotated[int, Field(ge=0, le=10000)] = 0


class TuneConfig(Section):
    """The Optuna study (``unetops tune``): ``n_trials`` finished trials in total, over restarts
    and parallel workers. ``storage`` null is ``sqlite:///data/optuna.db``; any SQLAlchemy URL
    (``postgresql+psycopg2://user@host/db``) lets workers on many hosts share one study.
    ``heartbeat_seconds``: a trial whose worker stops beating for twice this long (killed) is
    marked failed and replaced; null switches heartbeats off. TPE samples at random for the
    first ``sampler_startup_trials`` trials, seeded by ``seed``. The study's name in the storage
    is ``study_name`` plus a fingerprint of every param a trial depends on, so changed params
    start a fresh study and an unchanged rerun continues the old one.
    """

    n_trials: Annotated[int, Field(ge=1, le=100000)] = 8
    seed: int = 0
    sampler_startup_trials: Annotated[int, Field(ge=0, le=10000)] = 4
    study_name: Annotated[str, Field(min_length=1, max_length=512)] = "unetops"
    storage: Annotated[str, Field(min_length=1)] | None = None
    heartbeat_seconds: Annotated[int, Field(ge=1, le=86400)] | None = 60
    pruner: PrunerConfig = PrunerConfig()
    search: SearchSpace = SearchSpace()


class MlflowConfig(Section):
    """Where ``train`` logs: the experiment, and the registered model name (null: no registry)."""

    experiment: Annotated[str, Field(min_length=1, max_length=200)] = "unetops"
    register_model: Annotated[str, Field(min_length=1, max_length=200)] | None = "unetops"


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
        self.roc_csv = self.reports / "roc.csv"
        self.pr_csv = self.reports / "pr.csv"
        self.overlays = self.reports / "overlays"
        self.hyperparameters_md = self.reports / "hyperparameters.md"
        self.hyperparameters_csv = self.reports / "hyperparameters.csv"
        self.best_params = self.reports / "best_params.yaml"
        self.hyperparameters_history = self.reports / "hyperparameters_history.png"
        self.hyperparameters_importance = self.reports / "hyperparameters_importance.png"
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
