"""One colour per batch size, the same in the report's plots and in the MLflow UI.

The sweep's view in MLflow's UI groups runs by the param ``batch_size``, and the UI colours a
group that has no colour of the user's by a checksum of the group's id, ``param.batch_size.<N>``,
over a palette of its own (MLflow 3.17's ``mlflow/server/js``: the stable colour of a run or
group). The runs get that colour too (tag ``mlflow.runColor``), so a batch size looks the same
grouped or not, and the report draws it in it. tests/test_ui.py reads the colour of each group
in MLflow's UI in Chromium, so a UI that changes its rule fails the test.
"""
from __future__ import annotations

# MLflow UI's run and group colours, in its order.
UI_PALETTE = ("#a6630c", "#c83243", "#b45091", "#8a63bf", "#434a93", "#137dae", "#04867d", "#308613",
              "#facb66", "#1f272d", "#445461", "#5f7281", "#8396a5", "#93320b", "#be501e", "#de7921",
              "#f2be88", "#115026", "#277c43", "#3ba65e", "#8ddda8", "#9e102c", "#c82d4c", "#e65b77",
              "#f792a6", "#0e538b", "#2272b4", "#4299e0", "#8acaff")


def batch_size_colour(batch_size: int) -> str:
    """The colour MLflow's UI gives the group of runs with param batch_size = ``batch_size``."""
    low = high = 0
    for ch in f"param.batch_size.{batch_size}":
        low = (low + ord(ch)) % 255
        high = (high + low) % 255
    return UI_PALETTE[(low | high << 8) % len(UI_PALETTE)]


def sweep_colours(batch_sizes) -> dict[int, str]:
    """Each batch size's colour for the report. The UI gives a few batch sizes the same colour
    (512, 1024 and 65536; 2048 and 16384): within one sweep the smallest keeps it, the others
    get the first colour of the palette that no batch size of the sweep has, so the report's
    plots tell them apart where the UI's groups do not."""
    sizes = sorted(set(batch_sizes))
    wanted = {bs: batch_size_colour(bs) for bs in sizes}
    free = [c for c in UI_PALETTE if c not in wanted.values()]
    out: dict[int, str] = {}
    for bs in sizes:
        colour = wanted[bs]
        out[bs] = colour if colour not in out.values() or not free else free.pop(0)
    return out
