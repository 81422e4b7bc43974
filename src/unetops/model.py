"""The U-Net (Ronneberger et al., 2015) as one Keras 3 functional builder, configured by ``model``.

Built-in layers only, so ``keras.saving.load_model(path, compile=False)`` loads a saved model
without ``custom_objects``. The input is fully convolutional, ``(None, None, C)``:

- ``padding: same``: the output has the input's size; height and width must be multiples of
  ``2 ** depth`` (:func:`input_multiple`).
- ``padding: valid``: the skips are cropped as in the paper and the output is the input's centre,
  :func:`output_margin` px smaller per side; sizes that pool evenly are given by
  :func:`valid_input_size`.
"""

import contextlib
import math

import keras
from keras import layers

from unetops.config import ModelConfig


def _lost_below(cfg: ModelConfig, level: int) -> int:
    """Pixels (total, not per side) that ``valid`` convolutions remove from ``level`` downwards."""
    convs = 0 if cfg.padding == "same" else 2 * cfg.convs_per_level
    if level == cfg.depth:
        return convs
    return 2 * convs + 2 * _lost_below(cfg, level + 1)


def output_margin(cfg: ModelConfig) -> int:
    """Pixels lost per side between input and output (0 for ``same`` padding; 92 for the paper's)."""
    return _lost_below(cfg, 0) // 2


def input_multiple(cfg: ModelConfig) -> int:
    """Input height and width must be a multiple of this for ``same`` padding (``2 ** depth``,
    or of the refinement U-Net's depth if deeper)."""
    return 2 ** max(cfg.depth, cfg.refine_depth if cfg.refine_passes else 0)


def valid_input_size(cfg: ModelConfig, at_least: int) -> int:
    """The smallest input size ≥ ``at_least`` that every pooling halves evenly, with output ≥ 1 px."""
    size = max(at_least, 2 * output_margin(cfg) + 1)
    while not _pools_evenly(cfg, size):
        size += 1
    return size


def _pools_evenly(cfg: ModelConfig, size: int) -> bool:
    shrink = 0 if cfg.padding == "same" else 2 * cfg.convs_per_level
    for _ in range(cfg.depth):
        size -= shrink
        if size <= 0 or size % 2:
            return False
        size //= 2
    return True


def _normalization(cfg: ModelConfig, filters: int, name: str):
    if cfg.norm == "batch":
        return layers.BatchNormalization(name=name)
    groups = filters if cfg.norm == "instance" else math.gcd(cfg.norm_groups, filters)
    return layers.GroupNormalization(groups=groups, name=name)


def _conv_block(x, filters: int, cfg: ModelConfig, name: str):
    """``convs_per_level`` × (3×3 convolution → normalisation → ReLU)."""
    for i in range(1, cfg.convs_per_level + 1):
        x = layers.Conv2D(filters, 3, padding=cfg.padding, use_bias=cfg.norm == "none",
                          kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        if cfg.norm != "none":
            x = _normalization(cfg, filters, f"{name}_norm{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


@contextlib.contextmanager
def _dtype_policy(name: str):
    """Layers built inside take Keras' dtype policy ``name``; the global policy is restored after."""
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def build_unet(input_channels: int, cfg: ModelConfig | None = None,
               dtype_policy: str = "float32", every_map: bool = False) -> keras.Model:
    """The U-Net for ``input_channels``-channel images: encoder, bottleneck, decoder, sigmoid map.

    Layers are named by place (``enc1_conv2``, ``bottleneck_norm1``, ``dec0_up``, ``mask``) so
    summaries, weight files and MLflow's model view read like the architecture. ``cfg`` defaults
    to ``ModelConfig()``. ``dtype_policy`` (``mixed_float16``, ``mixed_bfloat16``) computes in
    half precision; variables and the sigmoid map stay float32, so the weights of one policy load
    into the other. With ``cfg.refine_passes`` the U-Net's map is refined (:func:`_refined`);
    ``every_map`` then stacks the U-Net's map and every pass's on the channel axis, the last
    pass last, for training to supervise them all. Either way the weights are the same, in the
    same order.
    """
    cfg = cfg or ModelConfig()
    with _dtype_policy(dtype_policy):
        unet = _unet(input_channels, cfg)
        return _refined(unet, cfg, every_map) if cfg.refine_passes else unet


def _refined(unet: keras.Model, cfg: ModelConfig, every_map: bool) -> keras.Model:
    """IterNet (Li et al., 2020): one small U-Net, weights shared, run ``refine_passes`` times.

    Each pass sees the image, the previous pass's map and the U-Net's last decoder features, so
    it can mend a broken vessel from the map alone while the features keep what the map lost.
    """
    features = unet.get_layer(f"dec0_relu{cfg.convs_per_level}").output
    small = cfg.model_copy(update={"depth": cfg.refine_depth, "base_filters": cfg.refine_filters,
                                   "dropout": 0.0, "refine_passes": 0})
    refiner = _unet(unet.input_shape[-1] + 1 + features.shape[-1], small, model_name="refiner")
    maps = [unet.output]
    for step in range(1, cfg.refine_passes + 1):
        inputs = layers.Concatenate(name=f"pass{step}_input")([unet.input, maps[-1], features])
        maps.append(refiner(inputs))
    output = (layers.Concatenate(name="every_map", dtype="float32")(maps) if every_map
              else maps[-1])
    return keras.Model(unet.input, output, name="iternet")


def _unet(input_channels: int, cfg: ModelConfig, model_name: str = "unet") -> keras.Model:
    inputs = keras.Input((None, None, input_channels), name="image")
    x, skips = inputs, []
    for level in range(cfg.depth + 1):
        name = "bottleneck" if level == cfg.depth else f"enc{level}"
        x = _conv_block(x, cfg.base_filters * 2**level, cfg, name)
        if level > cfg.depth - cfg.dropout_levels and cfg.dropout > 0:
            x = layers.Dropout(cfg.dropout, name=f"{name}_dropout")(x)
        if level < cfg.depth:
            skips.append(x)
            x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    for level in reversed(range(cfg.depth)):
        filters = cfg.base_filters * 2**level
        if cfg.upsampling == "transpose":
            x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"dec{level}_up")(x)
        else:
            x = layers.UpSampling2D(2, interpolation="bilinear", name=f"dec{level}_up")(x)
            x = layers.Conv2D(filters, 2, padding="same", name=f"dec{level}_upconv")(x)
        skip = skips[level]
        if crop := _lost_below(cfg, level + 1):
            skip = layers.Cropping2D(crop, name=f"dec{level}_crop")(skip)
        x = layers.Concatenate(name=f"dec{level}_concat")([skip, x])
        x = _conv_block(x, filters, cfg, f"dec{level}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="mask")(x)
    return keras.Model(inputs, outputs, name=model_name)
