"""Overlap-tile prediction speed of one DRIVE-size image (565×584) with the default U-Net.

Prints a table: seconds per image (best and median of ``--repeats`` after warm-up) and achieved
GFLOP/s against the machine's fp32 matmul GFLOP/s measured in the same run. FLOPs are the
convolutions' (2 × multiply-adds, transposed convolutions included) of the tiles actually
computed; normalisation, activations and pooling are not counted (memory-bound, a few %).
GFLOP/s use the best time, the least disturbed by other processes on a shared machine; the
methods (and the matmul) are timed in alternating rounds, so background load hits all alike.

    python benchmarks/bench_predict.py [--repeats 7] [--threads N] [--onednn 0|1] [--profile drive]

``--profile NAME`` times that profile's net and tiling (``profiles/NAME.yaml`` over the defaults),
e.g. the ``drive`` profile's U-Net with IterNet's refinement on whole-image tiles: the net whose
0.25 s the DRIVE target is about. Rows time the forward pass of the configured engine
(``evaluate.engine``: OpenVINO on a CPU-only machine, in the params' ``evaluate.precision``) and,
beside it, TensorFlow's and OpenVINO's other precision. Random weights: speed does not depend
on them. Targets (2 CPU cores), printed against the figures after the table (exit status 1 when
one is missed): <= 0.25 s at overlap 0, <= 0.6 s at the default overlap, >= 50 % of the matmul
peak.
"""

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

DRIVE_HEIGHT, DRIVE_WIDTH = 584, 565


def conv_flops(model, batch_shape: tuple[int, int, int, int]) -> int:
    """Convolution FLOPs (2 × MACs) of one forward pass of ``model`` on ``batch_shape``.

    A nested model (the refinement U-Net, run once per pass with shared weights) counts once per
    call, at the shape it is called on."""
    import keras

    clone = keras.models.clone_model(model, input_tensors=keras.Input(batch_shape=batch_shape))
    total = 0
    for layer in clone.layers:
        if isinstance(layer, keras.Model):
            total += sum(conv_flops(layer, tuple(node.input_tensors[0].shape))
                         for node in layer._inbound_nodes)
        elif isinstance(layer, keras.layers.Conv2DTranspose):
            n, h, w, c_in = layer.input.shape
            kh, kw = layer.kernel_size
            total += 2 * n * h * w * c_in * layer.filters * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            n, h, w, c_out = layer.output.shape
            c_in = layer.input.shape[-1] // layer.groups
            total += 2 * n * h * w * c_in * c_out * layer.kernel_size[0] * layer.kernel_size[1]
    return total


def interleaved(calls: dict, repeats: int, warmup: int = 2) -> dict[str, tuple[float, float]]:
    """(best, median) seconds per named call; rounds alternate between calls so that load from
    other processes hits all of them alike. ``warmup`` untimed calls each (tracing, XLA)."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def matmul_call():
    """A 4096² fp32 TensorFlow matmul and its FLOPs: the machine's practical peak."""
    import tensorflow as tf

    n = 4096
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    return (lambda: matmul().numpy()), 2 * n**3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="TF intra-op threads (0: all cores)")
    parser.add_argument("--profile",
                        help="time profiles/PROFILE.yaml's model and evaluate settings")
    parser.add_argument("--onednn", choices=["0", "1"], default=None,
                        help="TF_ENABLE_ONEDNN_OPTS for this run (default: the environment's, "
                             "else unetops' default)")
    args = parser.parse_args()
    if args.onednn is not None:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = args.onednn

    import unetops  # noqa: F401  (sets the TF environment before TensorFlow loads)
    import numpy as np
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)

    from unetops.config import Config
    from unetops.model import build_unet
    from unetops.predict import Predictor, onednn_enabled, resolve_engine
    from unetops.profiles import flat_items, read_profile
    from unetops.tiling import tile_starts

    cfg = Config()
    if args.profile:
        root = Path(__file__).resolve().parent.parent
        cfg = cfg.with_overrides(dict(flat_items(read_profile(root, args.profile))))
    model = build_unet(1, cfg.model)
    image = np.random.default_rng(0).random((DRIVE_HEIGHT, DRIVE_WIDTH, 1), dtype=np.float32)
    peak_call, peak_flops = matmul_call()
    calls = {"peak": peak_call}
    rows = []  # (label, tiles, flops)
    padded = np.zeros((1, 584, 568, 1), np.float32)  # whole image, width rounded up to 2**depth
    reference = "model.predict, whole image (reference)"
    calls[reference] = lambda: model.predict(padded, verbose=0)
    rows.append((reference, "1 × 584×568", conv_flops(model, padded.shape)))

    overlap = cfg.evaluate.overlap
    auto_xla = not onednn_enabled()
    engine = resolve_engine(cfg.evaluate.engine)
    no_overlap = "overlap-tile, overlap 0"
    default = f"overlap-tile, overlap {overlap} ({args.profile or 'default'})"
    tensorflow = {"evaluate.engine": "tensorflow", "evaluate.precision": "float32"}
    other_precision = "float32" if cfg.evaluate.precision == "bfloat16" else "bfloat16"
    settings = [
        (no_overlap, {"evaluate.overlap": 0.0}),
        (default, {}),
        (f"overlap-tile, overlap {overlap}, tile 256", {"evaluate.tile": 256}),
        (f"overlap-tile, overlap {overlap}, flip TTA", {"evaluate.flip_tta": True}),
        (f"overlap {overlap}, TensorFlow engine", tensorflow),
        (f"overlap {overlap}, TensorFlow, {'no XLA' if auto_xla else 'XLA'}",
         {**tensorflow, "evaluate.jit_compile": not auto_xla}),
        (f"overlap {overlap}, OpenVINO, {other_precision}",
         {"evaluate.engine": "openvino", "evaluate.precision": other_precision}),
    ]
    for label, overrides in settings:
        predictor = Predictor.from_config(model, cfg.with_overrides(overrides))
        if predictor.precision != predictor.settings.precision:  # no bfloat16 on this CPU
            label += f" (ran in {predictor.precision})"
        tile = predictor.tile_for(DRIVE_HEIGHT, DRIVE_WIDTH)
        s = predictor.settings
        n_tiles = (len(tile_starts(DRIVE_HEIGHT, tile[0], s.overlap))
                   * len(tile_starts(DRIVE_WIDTH, tile[1], s.overlap))) * (4 if s.flip_tta else 1)
        calls[label] = functools.partial(predictor, image)
        flops = conv_flops(model, (n_tiles, *tile, 1))
        rows.append((label, f"{n_tiles} × {tile[0]}×{tile[1]}", flops))

    timings = interleaved(calls, args.repeats)
    peak = peak_flops / timings["peak"][0] / 1e9
    threads = args.threads or os.cpu_count()
    refined = (f" + {cfg.model.refine_passes} refinement passes" if cfg.model.refine_passes
               else "")
    print(f"\nDRIVE-size image {DRIVE_WIDTH}×{DRIVE_HEIGHT}, "
          f"{'profile ' + args.profile if args.profile else 'default params'}: U-Net depth "
          f"{cfg.model.depth}, {cfg.model.base_filters} base filters, {cfg.model.norm} norm"
          f"{refined}, tile {cfg.evaluate.tile}; {threads} threads; engine {engine} "
          f"({cfg.evaluate.precision}); TensorFlow's oneDNN {'on' if onednn_enabled() else 'off'}, "
          f"default XLA {'on' if auto_xla else 'off'}; "
          f"fp32 matmul peak {peak:.0f} GFLOP/s; best / median of {args.repeats}\n")
    print(f"| {'method':46} | {'tiles':16} | best s | median s | GFLOP | GFLOP/s | % peak |")
    print(f"|{'-' * 48}|{'-' * 18}|-------:|---------:|------:|--------:|-------:|")
    share = {}
    for label, tiles, flops in rows:
        best, median = timings[label]
        rate = flops / best / 1e9
        share[label] = 100 * rate / peak
        print(f"| {label:46} | {tiles:16} | {best:6.3f} | {median:8.3f} | {flops / 1e9:5.1f} "
              f"| {rate:7.0f} | {share[label]:5.0f}% |")

    targets = [  # (figure, measured, target, met)
        (f"{no_overlap}, best s", f"{timings[no_overlap][0]:.3f}", "<= 0.25",
         timings[no_overlap][0] <= 0.25),
        (f"{default}, best s", f"{timings[default][0]:.3f}", "<= 0.6", timings[default][0] <= 0.6),
        (f"{default}, % of the matmul peak", f"{share[default]:.0f}%", ">= 50%",
         share[default] >= 50),
    ]
    print(f"\n| {'figure':58} | measured | target  | result |")
    print(f"|{'-' * 60}|---------:|---------|--------|")
    for figure, measured, target, met in targets:
        print(f"| {figure:58} | {measured:>8} | {target:7} | {'met' if met else 'MISSED':6} |")
    return 0 if all(met for *_, met in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
