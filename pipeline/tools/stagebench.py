"""Stage-level figures for ``bench``: the real ``python -m pipeline <verb>`` processes a user's
``dvc repro`` runs, each in a throwaway project with its own SQLite store.

  fixed cost   a train stage's wall time minus its optimizer-step seconds on digits (start-up,
               MLflow runs, validation, outputs, model export), and the evaluate stage's wall time;
  MNIST-sized  the train stage on MNIST-format files of two sizes (synthetic pixels written in the
               IDX format torchvision reads): samples/s, the stage's peak resident set, and the
               resident set while training per training image as the data set grows.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding pipeline/
FLOAT_ROW_BYTES = 28 * 28 * 4  # one MNIST image as the prepared float32 row


def run_stage(proj: Path, *args: str) -> tuple[float, int]:
    """Wall seconds and peak resident bytes of ``python -m pipeline ARGS`` run in ``proj``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{proj / 'mlflow.db'}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))}
    with open(proj / "stage.log", "ab") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=proj, env=env,
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (proj / "stage.log").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"bench stage `python -m pipeline {' '.join(args)}` failed:\n{tail}")
    return wall, usage.ru_maxrss * 1024


def _project(root: Path, params: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _summaries(proj: Path, batch_size: int) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((proj / "outputs" / "train" / f"bs{batch_size}").glob("seed*/summary.json"))]


def fixed_cost(params: dict[str, Any], batch_size: int = 64) -> dict[str, Any]:
    """The train and evaluate stages at ``batch_size`` on digits with the given train/model params."""
    params = params | {"data": {"name": "digits"}, "tracking": {"experiment": "bench-fixed-cost"}}
    with tempfile.TemporaryDirectory(prefix="batchlab-bench-") as tmp:
        proj = _project(Path(tmp), params)
        run_stage(proj, "prepare")  # creates the store, as the first stage of `dvc repro` does
        train_wall, _ = run_stage(proj, "train", "--batch-size", str(batch_size))
        steps = sum(s["train_seconds"] for s in _summaries(proj, batch_size))
        eval_wall, _ = run_stage(proj, "evaluate", "--batch-size", str(batch_size))
    seeds = params.get("train", {}).get("seeds", [0])
    return {"batch_size": batch_size, "seeds": len(seeds), "train_wall_seconds": train_wall,
            "train_step_seconds": steps, "train_fixed_seconds": train_wall - steps,
            "evaluate_wall_seconds": eval_wall}


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray, prefix: str) -> None:
    """MNIST's file format (big-endian IDX headers), in torchvision's folder layout."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.astype(np.uint8).tobytes())


def mnist_sized(sizes: tuple[int, ...] = (15_000, 60_000), batch_size: int = 512,
                epochs: int = 2) -> list[dict[str, Any]]:
    """The real train stage on MNIST-format data of each size (784-128-10 MLP, one seed)."""
    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n)
        with tempfile.TemporaryDirectory(prefix="batchlab-bench-") as tmp:
            proj = Path(tmp)
            write_idx(proj / "raw" / "MNIST" / "raw", images, labels, "train")
            write_idx(proj / "raw" / "MNIST" / "raw", images[:1000], labels[:1000], "t10k")
            _project(proj, {"data": {"name": "mnist", "root": "raw"}, "model": {"name": "mlp", "hidden_sizes": [128]},
                            "train": {"batch_sizes": [batch_size], "seeds": [0], "epochs": epochs,
                                      "max_steps": 10**9, "stop_at_target": False, "lr_search": False},
                            "tracking": {"experiment": "bench-mnist-sized"}})
            run_stage(proj, "prepare")
            wall, peak = run_stage(proj, "train", "--batch-size", str(batch_size))
            (summary,) = _summaries(proj, batch_size)
        rows.append({"images": n, "train_samples": summary["samples"] // epochs, "batch_size": batch_size,
                     "epochs": epochs, "samples_per_s": summary["throughput"], "stage_wall_seconds": wall,
                     "peak_rss_bytes": peak, "training_peak_bytes": summary["peak_memory_bytes"]})
    return rows


def lines(fixed: dict[str, Any] | None, mnist: list[dict[str, Any]]) -> list[str]:
    out = []
    if fixed:
        out.append(f"fixed cost on digits at batch size {fixed['batch_size']} ({fixed['seeds']} seeds): train stage "
                   f"{fixed['train_wall_seconds']:.1f} s wall - {fixed['train_step_seconds']:.2f} s of optimizer steps = "
                   f"{fixed['train_fixed_seconds']:.1f} s; evaluate stage {fixed['evaluate_wall_seconds']:.1f} s wall")
    for r in mnist:
        out.append(f"MNIST-sized, real train stage (its defaults: noise-scale estimate on): {r['train_samples']:,} "
                   f"training images, batch size {r['batch_size']}, {r['epochs']} epochs: {r['samples_per_s']:,.0f} "
                   f"samples/s, stage {r['stage_wall_seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MB")
    if len(mnist) >= 2:
        # The resident set while training (data loaded, model, buffers): what grows with the data.
        a, b = mnist[0], mnist[-1]
        per = (b["training_peak_bytes"] - a["training_peak_bytes"]) / (b["train_samples"] - a["train_samples"])
        out.append(f"memory while training: {a['training_peak_bytes'] / 2**20:,.0f} MB at {a['train_samples']:,} images, "
                   f"{b['training_peak_bytes'] / 2**20:,.0f} MB at {b['train_samples']:,}: {per:,.0f} bytes per added "
                   f"training image = {per / FLOAT_ROW_BYTES:.2f} x its {FLOAT_ROW_BYTES:,}-byte float32 row "
                   f"(the validation split grows with it by 1/9; no per-epoch copy of the data set)")
    return out
