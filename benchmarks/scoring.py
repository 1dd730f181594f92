"""Batch scoring against what a Keras user writes, in one run: a folder of Fashion-MNIST images as PNG files, scored
by `tapeline score` (the `batch-scoring` flow, temporary Prefect API) and by `keras.utils.image_dataset_from_directory
(labels=None)` + `model.predict` on the same exported model (its `.keras` file, softmax applied), at Keras's default
batch (32) and at tapeline's (`score.batch_size`, 256). Each contender runs in a fresh process; its peak RSS is read
by /usr/bin/time. Then tapeline's rerun with nothing new, and with 1 % more files. The classes must be identical on
every image and the probabilities within 1e-5. With --rss-images N, the peak RSS of scoring N files against the
first folder's (it must not grow with the number of files); with --dask, the same folder scored on a local Dask
cluster (a scheduler and 2 single-threaded workers) against this machine's threads.

    .venv/bin/python -m benchmarks.scoring [--images 20000] [--rounds 3] [--rss-images 100000] [--dask] [--json F]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.lib import ROOT, machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
FASHION = Path("/usr/share/datasets/fashion-mnist")
KERAS = """
import json, sys, time
import numpy as np
started = time.perf_counter()
import keras
folder, model_path, batch, out, colour = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
dataset = keras.utils.image_dataset_from_directory(folder, labels=None, color_mode=colour, image_size=(28, 28),
                                                   batch_size=batch, shuffle=False)
paths = dataset.file_paths
model = keras.models.load_model(model_path, compile=False)
if colour == "rgb":
    dataset = dataset.map(lambda x: keras.ops.image.rgb_to_grayscale(x))
logits = model.predict(dataset.map(lambda x: x / 255.0), verbose=0)
probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
seconds = time.perf_counter() - started
np.save(out, probabilities)
print(json.dumps({"seconds": seconds, "paths": paths}))
"""


def fashion_images(count: int) -> np.ndarray:
    """The first `count` Fashion-MNIST images (test split first, then train)."""
    arrays = []
    for name in ("t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz"):
        raw = gzip.open(FASHION / name).read()
        arrays.append(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28))
    return np.concatenate(arrays)[:count]


def write_folder(folder: Path, images: np.ndarray, start: int = 0) -> None:
    """Each image as folder/img-NNNNNN.png."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images, start):
        Image.fromarray(image).save(folder / f"img-{i:06d}.png")


def timed_command(argv: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in MiB, stdout) of a command run under /usr/bin/time."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *argv], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed:\n{done.stderr[-3000:]}")
    rss = int(re.findall(r"MAXRSS (\d+)", done.stderr)[-1]) // 1024
    return wall, rss, done.stdout


def train_production(artifacts: Path) -> Path:
    """A production model (2 epochs on 20,000 Fashion-MNIST images); its version directory."""
    from stages.pipeline import run_all
    from tapeline.config import load_config

    run_all(load_config(None, ["data.limit=20000", "train.max_epochs=2"]), artifacts)
    return artifacts / "models" / "v0001"


def tapeline_round(folder: Path, artifacts: Path, env: dict[str, str]) -> dict:
    """`tapeline score` on a store with no scores yet: wall, the flow's own seconds, peak RSS, the output."""
    shutil.rmtree(artifacts / "scores", ignore_errors=True)
    wall, rss, out = timed_command([sys.executable, "-m", "flows.cli", "score", f"images:{folder}", "--artifacts",
                                    str(artifacts), "--json"], env)
    summary = json.loads(out.strip().splitlines()[-1])
    return {"wall": wall, "flow_seconds": summary["seconds"], "rss_mib": rss, "scored": summary["scored"],
            "output": summary["output"]}


def keras_round(folder: Path, model: Path, batch: int, out: Path, env: dict[str, str], colour: str = "grayscale"
                ) -> dict:
    """The Keras user's script in a fresh process: seconds (imports included), peak RSS, file order."""
    _, rss, stdout = timed_command([sys.executable, "-c", KERAS, str(folder), str(model), str(batch), str(out),
                                    colour], env)
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"seconds": result["seconds"], "rss_mib": rss, "paths": result["paths"]}


def agreement(output: str, keras_probabilities: np.ndarray, keras_paths: list[str], folder: Path) -> dict:
    """Top-1 agreement and the largest probability difference between tapeline's rows and Keras's."""
    import pyarrow.parquet as pq

    rows = {r["path"]: r for r in pq.read_table(Path(output) / "predictions.parquet").to_pylist()}
    ours = np.asarray([rows[str(Path(p).relative_to(folder))]["probabilities"] for p in keras_paths])
    return {"images": len(keras_paths), "same_top1": int((ours.argmax(1) == keras_probabilities.argmax(1)).sum()),
            "max_probability_difference": float(np.abs(ours - keras_probabilities).max())}


def write_rgb_folder(folder: Path, images: np.ndarray) -> None:
    """Each image at 96x96 in RGB (upscaled, tinted per image) as folder/img-NNNNNN.png."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        big = np.asarray(Image.fromarray(image).resize((96, 96), Image.Resampling.BILINEAR), np.float32)
        tint = np.asarray([1.0, 0.8 + 0.2 * (i % 3) / 2, 0.9], np.float32)
        Image.fromarray(np.clip(big[..., None] * tint, 0, 255).astype(np.uint8)).save(folder / f"img-{i:06d}.png")


def rgb_rounds(folder: Path, artifacts: Path, version: Path, root: Path, env: dict[str, str], rounds: int) -> dict:
    """The 96x96 RGB folder: `tapeline score` (fitted to 28x28x1 as the data stage fits) against the Keras script
    (rgb, resized to 28x28 by Keras, then grey), rounds interleaved; medians, the agreement of the last round."""
    runs = []
    for _ in range(rounds):
        ours = tapeline_round(folder, artifacts, env)
        default = keras_round(folder, version / "model.keras", 32, root / "rgb32.npy", env, "rgb")
        same = keras_round(folder, version / "model.keras", 256, root / "rgb256.npy", env, "rgb")
        runs.append({"tapeline": ours, "keras_batch_32": default["seconds"], "keras_batch_256": same["seconds"],
                     "keras_rss_mib": same["rss_mib"]})
        print(f"rgb round: {json.dumps(runs[-1])}", flush=True)
    check = agreement(ours["output"], np.load(root / "rgb256.npy"), same["paths"], folder)
    return {"rounds": runs, "agreement": check,
            "median": {"tapeline_flow_seconds": statistics.median(r["tapeline"]["flow_seconds"] for r in runs),
                       "tapeline_wall": statistics.median(r["tapeline"]["wall"] for r in runs),
                       "tapeline_rss_mib": statistics.median(r["tapeline"]["rss_mib"] for r in runs),
                       "keras_batch_32_seconds": statistics.median(r["keras_batch_32"] for r in runs),
                       "keras_batch_256_seconds": statistics.median(r["keras_batch_256"] for r in runs),
                       "keras_rss_mib": statistics.median(r["keras_rss_mib"] for r in runs)}}


def many_images(count: int) -> np.ndarray:
    """`count` distinct images: Fashion-MNIST's 70,000, then shifted copies."""
    base = fashion_images(70000)
    copies = [np.roll(base, shift, axis=2) for shift in range(count // len(base) + 1)]
    return np.concatenate(copies)[:count]


def score_wall(folder: Path, artifacts: Path, env: dict[str, str], *more: str) -> dict:
    """One `tapeline score` from no scores: wall, flow seconds, peak RSS."""
    shutil.rmtree(artifacts / "scores", ignore_errors=True)
    wall, rss, out = timed_command([sys.executable, "-m", "flows.cli", "score", f"images:{folder}", "--artifacts",
                                    str(artifacts), "--json", *more], env)
    summary = json.loads(out.strip().splitlines()[-1])
    return {"wall": round(wall, 2), "flow_seconds": summary["seconds"], "rss_mib": rss, "scored": summary["scored"]}


def dask_against_threads(folder: Path, artifacts: Path, env: dict[str, str], rounds: int) -> dict:
    """The folder scored on a local Dask cluster (scheduler + 2 workers) and on this machine's 2 threads."""
    from tapeline.testing import port_is_free

    port = next(p for p in range(38786, 39786) if port_is_free(p))
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    processes = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                   "--dashboard-address", ":0", "--no-show"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)]
    processes += [subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-dashboard"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                  for _ in range(2)]
    try:
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        results = []
        for _ in range(rounds):
            results.append({"threads": score_wall(folder, artifacts, env),
                            "dask": score_wall(folder, artifacts, env, "--dask-address", address)})
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
    return {"rounds": results,
            "median_flow_seconds": {kind: statistics.median(r[kind]["flow_seconds"] for r in results)
                                    for kind in ("threads", "dask")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-images", type=int, default=0)
    parser.add_argument("--dask", action="store_true")
    parser.add_argument("--rgb96", type=int, default=0, help="also a folder of this many 96x96 RGB images")
    parser.add_argument("--only-rgb96", action="store_true", help="skip the 28x28 rounds (with --rgb96)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scoring.json")
    args = parser.parse_args()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with tempfile.TemporaryDirectory(prefix="tapeline-bench-scoring-") as tmp:
        root = Path(tmp)
        env["PREFECT_HOME"] = str(root / "prefect-home")
        artifacts, folder = root / "artifacts", root / "pictures"
        version = train_production(artifacts)
        if args.rgb96:
            rgb = root / "rgb96"
            write_rgb_folder(rgb, fashion_images(args.rgb96))
            result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "images": args.rgb96,
                      "command": f"python -m benchmarks.scoring --rgb96 {args.rgb96} --rounds {args.rounds}"
                                 + (" --only-rgb96" if args.only_rgb96 else ""),
                      **rgb_rounds(rgb, artifacts, version, root, env, args.rounds)}
            print(json.dumps(result, indent=2))
            (args.json.parent / "scoring_rgb96.json").write_text(json.dumps(result, indent=2) + "\n")
            if args.only_rgb96:
                return
        images = fashion_images(args.images + args.images // 100)
        write_folder(folder, images[:args.images])
        rounds = []
        for number in range(args.rounds):
            ours = tapeline_round(folder, artifacts, env)
            keras_default = keras_round(folder, version / "model.keras", 32, root / "k32.npy", env)
            keras_same = keras_round(folder, version / "model.keras", 256, root / "k256.npy", env)
            rounds.append({"tapeline": ours, "keras_batch_32": {k: v for k, v in keras_default.items() if k != "paths"},
                           "keras_batch_256": {k: v for k, v in keras_same.items() if k != "paths"}})
            print(f"round {number}: {json.dumps(rounds[-1])}", flush=True)
        check = agreement(ours["output"], np.load(root / "k256.npy"), keras_same["paths"], folder)
        rerun_wall, _, out = timed_command([sys.executable, "-m", "flows.cli", "score", f"images:{folder}",
                                            "--artifacts", str(artifacts), "--json"], env)
        rerun = json.loads(out.strip().splitlines()[-1])
        write_folder(folder, images[args.images:], start=args.images)
        added_wall, _, out = timed_command([sys.executable, "-m", "flows.cli", "score", f"images:{folder}",
                                            "--artifacts", str(artifacts), "--json"], env)
        added = json.loads(out.strip().splitlines()[-1])
        extra: dict = {}
        if args.dask:
            extra["dask_against_threads"] = dask_against_threads(folder, artifacts, env, args.rounds)
        if args.rss_images:
            many = root / "many"
            write_folder(many, many_images(args.rss_images))
            extra["rss"] = {"images": args.rss_images, "many": score_wall(many, artifacts, env),
                            "few": score_wall(folder, artifacts, env)}

    def median(path: tuple[str, str]) -> float:
        return round(statistics.median(r[path[0]][path[1]] for r in rounds), 3)

    flow = median(("tapeline", "flow_seconds"))
    summary = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "images": args.images, "rounds": rounds,
        "command": f"python -m benchmarks.scoring --images {args.images} --rounds {args.rounds}"
                   + (f" --rss-images {args.rss_images}" if args.rss_images else "") + (" --dask" if args.dask else ""),
        "median": {"tapeline_wall": median(("tapeline", "wall")), "tapeline_flow_seconds": flow,
                   "keras_batch_32_seconds": median(("keras_batch_32", "seconds")),
                   "keras_batch_256_seconds": median(("keras_batch_256", "seconds")),
                   "tapeline_rss_mib": median(("tapeline", "rss_mib")),
                   "keras_batch_256_rss_mib": median(("keras_batch_256", "rss_mib"))},
        "images_per_second": {"tapeline_flow": round(args.images / flow, 1),
                              "keras_batch_32": round(args.images / median(("keras_batch_32", "seconds")), 1),
                              "keras_batch_256": round(args.images / median(("keras_batch_256", "seconds")), 1)},
        "agreement": check,
        "rerun_nothing_new": {"wall": round(rerun_wall, 2), "scored": rerun["scored"]},
        "added_one_percent": {"wall": round(added_wall, 2), "flow_seconds": added["seconds"],
                              "scored": added["scored"], "images": added["images"]},
        **extra,
    }
    print(json.dumps(summary, indent=2))
    args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
