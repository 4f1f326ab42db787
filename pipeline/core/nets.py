"""The built-in networks (``model.name: mlp | linear``). Any other network comes from
torchvision by name or from the user's code by ``_target_`` (``pipeline.core.models``)."""
from __future__ import annotations

import torch
from torch import nn


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


class Linear(nn.Linear):
    """nn.Linear on flattened samples (images included); its weight and bias keep their names,
    so the regression's fitted w and b read as the tutorial's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1))
