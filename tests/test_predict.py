"""unetops predict: PNGs of the original sizes, 16-bit round trip, one-line errors."""

import numpy as np
import pytest
from typer.testing import CliRunner

from unetops.cli import app
from unetops.errors import UnetopsError
from unetops.io import read_image, write_png
from unetops.predict import (Predictor, TileGeometry, collect_images, predict_images,
                             probability_to_uint16, resolve_engine, uint16_to_probability)


def tiny_model(channels: int = 1):
    """A 3×3 convolution with a sigmoid: any input size, output in (0, 1)."""
    import keras

    inputs = keras.Input((None, None, channels))
    outputs = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid",
                                  kernel_initializer=keras.initializers.Constant(0.3),
                                  bias_initializer=keras.initializers.Constant(-1.0))(inputs)
    return keras.Model(inputs, outputs)


def fundus_like(height: int, width: int, seed: int) -> np.ndarray:
    """RGB uint8: a bright disc on black with random texture inside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(height, width) * 0.45) ** 2
    image = rng.integers(60, 200, (height, width, 3)).astype(np.uint8)
    image[~disc] = 0
    return image


@pytest.fixture
def trained(project):
    cfg = project(data={"dataset": "synthetic"}, evaluate={"tile": 32, "jit_compile": False})
    cfg.paths.models.mkdir(parents=True, exist_ok=True)
    tiny_model().save(cfg.paths.model)
    return cfg


def test_probability_round_trips_through_16_bit_png(tmp_path):
    probability = np.random.default_rng(0).random((17, 23)).astype(np.float32)
    probability[0, :3] = [0.0, 1.0, 0.5]
    write_png(tmp_path / "p.png", probability_to_uint16(probability))
    stored = read_image(tmp_path / "p.png")
    assert stored.dtype == np.uint16
    assert np.max(np.abs(uint16_to_probability(stored) - probability)) <= 1 / 65535
    assert stored[0, 0] == 0 and stored[0, 1] == 65535 and stored[0, 2] == 32768


def test_predict_on_a_folder_writes_pngs_of_the_original_sizes(trained, tmp_path):
    folder = tmp_path / "new"
    sizes = {"a": (37, 50), "b": (64, 41)}
    for seed, (stem, (h, w)) in enumerate(sizes.items()):
        write_png(folder / f"{stem}.png", fundus_like(h, w, seed))
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    written = predict_images(trained, [folder], tmp_path / "out")
    assert len(written) == 4
    for stem, size in sizes.items():
        prob = read_image(tmp_path / "out" / f"{stem}_prob.png")
        mask = read_image(tmp_path / "out" / f"{stem}_mask.png")
        assert prob.shape == size and prob.dtype == np.uint16
        assert mask.shape == size and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, prob >= 32768)
        assert prob[0, 0] == 0  # outside the estimated FOV
        assert prob[size[0] // 2, size[1] // 2] > 0


def test_cli_predict_files_with_fov_none(trained, tmp_path):
    write_png(tmp_path / "x.png", fundus_like(30, 30, 3)[..., 1])
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "x.png"), "--out",
                                      str(tmp_path / "o"), "--fov", "none", "-t", "0.0"])
    assert result.exit_code == 0, result.output
    assert (read_image(tmp_path / "o" / "x_mask.png") == 255).all()


def test_cli_bad_input_is_a_one_line_error(trained, tmp_path):
    (tmp_path / "fake.png").write_text("this is not a PNG")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "fake.png"), "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unetops: error: ")
    assert "fake.png: not a readable image" in lines[0]


def test_cli_missing_model_is_a_one_line_error(project, tmp_path):
    project()
    write_png(tmp_path / "x.png", fundus_like(30, 30, 0))
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "x.png"),
                                      "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "models/model.keras: file not found" in result.output


def test_collect_images_rejects_missing_files_empty_folders_and_duplicate_stems(tmp_path):
    with pytest.raises(UnetopsError, match="nope.png: file not found"):
        collect_images([tmp_path / "nope.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnetopsError, match="no image files"):
        collect_images([tmp_path / "empty"])
    for folder in ("a", "b"):
        write_png(tmp_path / folder / "x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(UnetopsError, match="same name"):
        collect_images([tmp_path / "a", tmp_path / "b"])


def test_predictor_rejects_a_model_that_disagrees_with_the_params(project):
    cfg = project(model={"padding": "valid"})
    with pytest.raises(UnetopsError, match="params the model was trained with"):
        Predictor.from_config(tiny_model(), cfg)


def test_tile_geometry_follows_the_model_section(project):
    assert TileGeometry.of(project().model) == TileGeometry(8, 0, 0)
    valid = TileGeometry.of(project(model={"padding": "valid", "depth": 2}).model)
    assert valid.margin > 0 and valid.multiple == 4


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_predictor_with_a_real_unet_returns_the_image_size(project, padding):
    from unetops.model import build_unet

    cfg = project(model={"depth": 2, "base_filters": 2, "padding": padding},
                  evaluate={"tile": 64, "overlap": 0.5, "jit_compile": False})
    predictor = Predictor.from_config(build_unet(1, cfg.model), cfg)
    image = np.random.default_rng(0).random((40, 37, 1), dtype=np.float32)
    probability = predictor(image)
    assert probability.shape == (40, 37)
    assert 0.0 <= probability.min() and probability.max() <= 1.0


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_openvino_engine_gives_tensorflows_probabilities(project, padding):
    """One conversion serves every tile shape, and float32 agrees with TensorFlow's pass."""
    from unetops.model import build_unet

    cfg = project(model={"depth": 2, "base_filters": 4, "padding": padding},
                  evaluate={"tile": 64, "overlap": 0.25, "jit_compile": False})
    model = build_unet(1, cfg.model)
    rng = np.random.default_rng(1)
    engines = {engine: Predictor.from_config(model, cfg.with_overrides({"evaluate.engine": engine}))
               for engine in ("tensorflow", "openvino")}
    assert engines["openvino"].precision == "float32"
    for shape in [(40, 37, 1), (150, 131, 1)]:  # one tile, then several of another size
        image = rng.random(shape, dtype=np.float32)
        reference = engines["tensorflow"](image)
        np.testing.assert_allclose(engines["openvino"](image), reference, atol=1e-5)
        assert not np.array_equal(reference, engines["tensorflow"](image[::-1]))


def test_openvino_bfloat16_stays_close_to_float32(project):
    from unetops.model import build_unet

    cfg = project(model={"depth": 2, "base_filters": 4},
                  evaluate={"tile": 64, "engine": "openvino", "precision": "bfloat16"})
    model = build_unet(1, cfg.model)
    image = np.random.default_rng(2).random((70, 66, 1), dtype=np.float32)
    bf16 = Predictor.from_config(model, cfg)
    assert bf16.precision in ("bfloat16", "float32")  # float32 where the CPU lacks bfloat16
    exact = Predictor.from_config(model, cfg.with_overrides({"evaluate.precision": "float32"}))
    np.testing.assert_allclose(bf16(image), exact(image), atol=0.02)


def test_engine_auto_is_openvino_without_a_gpu_and_bfloat16_needs_it(project):
    import tensorflow as tf

    assert resolve_engine("tensorflow") == "tensorflow"
    assert resolve_engine("auto") == ("tensorflow" if tf.config.list_physical_devices("GPU")
                                      else "openvino")
    with pytest.raises(UnetopsError, match="precision bfloat16 needs engine openvino"):
        project(evaluate={"engine": "tensorflow", "precision": "bfloat16"})
