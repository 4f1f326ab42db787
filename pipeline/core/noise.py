"""Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A).

Unbiased estimates from squared gradient norms measured at two batch sizes,
each smoothed with an exponential moving average before the ratio is taken.
"""
from __future__ import annotations

import torch


class NoiseScale:
    def __init__(self, ema: float = 0.9):
        self.beta = ema
        self.g2 = torch.zeros(())      # EMA of |G|^2 estimates
        self.trace = torch.zeros(())   # EMA of tr(Sigma) estimates
        self.count = 0

    def update(self, small_sq: torch.Tensor, big_sq: torch.Tensor, b_small: float, b_big: float) -> torch.Tensor:
        """Feed |G_small|^2 and |G_big|^2 (tensors, kept on their device); return B_simple."""
        g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
        trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
        if self.count == 0:
            self.g2, self.trace = g2.detach().clone(), trace.detach().clone()
        else:
            self.g2 = self.beta * self.g2 + (1 - self.beta) * g2.detach()
            self.trace = self.beta * self.trace + (1 - self.beta) * trace.detach()
        self.count += 1
        return self.value()

    def value(self) -> torch.Tensor:
        return self.trace / self.g2

    def state_dict(self) -> dict:
        return {"g2": self.g2.cpu(), "trace": self.trace.cpu(), "count": self.count, "beta": self.beta}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.g2, self.trace = state["g2"].to(device), state["trace"].to(device)
        self.count, self.beta = int(state["count"]), float(state["beta"])


def squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.pow(2).sum() for g in grads]).sum()
