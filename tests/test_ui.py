"""What a user sees first: the report and the MLflow UI, loaded in a real headless Chromium."""
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import yaml

from conftest import REPO, MlflowServer

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")


def _dom(url: str, budget_ms: int = 60000, offline: bool = False, height: int = 1100, width: int = 1400) -> str:
    """The page's DOM after ``budget_ms`` of virtual time; ``offline``: every host name fails to
    resolve and every request goes to a closed proxy port, as on a machine without a network.
    The UI draws a chart only once it is in the window: ``width`` and ``height`` are the window's."""
    if CHROMIUM is None:
        if os.environ.get("CI"):  # .ci/run installs it: in CI the test must run, not skip
            pytest.fail("chromium is not installed")
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}",
             *(["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"] if offline else []),
             "--dump-dom", url], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished sweep of two batch sizes and two seeds, by the stages themselves."""
    from conftest import SMALL, merge
    from pipeline.stages import compare, evaluate, prepare, train
    from pipeline.config import parse_params
    from pipeline.context import Context

    work = tmp_path_factory.mktemp("ui")
    ctx = Context(params=parse_params(merge(SMALL, {"train": {"seeds": [0, 1], "epochs": 1}})), workdir=work, env={})
    prepare.run(ctx)
    for bs in ctx.params.train.batch_sizes:
        train.run(ctx, bs)
        evaluate.run(ctx, bs)
    compare.run(ctx)
    return ctx


def test_dvc_plots_show_draws_its_vega_plot_offline(tmp_path):
    """`dvc plots show` writes a page whose vega plot needs vega's JavaScript: the project's
    template (.dvc/config) carries it inline, so the plot is drawn with no network at all."""
    from conftest import PLOTS_TEMPLATE, REPO, SMALL, make_project, sh

    assert f"html_template = {PLOTS_TEMPLATE}" in (REPO / ".dvc" / "config").read_text()  # what the test projects use
    proj = make_project(tmp_path / "proj", SMALL)
    (proj / "outputs" / "compare").mkdir(parents=True)
    (proj / "outputs" / "compare" / "sweep.csv").write_text("batch_size,throughput\n16,1000\n64,3000\n")
    sh(["dvc", "plots", "show"], proj)
    page = (proj / "dvc_plots" / "index.html").read_text()
    assert "cdn.jsdelivr.net" not in page  # DVC's own page loads vega from there
    dom = _dom((proj / "dvc_plots" / "index.html").as_uri(), budget_ms=5000, offline=True)
    assert re.search(r'<canvas[^>]*class="marks"', dom), "the vega plot was not drawn"


def test_report_shows_intervals_claims_and_captioned_plots(sweep):
    dom = _dom((sweep.compare_dir / "report.html").as_uri(), budget_ms=2000)
    assert "The tutorial's claims, checked" in dom and "Critical batch size" in dom
    from pipeline.analysis.plots import PLOTS
    assert dom.count("<figcaption>") == len(PLOTS) == 9 and " ± " in dom
    # The answer first, then what it rests on.
    assert dom.index("Use batch size") < dom.index("Conclusions") < dom.index("Critical batch size")


def _page_width(report, width: int) -> int:
    """The width the report's content needs in a ``width``-pixel window: the widest scrollWidth
    of any element (a table wider than its scrolling wrapper counts at its own width), written
    into the DOM by a script added to a copy of it."""
    probe = report.with_name("width-probe.html")
    probe.write_text(report.read_text().replace(
        "</body>", "<script>window.addEventListener('load', () => document.body.setAttribute("
                   "'data-width', Math.max(...[...document.querySelectorAll('*')].map(e => e.scrollWidth))));"
                   "</script></body>"))
    try:
        dom = _dom(probe.as_uri(), budget_ms=2000, width=width)
    finally:
        probe.unlink()
    return int(re.search(r'data-width="(\d+)"', dom).group(1))


def test_reports_fit_1000_pixels_for_classification_and_regression(sweep, tmp_path):
    """Every table and plot of the report fits a 1,000-pixel window, the regression's too, whose
    fitted w and b columns sit beside the test MSE."""
    from conftest import merge
    from pipeline.config import parse_params
    from pipeline.context import Context
    from pipeline.stages import compare, evaluate, prepare, train

    assert _page_width(sweep.compare_dir / "report.html", 1000) <= 1000
    linear = yaml.safe_load((REPO / "configs" / "linear.yaml").read_text())
    params = merge(linear, {"train": {"epochs": 3, "seeds": [0, 1]}, "tracking": {"experiment": "test"}})
    ctx = Context(params=parse_params(params), workdir=tmp_path, env={})
    prepare.run(ctx)
    for bs in ctx.params.train.batch_sizes:
        train.run(ctx, bs)
        evaluate.run(ctx, bs)
    compare.run(ctx)
    report = ctx.compare_dir / "report.html"
    assert "test_mse" in report.read_text() and "weight" in report.read_text()
    assert _page_width(report, 1000) <= 1000
    # The probe can fail: in a narrower window the tables need more than it (they scroll).
    assert _page_width(report, 400) > 400


def test_mlflow_ui_opens_on_the_batch_size_runs_and_the_loss_chart(sweep):
    from pipeline.context import read_manifest
    from pipeline.mlflow_ui import batch_size_colour
    from pipeline.tracking.publish import TAG_SWEEP
    from pipeline.tracking.sweep import open_view

    tracker = open_view(sweep)
    # A run of another sweep in the same experiment (another learning rate, say) at batch size 16.
    other = tracker.client.create_run(tracker.experiment_id, run_name="bs16-other-sweep",
                                      tags={TAG_SWEEP: "another-sweep"}).info.run_id
    tracker.client.log_param(other, "batch_size", 16)
    tracker.client.set_terminated(other)
    server = MlflowServer(sweep.workdir, f"sqlite:///{sweep.workdir / 'mlflow.db'}").start()
    try:
        url = tracker.ui_url(server.url, sweep.params.sweep_key(read_manifest(sweep.data_dir)["data_hash"]))
        dom = _dom(url, height=1600)
    finally:
        server.kill()
    # The runs of every batch size and seed are on the page without a click, grouped by batch size,
    for name in ("bs16-s0", "bs16-s1", "bs64-s0", "bs64-s1"):
        assert name in dom, name
    # and only this sweep's: the other sweep's run does not join the group of 16.
    assert "bs16-other-sweep" not in dom
    assert "Group: 16" in dom and "Group: 64" in dom
    # The sweep's parent (it has no batch size) is not fetched into a group of its own,
    assert "Additional runs" not in dom and "Unassigned" not in dom
    # and the groups come in batch-size order.
    assert dom.index("Group: 16") < dom.index("Group: 64")
    # in the model-training layout (not the GenAI one), with the train/loss chart drawn per batch size.
    assert "Model training" in dom and "Detect Issues" not in dom
    assert "16 (train/loss)" in dom and "64 (train/loss)" in dom
    # The loss chart spans the chart pane: its section is one column wide (the UI's default is three),
    # and below it, two to a row, one bar per batch size for what it gives and costs.
    assert re.findall(r"grid-template-columns: repeat\((\d+), 1fr\)", dom) == ["1", "2"]
    bars = dom.index("per batch size")
    assert "train/loss" in dom[:bars] and "test_acc" in dom[bars:] and "step_memory_bytes" in dom[bars:]
    assert "overall_throughput" not in dom and "final_val_acc" not in dom  # the other metrics' charts are filtered out
    # Each group in the colour of its batch size's runs and of its lines in the report.
    for bs in (16, 64):
        found = re.search(rf'value="(#[0-9a-f]{{6}})"></label><div[^>]*><span title="{bs}"[^>]*>Group: {bs}<', dom)
        assert found, f"no colour next to Group: {bs}"
        assert found.group(1) == batch_size_colour(bs), bs
