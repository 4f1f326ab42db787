"""Models: small classes, built from params. nn.Linear handles any batch size."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelParams


class MLP(nn.Module):
    """The tutorial's multilayer perceptron; 784-128-10 for MNIST with hidden_sizes=[128]."""

    def __init__(self, n_in: int, hidden: tuple[int, ...], n_out: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_in
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def build_model(p: ModelParams, n_in: int, n_out: int) -> nn.Module:
    if p.name == "linear":
        return nn.Linear(n_in, n_out)
    return MLP(n_in, p.hidden_sizes, n_out)


def loss_fn(task: str, reduction: str = "mean") -> nn.Module:
    return nn.CrossEntropyLoss(reduction=reduction) if task == "classification" else nn.MSELoss(reduction=reduction)
