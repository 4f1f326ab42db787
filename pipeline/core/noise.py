"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A),
measured at the model as it is, where a run reaches a target.

Gradients of ``k`` disjoint micro-batches of ``small`` samples, drawn without replacement from
the training split, at fixed parameters: their mean squared norm sees the noise of a batch of
``small``, the squared norm of their mean that of a batch of ``big = k * small`` (B_big >> B_small,
so |G|^2 is not the small difference of two large numbers). Each of ``draws`` repeats adds to two
sums, and the ratio is taken of the sums (a ratio of averages: averaging ratios is biased, and a
non-positive estimate is kept in the sums instead of dropped). The variance of a mean of ``b`` of
``N`` samples drawn without replacement is tr(Sigma) / b * (N - b) / (N - 1): the finite-data
correction, which matters once ``big`` is a sizeable part of the split.

The gradients are the raw ones. Under Adam the update is preconditioned and the link between
B_simple and the critical batch size (which holds for SGD) is loose: the report says so.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def squared_norm(grads) -> torch.Tensor:
    return torch.stack([g.pow(2).sum() for g in grads]).sum()


def estimate(mean_small_sq: float, big_sq: float, small: int, big: int, n: int) -> dict[str, float]:
    """|G|^2 and tr(Sigma) from E|g_small|^2 and E|g_big|^2 (unbiased, with the finite-data
    correction for a split of ``n``), and B_simple where |G|^2 > 0."""
    trace = (mean_small_sq - big_sq) * (n - 1) / (n * (1 / small - 1 / big))
    g2 = mean_small_sq - trace * (n - small) / (small * (n - 1))
    out = {"g2": g2, "trace": trace, "b_small": small, "b_big": big}
    if g2 > 0 and trace > 0:
        out["b_simple"] = trace / g2
    return out


def measure(model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor, *, small: int = 8,
            big: int = 2048, draws: int = 2, seed: int = 0) -> dict[str, float]:
    """B_simple of ``model`` on (x, y), which it leaves as it found it: its parameters, buffers
    (batch-norm statistics), gradients and the global random state (dropout draws). Not
    determined (no ``b_simple``) where a draw's |G|^2 is not positive or the draws' own
    estimates differ by more than 1.5x: B_simple is then too large for ``big`` to resolve."""
    n = len(x)
    small = min(small, n // 2)
    k = min(big, n) // small if small else 0
    if k < 2:
        return {}
    big = k * small
    params = [q for q in model.parameters() if q.requires_grad]
    buffers = [b.detach().clone() for b in model.buffers()]
    generator = torch.Generator().manual_seed(seed)
    devices = [x.device] if x.device.type == "cuda" else []
    per_draw = []
    with torch.random.fork_rng(devices=devices):
        for _ in range(draws):
            order = torch.randperm(n, generator=generator)[:big].to(x.device)
            total = [torch.zeros_like(q) for q in params]
            small_sq = torch.zeros((), dtype=torch.float64, device=x.device)
            for i in range(k):
                idx = order[i * small:(i + 1) * small]
                grads = torch.autograd.grad(criterion(model(x[idx]), y[idx]), params)
                small_sq += squared_norm(grads).double()
                for acc, g in zip(total, grads):
                    acc.add_(g)
            per_draw.append(torch.stack([small_sq / k, squared_norm([t / k for t in total]).double()]))
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
    values = torch.stack(per_draw).tolist()
    mean_small_sq, big_sq = (sum(v[0] for v in values) / draws, sum(v[1] for v in values) / draws)
    if not (math.isfinite(mean_small_sq) and math.isfinite(big_sq)):
        return {}
    out = estimate(mean_small_sq, big_sq, small, big, n)
    each = [estimate(a, b, small, big, n).get("b_simple") for a, b in values]
    if "b_simple" in out and (None in each or max(each) > 1.5 * min(each)):
        out["undetermined"] = out.pop("b_simple")
    return out
