"""The evaluate stage's scorer process (pipeline/scorer.py), through its real process."""
import numpy as np

from pipeline.scorer import Scorer, score


def test_the_scorer_process_gives_what_scoring_in_process_gives(tmp_path):
    """Targets and predictions cross the pipe with their dtypes: float32 regression figures are
    the ones computed on float32 arrays here, to the last bit."""
    rng = np.random.default_rng(0)
    y = rng.standard_normal(200).astype(np.float32)
    pred = (y + 0.1 * rng.standard_normal(200)).astype(np.float32)
    labels = rng.integers(0, 10, 300)
    guesses = np.where(rng.random(300) < 0.8, labels, rng.integers(0, 10, 300))
    scorer = Scorer()
    scorer.submit("regression", y, pred, tmp_path / "reg")
    scorer.submit("classification", labels, guesses, tmp_path / "cls")
    (reg, reg_files), (cls, cls_files) = scorer.results()
    assert scorer.proc.returncode == 0
    assert reg == score("regression", y, pred, tmp_path / "reg-here")[0]
    assert cls == score("classification", labels, guesses, tmp_path / "cls-here")[0]
    assert 0.7 < cls["test_acc"] < 0.9
    assert [f.name for f in reg_files] == ["report.json", "predictions.csv", "evaluation.png"]
    assert all(f.is_file() for f in reg_files + cls_files)
    assert (tmp_path / "reg" / "predictions.csv").read_text() == (tmp_path / "reg-here" / "predictions.csv").read_text()


def test_abort_returns_once_the_process_has_finished_what_it_was_handed(tmp_path):
    """Aborted while it is still importing scikit-learn: the seed it was handed is written whole,
    and the process has exited when abort returns (nothing writes into outputs afterwards)."""
    scorer = Scorer()
    scorer.submit("classification", np.arange(20) % 4, np.arange(20) % 4, tmp_path / "seed0")
    scorer.abort()
    assert scorer.proc.returncode == 0
    assert sorted(p.name for p in (tmp_path / "seed0").iterdir()) == ["evaluation.png", "predictions.csv",
                                                                     "report.json"]
