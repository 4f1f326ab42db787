"""Everything that matches MLflow UI internals: the shared batch-size views, the URL that opens
them, and one colour per batch size, the same in the report's plots and in the MLflow UI.

The sweep's view in MLflow's UI groups runs by the param ``batch_size``, and the UI colours a
group that has no colour of the user's by a checksum of the group's id, ``param.batch_size.<N>``,
over a palette of its own (MLflow 3.17's ``mlflow/server/js``: the stable colour of a run or
group). The runs get that colour too (tag ``mlflow.runColor``), so a batch size looks the same
grouped or not, and the report draws it in it. tests/test_ui.py reads the colour of each group
in MLflow's UI in Chromium, so a UI that changes its rule fails the test.
"""
from __future__ import annotations

import json

VIEW_KEY = "batch-sizes"  # every run of the experiment; each sweep also has its own: sweep_view()
# MLflow UI state (keys as its experiment page shares them): runs grouped by batch size, the
# groups' mean drawn in charts, every run shown, line charts against step (= samples seen).
# The "train" chart section is one column wide and 480 px high, so the loss chart the view opens
# on spans the chart pane (the UI's default is 3 columns of 360 px: a thumbnail whose legend
# showed two of the four groups). Below it, one bar per batch size (the mean of its runs) for what
# a batch size gives and costs: the bars are evenly spaced and in batch-size order, where a line
# against the batch size would crowd the small ones at the left edge of a linear axis. The UI adds
# a chart for every other metric (3.17's reconciliation); the charts filter, a regular expression,
# shows only these. The UI orders sections by name: "loss" comes before "per batch size".
# Runs sort by their step count, descending: the groups then come in batch-size order (by name
# they would read 16, 256, 4, 64), and a view sorted by anything but start time does not fetch
# the parents of the runs it matches (3.17's search), which it would otherwise show as a group of
# their own, "Additional runs" in the table and "Unassigned" in the charts' legends.
# Time is time to the target (the report's answer), not the run's train_seconds: a run that stops
# at the target sooner has less of those, and one that misses it has more, which read as its cost.
BAR_METRICS = ("test_acc", "test_mse", "throughput", "time_to_target_s", "step_memory_bytes")
_SECTION = {"display": True, "isReordered": False, "deleted": False, "isGenerated": False}
SHARED_VIEW = {
    "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "param", "groupByData": "batch_size"}]},
    "orderByKey": "metrics.`steps`", "orderByAsc": False,
    "useGroupedValuesInCharts": True, "runsHiddenMode": "SHOW_ALL", "hideEmptyCharts": True,
    "chartsSearchFilter": f"^(train/loss|{'|'.join(BAR_METRICS)})$",
    "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    "compareRunCharts": [{"uuid": "batchlab-loss", "type": "LINE", "metricKey": "train/loss", "selectedMetricKeys": ["train/loss"],
                          "metricSectionId": "batchlab-train", "isGenerated": False, "deleted": False,
                          "xAxisKey": "step", "useGlobalXaxisKey": True, "lineSmoothness": 0, "scaleType": "linear",
                          "xAxisScaleType": "linear"}] + [{"uuid": f"batchlab-{key}", "type": "BAR", "metricKey": key, "metricSectionId": "batchlab-bs",
                          "isGenerated": False, "deleted": False} for key in BAR_METRICS],
    "compareRunSections": [_SECTION | {"uuid": "batchlab-train", "name": "loss", "columns": 1, "cardHeight": 480},
                           _SECTION | {"uuid": "batchlab-bs", "name": "per batch size",
                                       "columns": 2, "cardHeight": 300}],
}


# Every sweep's runs: grouped by sweep and batch size, so that runs of other params (another
# learning rate, another data set) never share a group.
BY_LR = {"mode": "param", "groupByData": "lr"}
ALL_SWEEPS_VIEW = SHARED_VIEW | {"groupBy": {"aggregateFunction": "average", "groupByKeys": [
    {"mode": "tag", "groupByData": "batchlab.sweep_key"}, {"mode": "param", "groupByData": "batch_size"}, BY_LR]},
    "searchFilter": "tags.`batchlab.role` = 'train'"}


def experiment_tags() -> dict[str, str]:
    """What MLflow's UI reads to open the experiment on the comparison: a model-training
    experiment (not its GenAI layout), and the shared view of every sweep's runs."""
    return {"mlflow.experimentKind": "custom_model_development",
            f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(ALL_SWEEPS_VIEW, sort_keys=True)}


def sweep_view(key: str, workspace: str, lr_grid: bool = False) -> tuple[str, dict]:
    """The share key and UI state of sweep ``key``'s view as ``workspace`` published it:
    SHARED_VIEW for its training runs alone, so that runs of another sweep (another learning rate,
    another list) or of another workspace's copy of it never join its groups.
    A sweep with a learning-rate grid groups by batch size and rate (its groups' colours are then
    the UI's own, not the report's)."""
    state = SHARED_VIEW | {"searchFilter": f"tags.`batchlab.sweep_key` = '{key}' and tags.`batchlab.role` = 'train' "
                                           f"and tags.`batchlab.workspace` = '{workspace}'"}
    if lr_grid:
        state["groupBy"] = {"aggregateFunction": "average", "groupByKeys": [*SHARED_VIEW["groupBy"]["groupByKeys"], BY_LR]}
    return f"sweep-{key}-{workspace}", state


def sweep_view_tag(key: str, workspace: str, lr_grid: bool = False) -> tuple[str, str]:
    view, state = sweep_view(key, workspace, lr_grid)
    return f"mlflow.sharedViewState.{view}", json.dumps(state, sort_keys=True)


def url(base: str, experiment_id: str, sweep: tuple[str, str] | None = None) -> str:
    """The experiment in MLflow's UI: its model-training layout (3.17 opens the GenAI one unless
    told), the chart view, and the shared view of ``sweep`` (its key, the workspace) or of every run."""
    view = sweep_view(*sweep)[0] if sweep else VIEW_KEY
    return (f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&compareRunsMode=CHART&viewStateShareKey={view}")

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
