"""A trained model applied to whole images, for the ``evaluate`` stage and ``unetops predict``.

``unetops predict IMAGE... --out DIR`` is what users run after training: each image (or every
image in a folder) goes through the training preprocessing (``params.yaml`` → ``preprocess``),
overlap-tile prediction (``evaluate`` section: tile, overlap, blending, flip TTA) and back to its
original size, and two PNGs are written per image:

- ``<stem>_prob.png``: 16-bit grayscale probability, value = round(p × 65535) (DESIGN §2),
- ``<stem>_mask.png``: 8-bit 0/255 mask, p >= ``--threshold`` (0.5 by default, the threshold of
  record; ``reports/metrics.json`` → ``val_best_threshold.threshold`` is the validation-tuned
  one).

The field of view (``--fov``): ``auto`` estimates it (:func:`unetops.fov.estimate_fov`) for
fundus datasets (``stare``, ``drive``, ``synthetic``, and ``folder`` when it declares FOV masks)
and uses the whole image otherwise (ISBI 2012 and other modalities); ``estimate``/``none`` force
either. Probabilities outside the FOV are 0, as in ``evaluate``, so the two agree pixel for pixel.

The model is ``models/model.keras`` by default, or any ``.keras`` file, or an MLflow model URI
(``models:/unetops@champion``, ``models:/unetops/3``, ``runs:/<run id>/model``).
"""

import enum
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from unetops.config import Config, EvaluateConfig, ModelConfig
from unetops.console import log, track
from unetops.errors import UnetopsError
from unetops.io import read_image, write_png
from unetops.tiling import PredictFn, fit_tile, overlap_tile_predict

#: File suffixes taken from a folder given to ``unetops predict`` (files named directly are
#: always tried, whatever their suffix).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".ppm", ".pgm", ".gif",
                  ".webp", ".jp2"}
PNG16_MAX = 65535
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
FUNDUS_DATASETS = {"stare", "drive", "synthetic"}


class FovMode(str, enum.Enum):
    auto = "auto"
    estimate = "estimate"
    none = "none"


# --- probabilities as 16-bit PNG ----------------------------------------------------------------

def probability_to_uint16(probability: np.ndarray) -> np.ndarray:
    """round(p × 65535) as uint16 (p clipped to [0, 1]); the stored form of DESIGN §2."""
    return np.rint(np.clip(probability, 0.0, 1.0) * PNG16_MAX).astype(np.uint16)


def uint16_to_probability(values: np.ndarray) -> np.ndarray:
    """The inverse of :func:`probability_to_uint16`, within 0.5 / 65535."""
    return np.asarray(values, np.float32) / np.float32(PNG16_MAX)


def resize_probability(probability: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (h, w) probability map to (height, width), kept in [0, 1]."""
    if probability.shape == tuple(size):
        return probability
    resized = cv2.resize(probability.astype(np.float32), (size[1], size[0]),
                         interpolation=cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0)


# --- the model and the tiler ------------------------------------------------------------------

def load_model(ref: str | Path | None, cfg: Config):
    """A Keras model from a ``.keras`` file (default ``models/model.keras``) or an MLflow URI."""
    import keras

    ref = cfg.paths.model if ref is None else ref
    if isinstance(ref, str) and ref.startswith(MLFLOW_SCHEMES):
        return _load_mlflow_model(ref, cfg)
    path = Path(ref)
    shown = cfg.paths.rel(path) if path.resolve().is_relative_to(cfg.paths.root.resolve()) else path
    if not path.is_file():
        hint = " (run unetops train first)" if path == cfg.paths.model else ""
        raise UnetopsError(f"{shown}: file not found{hint}")
    try:
        return keras.saving.load_model(path, compile=False)
    except (ValueError, OSError, TypeError, KeyError) as exc:
        raise UnetopsError(f"{shown}: not a loadable Keras model "
                           f"({exc.__class__.__name__})") from None


def _load_mlflow_model(uri: str, cfg: Config):
    import mlflow.keras
    from mlflow.exceptions import MlflowException

    from unetops import tracking

    tracking.setup(cfg)
    try:
        return mlflow.keras.load_model(uri, load_model_kwargs={"compile": False})
    except (MlflowException, OSError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UnetopsError(f"{uri}: cannot load the model ({message})") from None


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels (yes unless ``TF_ENABLE_ONEDNN_OPTS=0``)."""
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false")


def resolve_engine(engine: str) -> str:
    """``evaluate.engine`` with ``auto`` decided: TensorFlow where it sees a GPU, else OpenVINO."""
    if engine != "auto":
        return engine
    import tensorflow as tf

    return "tensorflow" if tf.config.list_physical_devices("GPU") else "openvino"


def openvino_predict_fn(model, precision: str = "float32") -> tuple[PredictFn, str]:
    """The model converted to OpenVINO and compiled for the CPU, and the precision it runs in.

    Traced with unknown batch and tile sizes, so one conversion serves every tile shape (traced
    at one size, the transposed convolutions' output shapes would be frozen). OpenVINO fuses
    convolution, normalisation and activation for the CPU it runs on; asked for bfloat16, it
    computes in it only where the CPU has bfloat16 instructions, and in float32 elsewhere.
    """
    import openvino as ov
    import tensorflow as tf

    channels = int(model.input_shape[-1])
    forward = tf.function(lambda batch: model(batch, training=False), input_signature=[
        tf.TensorSpec((None, None, None, channels), tf.float32)])
    compiled = ov.Core().compile_model(
        ov.convert_model(forward.get_concrete_function()), "CPU",
        {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bfloat16" else "f32",
         "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    bfloat16 = compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16

    def predict(batch: np.ndarray) -> np.ndarray:
        return request.infer([np.ascontiguousarray(batch, np.float32)])[0]

    return predict, "bfloat16" if bfloat16 else "float32"


def compiled_predict_fn(model, jit_compile: bool | str = "auto") -> PredictFn:
    """The model's forward pass as a numpy callable (images of many sizes share one trace).

    Calling the model inside a ``tf.function`` instead of ``model.predict`` per batch avoids
    Keras' per-call data-adapter overhead; ``training=False`` keeps dropout off and batch
    normalisation on its moving statistics (seed 000 left dropout on at inference). XLA fuses
    convolution, normalisation and activation, which pays off only without oneDNN's kernels
    (``auto``); the benchmark measures both.
    """
    import tensorflow as tf

    if jit_compile == "auto":
        jit_compile = not onednn_enabled()
    forward = tf.function(lambda batch: model(batch, training=False), jit_compile=jit_compile,
                          reduce_retracing=True)

    def predict(batch: np.ndarray) -> np.ndarray:
        return forward(tf.convert_to_tensor(batch, tf.float32)).numpy()

    return predict


@dataclass(frozen=True)
class TileGeometry:
    """Valid input tiles are ``offset + k * multiple`` px; the output loses ``margin`` per side."""

    multiple: int
    offset: int
    margin: int

    @classmethod
    def of(cls, model_cfg: ModelConfig) -> "TileGeometry":
        from unetops import model as unet

        if model_cfg.padding == "same":
            return cls(unet.input_multiple(model_cfg), 0, 0)
        return cls(2 ** model_cfg.depth, unet.valid_input_size(model_cfg, 1),
                   unet.output_margin(model_cfg))


class Predictor:
    """A model plus tiling settings: preprocessed (H, W, C) image in, (H, W) probabilities out."""

    def __init__(self, model, settings: EvaluateConfig, geometry: TileGeometry,
                 name: str = "model"):
        self.model = model
        self.settings = settings
        self.geometry = geometry
        self.name = name
        self.channels = int(model.input_shape[-1])
        self.engine = resolve_engine(settings.engine)
        self.precision = "float32"
        if self.engine == "openvino":
            self.predict_fn, self.precision = openvino_predict_fn(model, settings.precision)
        else:
            self.predict_fn = compiled_predict_fn(model, settings.jit_compile)

    @classmethod
    def from_config(cls, model, cfg: Config, name: str = "model") -> "Predictor":
        predictor = cls(model, cfg.evaluate, TileGeometry.of(cfg.model), name)
        predictor.check(cfg.evaluate.tile)
        return predictor

    def tile_for(self, height: int, width: int) -> tuple[int, int]:
        s, g = self.settings, self.geometry
        return (fit_tile(height, s.tile, s.overlap, g.multiple, g.offset, g.margin),
                fit_tile(width, s.tile, s.overlap, g.multiple, g.offset, g.margin))

    def check(self, size: int) -> None:
        """Fail early, naming the model, when its output size disagrees with params.yaml."""
        g = self.geometry
        size = max(size, g.offset)
        size += (g.offset - size) % g.multiple
        try:
            out = self.model.compute_output_shape((1, size, size, self.channels))
        except ValueError:
            out = None
        if isinstance(out, list) and len(out) == 1:  # a reloaded functional model lists its output
            out = out[0]
        if out is None or tuple(out[1:3]) != (size - 2 * g.margin,) * 2:
            raise UnetopsError(
                f"{self.name}: a {size}x{size} tile does not give a "
                f"{size - 2 * g.margin}x{size - 2 * g.margin} output as params.yaml's model "
                f"section implies (use the params the model was trained with)")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != self.channels:
            raise UnetopsError(f"{self.name}: expects {self.channels}-channel input, preprocessing "
                               f"gives shape {image.shape} (check preprocess.channel)")
        s = self.settings
        out = overlap_tile_predict(image, self.predict_fn, self.tile_for(*image.shape[:2]),
                                   overlap=s.overlap, blend=s.blend, batch_size=s.batch_size,
                                   flip_tta=s.flip_tta, margin=self.geometry.margin)
        return np.clip(out[..., 0], 0.0, 1.0)


# --- unetops predict ----------------------------------------------------------------------------

def collect_images(inputs: list[Path]) -> list[Path]:
    """Files as given, folders as their image files (sorted by name, not recursive)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith("."))
            if not found:
                raise UnetopsError(f"{item}: no image files in folder "
                                   f"(expect {', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise UnetopsError(f"{item}: file not found")
    if not files:
        raise UnetopsError("predict: no input images given")
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems and stems[path.stem] != path:
            raise UnetopsError(f"{path}: same name as {stems[path.stem]} (outputs are named by "
                               f"file stem; predict them into different --out folders)")
        stems[path.stem] = path
    return list(stems.values())


def wants_fov_estimate(mode: FovMode, cfg: Config) -> bool:
    if mode is not FovMode.auto:
        return mode is FovMode.estimate
    if cfg.data.dataset == "folder":
        return cfg.data.folder.fov is not None
    return cfg.data.dataset in FUNDUS_DATASETS


def predict_image(image: np.ndarray, predictor: Predictor, cfg: Config,
                  estimate: bool) -> tuple[np.ndarray, np.ndarray]:
    """(probability, fov) of one raw image at its original size; 0 outside the FOV."""
    from unetops.fov import estimate_fov
    from unetops.preprocessing import preprocess_image

    height, width = image.shape[:2]
    fov = estimate_fov(image) if estimate else np.ones((height, width), bool)
    probability = resize_probability(predictor(preprocess_image(image, fov, cfg.preprocess)),
                                     (height, width))
    return np.where(fov, probability, np.float32(0.0)), fov


def predict_images(cfg: Config, inputs: list[Path], out: Path, model_ref: str | None = None,
                   threshold: float = 0.5, fov: FovMode = FovMode.auto) -> list[Path]:
    """Probability and mask PNGs for every input image in ``out``; returns the paths written."""
    if not 0.0 <= threshold <= 1.0:
        raise UnetopsError(f"--threshold: {threshold} is not in [0, 1]")
    files = collect_images(inputs)
    model = load_model(model_ref, cfg)
    name = str(model_ref or cfg.paths.rel(cfg.paths.model))
    predictor = Predictor.from_config(model, cfg, name=name)
    estimate = wants_fov_estimate(FovMode(fov), cfg)
    written = []
    # One image in memory at a time; a file that is no image stops the run with its name.
    for path in track(files, "predict"):
        probability, _ = predict_image(read_image(path), predictor, cfg, estimate)
        prob_path = Path(out) / f"{path.stem}_prob.png"
        mask_path = Path(out) / f"{path.stem}_mask.png"
        write_png(prob_path, probability_to_uint16(probability))
        write_png(mask_path, ((probability >= threshold) * 255).astype(np.uint8))
        written += [prob_path, mask_path]
    log.info("predict: %d image(s) → %s (threshold %.3g, FOV %s)", len(files), out, threshold,
             "estimated" if estimate else "whole image")
    return written
