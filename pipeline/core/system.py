"""Facts about the machine a run happens on: device, peak memory, versions, git commit."""
from __future__ import annotations

import os
import platform
import resource
import subprocess
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import torch


def pick_device(wanted: str) -> torch.device:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is available (allowed here: auto, cpu)")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def processor(device: torch.device) -> str:
    """What computes: the card's name, or the CPU's architecture."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def device_name(device: torch.device) -> str:
    """``processor`` and, on the CPU, the torch threads in use now."""
    return processor(device) + (f"x{torch.get_num_threads()}threads" if device.type == "cpu" else "")


def sync(device: torch.device) -> None:
    """Wait for the work queued on a GPU; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak resident set (CPU) or peak allocated bytes (GPU) over a block of code.

    On Linux the process's RSS high-water mark is reset through /proc/self/clear_refs, so
    the figure covers the block, not the imports before it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._reset_ok = False

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._reset_ok = True
            except OSError:
                self._reset_ok = False
        return self

    def read(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._reset_ok:
            peak = proc_status_bytes("VmHWM")
            if peak is not None:
                return peak
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def __exit__(self, *exc) -> None:
        self.peak_bytes = self.read()


def proc_status_bytes(field: str) -> int | None:
    """A kB figure of /proc/self/status (VmRSS, VmHWM, ...) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "torchvision", "mlflow", "dvc", "scikit-learn", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    out["python"] = platform.python_version()
    return out


class CodeState(NamedTuple):
    commit: str   # HEAD, or "none" outside git
    tree: str     # git's hash of the pipeline/ folder at HEAD: the code a run ran
    dirty: bool   # uncommitted changes under pipeline/
    changed: str  # the last commit that changed pipeline/: unlike HEAD, committing dvc.lock or
                  # params.yaml leaves it, so a report rebuilt from the same inputs is the same file


def code_state(cwd: Path) -> CodeState:
    """The code a run ran. Only ``pipeline/`` counts: params are recorded as params, and
    dvc.lock and outputs change with every run."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        tree = git("rev-parse", "HEAD:pipeline")
        dirty = git("status", "--porcelain", "--", "pipeline")
        changed = git("log", "-1", "--format=%H", "--", "pipeline") or commit
        return CodeState(commit, tree, bool(dirty), changed)
    except (OSError, subprocess.SubprocessError):
        return CodeState("none", "none", False, "none")


def threads() -> int:
    return torch.get_num_threads()


# Work per optimizer step (batch size x model parameters, about a forward pass's multiply-adds)
# from which a step is worth every core. Below it one thread is faster: OpenMP's hand-offs cost
# more than they save, and the steps are many, so the metric logger (about 0.1 ms of CPU a point,
# five points a step) needs a core of its own. Measured on 2 cores, 784-128-10 MLP, logging every
# step: batch 64 (6.5M) ran 80k samples/s on one thread beside the logger, 40-60k on two; batch
# 512 (52M) 167k on one, 197k on two. Again with subnormals flushed (set_flush_denormal), 3 s
# cells: batch 8 13,782 on one, 11,241 on two; 64 67,143 / 62,467; 160 137,474 / 144,168.
PARALLEL_WORK = 1 << 24


def threads_for(wanted: int, work: int | None = None, device: str = "cpu") -> int:
    """``wanted`` torch threads; 0: chosen from ``work`` (all cores from PARALLEL_WORK up, else
    one), all cores when the work is not known. The choice is a function of the params and the
    machine, never of a timing, so the same run on the same machine repeats bit for bit.
    On a GPU the CPU only launches kernels: one thread (on a lent H200, batch 4096, 16 threads
    ran 3.86M samples/s against 4.62M on one, median of 5)."""
    if wanted:
        return wanted
    if device == "cuda":
        return 1
    return cpu_count() if work is None or work >= PARALLEL_WORK else 1


def set_threads(wanted: int, work: int | None = None, device: str = "cpu") -> int:
    n = threads_for(wanted, work, device)
    torch.set_num_threads(n)
    return n


def set_flush_denormal(on: bool) -> bool:
    """Compute CPU floats below 2**-126 (subnormals) as 0, or not (torch's default); whether
    the CPU supports it. A GPU is not affected. It is a setting of the calling thread, which
    OpenMP's threads copy when they start: call it before the process's first parallel work.

    Adam's running mean of a weight whose gradient has become 0 decays by beta1 = 0.9 a step:
    from 1e-3 it is subnormal about 770 steps later, and x86 arithmetic on such values takes many
    times longer. On the bench's synthetic MNIST (random labels: the 784-128-10 MLP stops learning,
    and after 3,000 steps at batch 64 all but 10 of its gradients were 0) 99 % of Adam's first
    moments were subnormal and the optimizer step over half of a step's time; flushing them took
    the pipeline from 40,770 to 68,038 samples/s there (2 cores, one thread, interleaved, median of
    3). On digits, batch 4, 10 epochs: 75 of 4,810."""
    return bool(torch.set_flush_denormal(on))


def cpu_count() -> int:
    return os.cpu_count() or 1
