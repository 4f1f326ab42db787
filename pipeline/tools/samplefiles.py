"""Small data sets in real on-disk formats, made here (no download): an ImageFolder tree of PNGs
and CIFAR python batches. The tests, the bench and the README's examples use them.

    python -m pipeline.tools.samplefiles imagefolder data/raw/stripes [--per-class 60] [--size 32]
    python -m pipeline.tools.samplefiles cifar10 data/raw [--train 500] [--test 100]

Each class is a pattern (horizontal or vertical stripes, a checkerboard, rings about the centre)
in a random colour and phase with noise, unchanged by the flips train.augment offers: a
convolutional network learns it in a few epochs, a linear model does not quite.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

CLASSES = ("horizontal", "vertical", "checker", "rings")


def stripes(n: int, size: int, rng: np.random.Generator, n_classes: int = len(CLASSES)) -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB images (n, size, size, 3) uint8 and their labels. Beyond the four patterns, each
    further group of four classes draws them at a finer period, so that every class differs."""
    labels = np.arange(n) % n_classes
    yy, xx = np.mgrid[0:size, 0:size]
    period = np.maximum(2, size // (4 + 2 * (labels // 4)))[:, None, None]  # (n, 1, 1)
    half = np.maximum(1, period // 2)
    phase = rng.integers(0, period[:, 0, 0])[:, None, None]
    rings = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2).astype(int)
    checker = (yy // half + xx // half) * half  # alternate cells of side period/2
    pattern = (labels % 4)[:, None, None]
    coord = np.where(pattern == 0, yy, np.where(pattern == 1, xx, np.where(pattern == 2, checker, rings)))
    phase = np.where(pattern == 2, 0, phase)  # the checker keeps its cells
    wave = ((coord + phase) % period) < half
    colour = rng.integers(80, 256, size=(n, 1, 1, 3))
    noise = rng.normal(0, 40, size=(n, size, size, 3))
    img = wave[..., None] * colour + noise + 40
    return np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_imagefolder(root: Path, per_class: int = 30, size: int = 16, seed: int = 0,
                      test_per_class: int = 0, n_classes: int = len(CLASSES)) -> Path:
    """``root/train/<class>/NNNN.png`` (and ``root/test/...`` when ``test_per_class``)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", test_per_class)):
        if not count:
            continue
        images, labels = stripes(count * n_classes, size, rng, n_classes)
        for i, (img, label) in enumerate(zip(images, labels)):
            folder = Path(root) / split / f"{CLASSES[label % len(CLASSES)]}{label // len(CLASSES) or ''}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:05d}.png")
    return Path(root)


def write_cifar(root: Path, n_train: int = 100, n_test: int = 40, seed: int = 0, name: str = "cifar10") -> Path:
    """CIFAR python batches (torchvision's file names and layout, the format's keys) under root."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = Path(root) / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    key = "labels" if name == "cifar10" else "fine_labels"
    train_files = [f for f, _ in cls.train_list]
    for files, n in ((train_files, n_train), ([f for f, _ in cls.test_list], n_test)):
        per = -(-n // len(files))
        for fname in files:
            images, labels = stripes(per, 32, rng)
            data = images.transpose(0, 3, 1, 2).reshape(per, -1)  # CIFAR rows: R plane, G, B
            with (folder / fname).open("wb") as fh:
                pickle.dump({"data": data, key: labels.tolist(), "batch_label": fname}, fh)
    return Path(root)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.tools.samplefiles", description=__doc__.split("\n\n")[0])
    ap.add_argument("format", choices=("imagefolder", "cifar10"))
    ap.add_argument("root")
    ap.add_argument("--per-class", type=int, default=60, help="imagefolder: training images per class")
    ap.add_argument("--test-per-class", type=int, default=20)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--train", type=int, default=500, help="cifar10: training images")
    ap.add_argument("--test", type=int, default=100)
    args = ap.parse_args(argv)
    if args.format == "imagefolder":
        write_imagefolder(Path(args.root), args.per_class, args.size, test_per_class=args.test_per_class)
    else:
        write_cifar(Path(args.root), args.train, args.test)
    print(f"wrote {args.format} files under {args.root}")


if __name__ == "__main__":
    main()
