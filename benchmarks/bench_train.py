"""Training throughput of the default U-Net on 48×48 patches, on this machine's CPU.

    python benchmarks/bench_train.py [--rounds 8] [--patches 2048] [--onednn 0|1] [--depth 3]
                                     [--base-filters 16] [--precision float32]

On synthetic STARE-sized cases (10 train, 2 val, 605×700 gray):

- ``pipeline`` vs ``plain``: one process trains two identical compiled default models (same
  seed), one through unetops' pipeline (``PatchSampler`` → ``training_dataset`` → Keras) and
  one with ``model.fit`` on the same number of patches held in a numpy array, alternating one
  epoch each for ``--rounds`` rounds, so both see the same machine load; medians are reported
  (target ratio pipeline/plain ≥ 1.0), and the ratio of patches per CPU-second, which other
  processes on a shared machine disturb far less than wall-clock rates;
- GFLOP/s: 3 × the forward convolution FLOPs per patch × the best round's patches/s (the
  machine's capability, like the peak it is compared with), against the best fp32
  matmul GFLOP/s (2048², TensorFlow) measured in the same run, before and after the training
  workers (target ≥ 50 %);
- a real ``unetops.stages.train.fit`` (MLflow run in a temporary SQLite store), in its own
  process: its steady-state patches/s and peak resident memory (target ≤ 4 GiB).

Op determinism is on throughout, as in ``unetops train``; the first epoch (graph tracing) is
never timed. ``--precision`` is ``train.precision`` (``mixed_bfloat16`` is a bfloat16 compute
against the same fp32 matmul peak, so its share can pass 100 %). Exit status 1 when a target is missed. ``--onednn 0`` runs the workers with TensorFlow's oneDNN kernels off; by default
they run as ``unetops`` does (TensorFlow's default: on).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 32
PATCH = 48


def write_project(root: Path, n_train: int, n_val: int, height: int, width: int, epochs: int,
                  patches: int, model: dict, precision: str = "float32") -> None:
    """STARE-sized gray cases with line 'vessels' (content does not matter for speed)."""
    import cv2
    import yaml

    from unetops.io import save_arrays

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width]
    fov = ((yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (0.47 * min(height, width)) ** 2)
    rows = ["case,subset,image,mask,fov"]
    for i in range(n_train + n_val):
        mask = np.zeros((height, width), np.uint8)
        for _ in range(60):
            x0, x1 = rng.integers(0, width, 2)
            y0, y1 = rng.integers(0, height, 2)
            cv2.line(mask, (int(x0), int(y0)), (int(x1), int(y1)), 1, int(rng.integers(1, 6)))
        image = (0.6 - 0.3 * mask + rng.normal(0, 0.05, mask.shape)).clip(0, 1)
        arrays = {"image": image.astype(np.float32)[..., None], "mask": mask,
                  "fov": fov.astype(np.uint8)}
        subset = "train" if i < n_train else "val"
        folder = "augmented" if subset == "train" else "preprocessed"
        name = f"c{i:02d}_000.npz" if subset == "train" else f"c{i:02d}.npz"
        save_arrays(root / "data" / folder / name, **arrays)
        rows.append(f"c{i:02d},{subset},x,x,x")
    (root / "data" / "split.csv").write_text("\n".join(rows) + "\n")
    params = {"train": {"epochs": epochs, "batch_size": BATCH, "patch_size": PATCH,
                        "patches_per_epoch": patches, "val_patches": 256, "precision": precision},
              "model": model, "mlflow": {"register_model": None}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def conv_flops_per_patch(model, channels: int) -> float:
    """Forward multiply-adds × 2 of every (transposed) convolution for one 48×48 patch."""
    import keras

    convs = [lay for lay in model.layers if type(lay).__name__ in ("Conv2D", "Conv2DTranspose")]
    probe = keras.Model(model.inputs, [lay.output for lay in convs])
    outputs = probe(np.zeros((1, PATCH, PATCH, channels), np.float32), training=False)
    total = 0.0
    for layer, out in zip(convs, outputs):
        kh, kw, *_ = layer.kernel.shape
        cin = layer.kernel.shape[3] if type(layer).__name__ == "Conv2DTranspose" else layer.kernel.shape[2]
        cout = out.shape[-1]
        pixels = out.shape[1] * out.shape[2]
        if type(layer).__name__ == "Conv2DTranspose":
            pixels //= layer.strides[0] * layer.strides[1]
        total += 2.0 * kh * kw * cin * cout * pixels
    return total


def matmul_gflops(n: int = 2048, repeats: int = 8) -> float:
    import tensorflow as tf

    a = tf.random.uniform((n, n), dtype=tf.float32)
    b = tf.random.uniform((n, n), dtype=tf.float32)
    matmul = tf.function(lambda: tf.linalg.matmul(a, b))
    matmul().numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        matmul().numpy()
    return 2.0 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def alternate_epochs(cfg, rounds: int) -> dict:
    """Median patches/s of the pipeline and of plain numpy ``fit``, epochs interleaved."""
    import keras
    import tensorflow as tf

    from unetops.stages import train

    tf.config.experimental.enable_op_determinism()
    data = train.load_training_data(cfg)
    steps = cfg.train.patches_per_epoch // BATCH
    x, y = data.sampler.sample(steps * BATCH, np.random.default_rng(0))
    models = {}
    for name in ("pipeline", "plain"):
        keras.utils.set_random_seed(0)
        models[name] = train.compile_model(cfg, x.shape[-1], steps, 1.0)
    epoch = train.EpochCounter()
    dataset = train.training_dataset(data.sampler, cfg.train, steps, 0, epoch)
    fits = {"pipeline": lambda: models["pipeline"].fit(dataset, epochs=1, verbose=0),
            "plain": lambda: models["plain"].fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                                                 shuffle=True)}
    rates = {name: [] for name in fits}
    cpu_rates = {name: [] for name in fits}
    for round_ in range(rounds + 1):
        for name, run in fits.items():
            epoch.value = round_
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            if round_:  # round 0 traces the graphs
                rates[name].append(steps * BATCH / (time.perf_counter() - start))
                cpu_rates[name].append(steps * BATCH / (time.process_time() - cpu_start))
    ratios = [a / b for a, b in zip(rates["pipeline"], rates["plain"])]
    return {name: float(np.median(r)) for name, r in rates.items()} | {
        "ratio": float(np.median(ratios)),
        "cpu_ratio": float(np.median(cpu_rates["pipeline"]) / np.median(cpu_rates["plain"])),
        "ranges": {k: (min(r), max(r)) for k, r in rates.items()}}


def worker(kind: str, root: Path, rounds: int) -> dict:
    from unetops.config import load_config

    cfg = load_config(root / "params.yaml")
    if kind == "compare":
        return alternate_epochs(cfg, rounds)
    if kind == "fit":
        from unetops.stages import train

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        result = train.fit(cfg, resume=False, save=True)
        return {"patches_per_second": result.patches_per_second,
                "epochs": len(result.history["loss"])}
    if kind == "flops":
        from unetops.stages import train

        model = train.compile_model(cfg, 1, 1, 1.0)
        return {"forward_flops": conv_flops_per_patch(model, 1),
                "matmul_gflops": max(matmul_gflops() for _ in range(3))}
    raise SystemExit(f"unknown worker {kind}")


def run_worker(kind: str, root: Path, env: dict, rounds: int) -> tuple[dict, float]:
    """The worker's JSON answer and its peak resident memory in GiB."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
               "--root", str(root), "--rounds", str(rounds)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=env, cwd=root)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.stdout.close()
    if status:
        raise SystemExit(f"worker {kind} failed (status {status})")
    return json.loads(out.decode().strip().splitlines()[-1]), usage.ru_maxrss / 2**20


def spread(low_high: tuple[float, float]) -> str:
    return f"{low_high[0]:.0f}–{low_high[1]:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed epochs of each, alternating")
    parser.add_argument("--patches", type=int, default=2048, help="patches per epoch")
    parser.add_argument("--onednn", choices=["0", "1"],
                        help="TF_ENABLE_ONEDNN_OPTS for the workers (default: the environment's)")
    parser.add_argument("--depth", type=int, default=3, help="model.depth")
    parser.add_argument("--base-filters", type=int, default=16, help="model.base_filters")
    parser.add_argument("--precision", default="float32",
                        choices=["float32", "mixed_bfloat16", "mixed_float16"], help="train.precision")
    parser.add_argument("--worker")
    parser.add_argument("--root", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.root, args.rounds)))
        return 0

    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    if args.onednn:
        env["TF_ENABLE_ONEDNN_OPTS"] = args.onednn
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        root = Path(tmp)
        write_project(root, n_train=10, n_val=2, height=605, width=700, epochs=3,
                      patches=args.patches,
                      model={"depth": args.depth, "base_filters": args.base_filters},
                      precision=args.precision)
        flops, _ = run_worker("flops", root, env, args.rounds)
        compare, _ = run_worker("compare", root, env, args.rounds)
        fitted, fit_rss = run_worker("fit", root, env, args.rounds)
        again, _ = run_worker("flops", root, env, args.rounds)  # the peak, when others are idle
        flops["matmul_gflops"] = max(flops["matmul_gflops"], again["matmul_gflops"])

    train_flops = 3.0 * flops["forward_flops"]
    achieved = compare["ranges"]["pipeline"][1] * train_flops / 1e9  # best round vs best matmul
    share = achieved / flops["matmul_gflops"]
    rows = [  # (measure, value, target or range, met: None when there is no target)
        ("unetops pipeline (sampler → tf.data → Keras)", f"{compare['pipeline']:.0f} patches/s",
         spread(compare["ranges"]["pipeline"]), None),
        ("plain model.fit on a numpy array", f"{compare['plain']:.0f} patches/s",
         spread(compare["ranges"]["plain"]), None),
        ("ratio pipeline / plain (median of rounds)", f"{compare['ratio']:.2f}", "≥ 1.0",
         compare["ratio"] >= 1.0),
        ("ratio of patches per CPU-second (load-robust)", f"{compare['cpu_ratio']:.2f}", "", None),
        ("training GFLOP per patch (3 × forward convs)", f"{train_flops / 1e9:.3f}", "", None),
        ("achieved GFLOP/s (pipeline, best round)", f"{achieved:.1f}", "", None),
        ("fp32 matmul GFLOP/s (2048², best of 6)", f"{flops['matmul_gflops']:.1f}", "", None),
        ("achieved / matmul peak", f"{share:.0%}", "≥ 50 %", share >= 0.5),
        ("train.fit end to end (MLflow, validation)", f"{fitted['patches_per_second']:.0f} patches/s",
         "", None),
        ("peak RSS of that training run", f"{fit_rss:.2f} GiB", "≤ 4 GiB", fit_rss <= 4.0),
    ]
    print(f"model depth {args.depth}, {args.base_filters} filters, batch norm, {args.precision}; "
          f"{PATCH}×{PATCH} patches, batch "
          f"{BATCH}, {args.patches} patches × {args.rounds} rounds, oneDNN "
          f"{'off' if env.get('TF_ENABLE_ONEDNN_OPTS', '1') in ('0', 'false') else 'on'}, "
          f"{os.cpu_count()} CPUs")
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure':<{width}} | {'value':>16} | {'target / range':>14} | result |")
    print(f"|{'-' * (width + 2)}|{'-' * 18}|{'-' * 16}|--------|")
    for name, value, target, met in rows:
        result = "" if met is None else ("met" if met else "MISSED")
        print(f"| {name:<{width}} | {value:>16} | {target:>14} | {result:6} |")
    return 0 if all(row[3] is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
