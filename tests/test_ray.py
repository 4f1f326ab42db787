"""executor.name=ray on a real two-node Ray cluster of this machine (two `ray start`s on loopback,
each node one CPU, stopped by the tests): a sweep's trainings run on both nodes and equal a local
sweep's; a worker node killed mid-sweep, at two moments, costs no run and no point; the driver
(`dvc repro`) killed, the next one finishes the sweep with every run once; an address nobody
answers is one line and nothing trained."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BIN, SMALL, check_published, env_for, make_project, merge, runs_of, sh

RAY = str(BIN / "ray")
PARAMS = merge(SMALL, {"train": {"batch_sizes": [16, 64], "seeds": [0, 1]}, "executor": {"name": "ray"}})
# Two seeds of about 3,000 steps at batch size 4, a checkpoint every 300: long enough to strike.
LONG = merge(SMALL, {"train": {"batch_sizes": [4], "seeds": [0, 1], "epochs": 10, "noise_scale": False,
                               "checkpoint_every_steps": 300}, "executor": {"name": "ray"}})


def ray_env(env: dict[str, str]) -> dict[str, str]:
    """A loopback cluster without Ray's token authentication, which Ray turns on by itself once a
    local ray.init() has left a token in ~/.ray (the same tests, whatever ran on this machine before)."""
    return env | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_session(sid: int, sig: int = signal.SIGKILL) -> None:
    """Every process of a session (Ray gives each worker a process group of its own, not a session)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    os.kill(int(entry), sig)
            except (ProcessLookupError, PermissionError):
                pass


class Cluster:
    """A head and a worker node, each `ray start --block` in a session of its own: killing one
    session's processes is killing that node."""

    def __init__(self):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
        self.head = self.worker = self._start(["--head", f"--port={self.port}", "--include-dashboard=false",
                                               f"--temp-dir={self.temp}"])
        try:
            self._wait_nodes(1)
            self.worker = self.add_worker()
        except BaseException:
            self.stop()
            raise

    def _start(self, args: list[str]) -> subprocess.Popen:
        env = ray_env(env_for(Path.cwd()))
        return subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                 "--disable-usage-stats", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    def add_worker(self) -> subprocess.Popen:
        self.worker = self._start([f"--address={self.address}"])
        self._wait_nodes(2)
        return self.worker

    def _wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run([RAY, "status", f"--address={self.address}"], capture_output=True, text=True,
                                 env=ray_env(dict(os.environ))).stdout
            active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
            if active.count("node_") == n:
                return
            time.sleep(0.5)
        raise AssertionError(f"the Ray cluster at {self.address} never had {n} nodes")

    def kill_worker(self) -> None:
        _kill_session(self.worker.pid)
        self.worker.wait()

    def stop(self) -> None:
        for proc in (self.worker, self.head):
            _kill_session(proc.pid)
            proc.wait()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()  # stops what it started when it fails to start
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def two_nodes(cluster):
    """The cluster with its worker node up (a test before may have killed it)."""
    if cluster.worker.poll() is not None:
        cluster.worker = cluster.add_worker()
    return cluster


def _runs(proj: Path):
    _, runs = runs_of(f"sqlite:///{proj / 'mlflow.db'}")
    return runs


def _losses(folder: Path) -> list[str]:
    return [line.split(",")[3] for line in (folder / "steps.csv").read_text().splitlines()[1:]]


@pytest.mark.slow
def test_a_sweep_runs_across_both_nodes_and_equals_a_local_one(tmp_path, two_nodes):
    proj = make_project(tmp_path / "ray", PARAMS)
    env = ray_env(env_for(proj)) | {"RAY_ADDRESS": two_nodes.address}
    sh(["dvc", "repro"], proj, env=env, timeout=600)
    assert "up to date" in sh(["dvc", "status"], proj, env=env).stdout
    assert check_published(f"sqlite:///{proj / 'mlflow.db'}", proj)["train_runs"] == 4
    runs = _runs(proj)
    parents = [r for r in runs if r.data.tags.get("batchlab.role") == "sweep"]
    trains = [r for r in runs if r.data.tags.get("batchlab.role") == "train"]
    assert len(parents) == 1 and all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trains)
    assert {r.data.tags["batchlab.executor"] for r in trains} == {"ray"}
    assert len({r.data.tags["batchlab.ray_node"] for r in trains}) == 2  # both nodes trained
    assert "executor.name" not in parents[0].data.params  # where it ran is not the sweep's identity

    local = make_project(tmp_path / "local", merge(PARAMS, {"executor": {"name": "local"}}), git=False)
    sh([sys.executable, "-m", "pipeline", "prepare"], local)
    for bs in (16, 64):
        sh([sys.executable, "-m", "pipeline", "train", "--batch-size", str(bs)], local)
        for seed in (0, 1):
            rel = Path("outputs/train") / f"bs{bs}" / f"seed{seed}"
            assert _losses(proj / rel) == _losses(local / rel), rel


def _trainer_on(proj: Path, worker: subprocess.Popen, timeout: float = 300) -> str:
    """The run name of the training the worker node holds (its trainer's lock names its pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for lock in (proj / "checkpoints").glob("*.lock") if (proj / "checkpoints").is_dir() else ():
            words = lock.read_text().split()
            try:
                if len(words) > 1 and os.getsid(int(words[1])) == worker.pid:
                    return lock.stem
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(0.1)
    raise AssertionError("no training started on the worker node")


# Where to strike: before the worker node's training wrote a checkpoint (it starts again on the
# head), or after (it resumes there from the checkpoint in the shared project folder).
@pytest.mark.slow
@pytest.mark.parametrize("moment", ("before-checkpoint", "after-checkpoint"))
def test_a_worker_node_killed_mid_sweep_costs_no_run_and_no_point(tmp_path, two_nodes, moment):
    proj = make_project(tmp_path / "p", LONG)
    env = ray_env(env_for(proj)) | {"RAY_ADDRESS": two_nodes.address}
    repro = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=proj, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    name = _trainer_on(proj, two_nodes.worker)
    if moment == "after-checkpoint":
        while not (proj / "checkpoints" / f"{name}.pt").exists():
            assert repro.poll() is None, repro.communicate()[1][-2000:]
            time.sleep(0.05)
    two_nodes.kill_worker()
    out, err = repro.communicate(timeout=600)
    assert repro.returncode == 0, err[-3000:]
    assert "up to date" in sh(["dvc", "status"], proj, env=env).stdout
    stats = check_published(f"sqlite:///{proj / 'mlflow.db'}", proj)  # one point per logged step
    assert stats["train_runs"] == 2
    seed = name.rsplit("-s", 1)[1]
    summary = json.loads((proj / "outputs/train/bs4" / f"seed{seed}" / "summary.json").read_text())
    if moment == "after-checkpoint":
        assert summary["resumed_from_step"] >= 300
    trains = [r for r in _runs(proj) if r.data.tags.get("batchlab.role") == "train"]
    assert len({r.data.tags["batchlab.ray_node"] for r in trains}) == 1  # both ended on the head


@pytest.mark.slow
def test_the_driver_killed_then_the_next_repro_finishes_the_sweep_once(tmp_path, two_nodes):
    proj = make_project(tmp_path / "p", LONG)
    env = ray_env(env_for(proj)) | {"RAY_ADDRESS": two_nodes.address}
    repro = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=proj, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    name = _trainer_on(proj, two_nodes.worker)
    while not (proj / "checkpoints" / f"{name}.pt").exists():
        assert repro.poll() is None, repro.communicate()[1][-2000:]
        time.sleep(0.05)
    os.killpg(repro.pid, signal.SIGKILL)  # dvc and the stage's driver: Ray ends the driver's tasks
    repro.wait()
    sh(["dvc", "repro"], proj, env=env, timeout=600)
    assert "up to date" in sh(["dvc", "status"], proj, env=env).stdout
    assert check_published(f"sqlite:///{proj / 'mlflow.db'}", proj)["train_runs"] == 2
    assert len([r for r in _runs(proj) if r.data.tags.get("batchlab.role") == "sweep"]) == 1


def test_an_address_nobody_answers_is_one_line_and_nothing_trained(tmp_path):
    proj = make_project(tmp_path / "p", PARAMS, git=False)
    sh([sys.executable, "-m", "pipeline", "prepare"], proj)
    address = f"127.0.0.1:{_free_port()}"
    env = env_for(proj) | {"RAY_ADDRESS": address}
    proc = sh([sys.executable, "-m", "pipeline", "train", "--batch-size", "16"], proj, env=env, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and address in proc.stderr, proc.stderr
    assert not (proj / "outputs").exists() and not (proj / "checkpoints").exists()
    assert not [r for r in _runs(proj) if r.data.tags.get("batchlab.role") == "train"]


def test_asking_for_ray_without_it_is_one_line_naming_the_install(tmp_path):
    proj = make_project(tmp_path / "p", PARAMS, git=False)
    sh([sys.executable, "-m", "pipeline", "prepare"], proj)
    absent = tmp_path / "absent" / "ray"  # an import of ray fails here as where it is not installed
    absent.mkdir(parents=True)
    (absent / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    env = env_for(proj)
    env["PYTHONPATH"] = f"{absent.parent}{os.pathsep}{env['PYTHONPATH']}"
    proc = sh([sys.executable, "-m", "pipeline", "train", "--batch-size", "16"], proj, env=env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "requirements-ray.txt" in proc.stderr, proc.stderr
    assert not (proj / "outputs").exists() and not (proj / "checkpoints").exists()


def _ours(proj: Path) -> list[int]:
    """Processes of this project's command still alive: the stage's driver and Ray workers that
    run its trainings (their working folder is the project)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cwd == str(proj) and state != "Z" and (b"pipeline" in cmd or b"ray::" in cmd):
            found.append(int(entry))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("moment", ("before-checkpoint", "after-checkpoint"))
def test_the_head_node_lost_mid_sweep_ends_in_one_line_and_nothing_runs_on(tmp_path, moment):
    """The head node killed while the worker node trains: `dvc repro` ends with one line of ours
    naming the address; the worker's training stops with its checkpoint (no run FINISHED in the
    store without a record in outputs/, no temporary file), and no process of ours runs on."""
    cluster = Cluster()  # its own: this one loses its head
    try:
        proj = make_project(tmp_path / "p", merge(LONG, {"train": {"epochs": 40}}))
        env = ray_env(env_for(proj)) | {"RAY_ADDRESS": cluster.address}
        repro = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=proj, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        name = _trainer_on(proj, cluster.worker)
        while moment == "after-checkpoint" and not (proj / "checkpoints" / f"{name}.pt").exists():
            assert repro.poll() is None, repro.communicate()[1][-2000:]
            time.sleep(0.05)
        _kill_session(cluster.head.pid)
        cluster.head.wait()
        out, err = repro.communicate(timeout=30)
        assert repro.returncode != 0
        ours = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(ours) == 1 and cluster.address in ours[0], err[-3000:]
        assert "Traceback" not in err and "GCS" not in err, err[-3000:]
        deadline = time.monotonic() + 30
        while _ours(proj):
            assert time.monotonic() < deadline, [(pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:200]) for pid in _ours(proj)]
            time.sleep(0.2)
        assert (proj / "checkpoints" / f"{name}.pt").is_file()
        assert not list((proj / "checkpoints").glob(".*.tmp"))
        records = {json.loads(f.read_text())["record"] for f in (proj / "outputs").rglob("run.json")} \
            if (proj / "outputs").is_dir() else set()
        finished = [r for r in _runs(proj) if r.data.tags.get("batchlab.role") == "train"
                    and r.info.status == "FINISHED"]
        assert all(r.data.tags["batchlab.record"] in records for r in finished)
        # The head's own training died with it (SIGKILL): its run stays RUNNING until sync closes it.
        sh([sys.executable, "-m", "pipeline", "sync"], proj, env={k: v for k, v in env.items() if k != "RAY_ADDRESS"})
        statuses = {r.info.run_name: r.info.status for r in _runs(proj) if r.data.tags.get("batchlab.role") == "train"}
        # (The head's training may have died before it opened its run.)
        assert statuses[name] == "KILLED" and set(statuses.values()) == {"KILLED"}, statuses
    finally:
        cluster.stop()
