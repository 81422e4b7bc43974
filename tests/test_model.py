"""The U-Net builder: output sizes for same/valid padding, the seeds' variants, IterNet refinement, saving."""

import numpy as np
import pytest

from unetops.config import ModelConfig
from unetops.model import build_unet, input_multiple, output_margin, valid_input_size


def predict_shape(cfg: ModelConfig, size: int, channels: int = 1) -> tuple:
    model = build_unet(channels, cfg)
    return model(np.zeros((1, size, size, channels), np.float32), training=False).shape


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_same_padding_keeps_the_input_size(depth):
    cfg = ModelConfig(depth=depth, base_filters=2, padding="same")
    size = 3 * input_multiple(cfg)
    assert predict_shape(cfg, size, channels=3) == (1, size, size, 1)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_valid_padding_shrinks_the_output_by_the_margin(depth):
    cfg = ModelConfig(depth=depth, base_filters=2, padding="valid")
    size = valid_input_size(cfg, 2 * output_margin(cfg) + 8)
    out = size - 2 * output_margin(cfg)
    assert output_margin(cfg) > 0
    assert predict_shape(cfg, size) == (1, out, out, 1)


def test_valid_margin_matches_the_unet_paper():
    paper = ModelConfig(depth=4, base_filters=64, padding="valid")
    assert output_margin(paper) == 92  # 572 in, 388 out
    assert valid_input_size(paper, 572) == 572
    assert valid_input_size(paper, 570) == 572


def test_same_padding_has_no_margin_and_needs_multiples_of_two_to_the_depth():
    cfg = ModelConfig(depth=3, padding="same")
    assert output_margin(cfg) == 0
    assert input_multiple(cfg) == 8
    assert valid_input_size(cfg, 45) == 48


@pytest.mark.parametrize("norm, layer", [("batch", "BatchNormalization"),
                                         ("group", "GroupNormalization"),
                                         ("instance", "GroupNormalization"), ("none", None)])
def test_normalisation_choices(norm, layer):
    model = build_unet(1, ModelConfig(depth=2, base_filters=4, norm=norm))
    kinds = {type(lay).__name__ for lay in model.layers}
    if layer:
        assert layer in kinds
    else:
        assert not kinds & {"BatchNormalization", "GroupNormalization"}
    if norm == "instance":
        assert model.get_layer("enc1_norm1").groups == 8  # one group per channel


def test_dropout_on_the_deepest_levels_and_named_layers():
    model = build_unet(1, ModelConfig(depth=4, base_filters=2, dropout=0.5, dropout_levels=2))
    dropouts = sorted(lay.name for lay in model.layers if type(lay).__name__ == "Dropout")
    assert dropouts == ["bottleneck_dropout", "enc3_dropout"]
    assert model.output_shape == (None, None, None, 1)
    assert model.get_layer("mask").activation.__name__ == "sigmoid"


def test_bilinear_upsampling_has_no_transposed_convolutions():
    model = build_unet(1, ModelConfig(depth=2, base_filters=2, upsampling="bilinear"))
    kinds = {type(lay).__name__ for lay in model.layers}
    assert "UpSampling2D" in kinds and "Conv2DTranspose" not in kinds
    assert predict_shape(ModelConfig(depth=2, base_filters=2, upsampling="bilinear"), 16) == (
        1, 16, 16, 1)


def test_saved_model_loads_without_custom_objects(tmp_path):
    import keras

    model = build_unet(2, ModelConfig(depth=2, base_filters=2, norm="group", dropout=0.5))
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    x = np.random.default_rng(0).random((1, 16, 16, 2), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_dropout_levels_beyond_the_bottleneck_is_a_config_error():
    with pytest.raises(ValueError, match="dropout_levels"):
        ModelConfig(depth=2, dropout_levels=4)


def test_mixed_precision_computes_in_half_but_keeps_float32_weights_and_output():
    import keras

    cfg = ModelConfig(depth=2, base_filters=2)
    mixed = build_unet(1, cfg, dtype_policy="mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    convs = [layer for layer in mixed.layers if isinstance(layer, keras.layers.Conv2D)]
    assert {layer.compute_dtype for layer in convs[:-1]} == {"bfloat16"}
    assert {w.dtype for w in mixed.weights} == {"float32"}
    x = np.random.default_rng(0).random((1, 16, 16, 1), dtype=np.float32)
    assert mixed.predict(x, verbose=0).dtype == np.float32
    plain = build_unet(1, cfg)
    plain.set_weights(mixed.get_weights())
    # bfloat16 keeps 8 bits of mantissa: the same weights give nearly the same map
    np.testing.assert_allclose(plain.predict(x, verbose=0), mixed.predict(x, verbose=0), atol=0.05)


def test_refinement_passes_share_one_small_unet_and_output_the_last_map(tmp_path):
    import keras

    cfg = ModelConfig(depth=1, base_filters=4, refine_passes=2, refine_depth=3, refine_filters=2)
    assert input_multiple(cfg) == 8  # the refiner pools deeper than the U-Net
    every = build_unet(3, cfg, every_map=True)
    last = build_unet(3, cfg)
    plain = build_unet(3, cfg.model_copy(update={"refine_passes": 0}))
    refiner = every.get_layer("refiner")
    assert refiner.input_shape[-1] == 3 + 1 + 4  # image, previous map, the U-Net's features
    assert every.count_params() == plain.count_params() + refiner.count_params()  # shared
    assert last.count_params() == every.count_params()
    x = np.random.default_rng(0).random((2, 16, 16, 3), dtype=np.float32)
    last.set_weights(every.get_weights())
    maps = every.predict(x, verbose=0)
    assert maps.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(last.predict(x, verbose=0), maps[..., -1:], atol=1e-6)
    assert not np.allclose(maps[..., 0], maps[..., -1])  # the passes change the map
    last.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), maps[..., -1:], atol=1e-6)


def test_refinement_needs_same_padding():
    with pytest.raises(ValueError, match="refine_passes needs padding same"):
        ModelConfig(padding="valid", refine_passes=1)
