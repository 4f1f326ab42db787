"""Transforms declared in params: torchvision.transforms.v2 names and keyword arguments.

``data.transforms`` run once at prepare on every split (deterministic ones: Resize, CenterCrop,
Grayscale, ...). ``train.augment`` runs on training batches only, on whole batches on the device,
each sample with its own draw: v2 applied to a batch tensor would draw once for the whole batch,
and a per-sample loop would put Python back in the hot loop. The draws come from a generator
seeded by (seed, epoch, batch), so a resumed run augments each batch as an uninterrupted one.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from ..config import ParamsError

AUGMENTS = ("RandomHorizontalFlip", "RandomVerticalFlip", "RandomCrop")


def _parse(spec: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    name, kwargs = next(iter(spec.items()))
    return name, dict(kwargs or {})


def compose(specs, key: str) -> list:
    """The v2 transforms of the specs; an unknown name or keyword stops with one line naming it."""
    from torchvision.transforms import v2

    steps = []
    for i, spec in enumerate(specs):
        name, kwargs = _parse(spec)
        cls = getattr(v2, name, None)
        if not (isinstance(cls, type) and issubclass(cls, v2.Transform)):
            raise ParamsError(f"{key}[{i}]={name!r}: not a torchvision.transforms.v2 transform "
                              f"(e.g. Resize, CenterCrop, Grayscale)")
        try:
            inspect.signature(cls).bind(**kwargs)
            steps.append(cls(**kwargs))
        except (TypeError, ValueError) as err:
            raise ParamsError(f"{key}[{i}]={{{name}: {kwargs}}}: {err}") from None
    return steps


class BatchAugment:
    """Per-sample random flips and crops of a (B, C, H, W) batch, without a Python loop."""

    def __init__(self, specs, seed: int):
        self.steps: list[tuple[str, dict[str, Any]]] = []
        self.seed = seed
        for i, spec in enumerate(specs):
            name, kwargs = _parse(spec)
            if name not in AUGMENTS:
                raise ParamsError(f"train.augment[{i}]={name!r}: not a batch-wise augmentation (allowed: "
                                  f"{', '.join(AUGMENTS)}; deterministic transforms go in data.transforms)")
            allowed = {"RandomCrop": {"size", "padding"}}.get(name, {"p"})
            bad = set(kwargs) - allowed
            if bad:
                raise ParamsError(f"train.augment[{i}]: {name} takes no {sorted(bad)[0]!r} here "
                                  f"(allowed: {', '.join(sorted(allowed))})")
            if name == "RandomCrop" and "size" not in kwargs:
                raise ParamsError(f"train.augment[{i}]: RandomCrop needs size")
            self.steps.append((name, kwargs))

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __call__(self, x: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        if x.ndim != 4:
            raise ParamsError(f"train.augment needs image batches (B, C, H, W), got shape {tuple(x.shape)}")
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + batch)
        n = x.shape[0]
        for name, kw in self.steps:
            if name in ("RandomHorizontalFlip", "RandomVerticalFlip"):
                dim = 3 if name == "RandomHorizontalFlip" else 2
                flip = (torch.rand(n, generator=gen) < kw.get("p", 0.5)).to(x.device).view(-1, 1, 1, 1)
                x = torch.where(flip, x.flip(dim), x)
            else:
                x = _random_crop(x, kw["size"], kw.get("padding", 0), gen)
        return x


def _random_crop(x: torch.Tensor, size, padding: int, gen: torch.Generator) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if padding:
        x = torch.nn.functional.pad(x, (padding,) * 4)
    n, _, big_h, big_w = x.shape
    if h > big_h or w > big_w:
        raise ParamsError(f"train.augment: RandomCrop size {(h, w)} is larger than the padded image {(big_h, big_w)}")
    top = torch.randint(0, big_h - h + 1, (n,), generator=gen).to(x.device)
    left = torch.randint(0, big_w - w + 1, (n,), generator=gen).to(x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]   # (n, 1, h, 1)
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (n, 1, 1, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return x[batch, chan, rows, cols]
