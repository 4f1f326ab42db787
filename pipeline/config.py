"""Parameters: read once at the edge, validated into typed objects, passed down.

Every stage gets a ``Params``; nothing deeper reads ``params.yaml`` or the environment.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "linear")


class ParamsError(ValueError):
    """A bad parameter. The message is one line: key, value, what is allowed."""


class Unreachable(RuntimeError):
    """A service the stage was told to use (the Ray cluster at RAY_ADDRESS) did not answer; nothing was started."""


class DataError(RuntimeError):
    """Missing, malformed or altered data. The message names the file. (Defined here, beside
    ParamsError, so that the command line can catch it before anything imports torch.)"""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


class _TargetSection(_Section):
    """A section that may name the user's code (Hydra's ``_target_``): its other keys are keyword
    arguments, and ``code`` is the file DVC tracks for it."""
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True, serialize_by_alias=True,
                              allow_inf_nan=False)

    @field_validator("code", check_fields=False)
    @classmethod
    def _relative(cls, v: str) -> str:
        return _project_path(v)

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a target (or a torchvision model): the section's other keys."""
        return dict(self.model_extra or {})


class DataParams(_TargetSection):
    """A built-in data set (``name``) or the user's own Dataset class (``_target_``, its other keys
    are its keyword arguments)."""

    name: Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "linear"] = "digits"
    # mnist/fashion_mnist: root/MNIST/raw/ (IDX files); cifar10/100: root/cifar-10-batches-py/ (python
    # batches); imagefolder: root/train/<class>/* and optionally root/test/<class>/*.
    root: str = "data/raw"
    # torchvision.transforms.v2 names and keyword arguments, e.g. [{Resize: {size: [32, 32]}}]: applied
    # once at prepare to every split; the normalisation fitted on train comes after them.
    transforms: tuple[Any, ...] = ()
    target: str | None = Field(None, alias="_target_")
    # The file that defines the data: a dep of the prepare stage (editing it prepares again).
    code: str = "pipeline/core/datasets.py"
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    seed: int = Field(0, ge=0)
    # MNIST / Fashion-MNIST: fetch missing files through torchvision's own download, which
    # checks its md5 sums; mirrors (base URLs) replace torchvision's list when given.
    download: bool = False
    mirrors: tuple[str, ...] = ()
    # The tutorial's synthetic regression y = 2x + 1 + noise.
    linear_samples: int = Field(1000, ge=10)
    linear_noise: float = Field(0.1, ge=0)

    @field_validator("transforms")
    @classmethod
    def _specs(cls, v: tuple[Any, ...]) -> tuple[Any, ...]:
        return _transform_specs(v)

    @model_validator(mode="after")
    def _kwargs_need_a_target(self) -> "DataParams":
        if self.kwargs and self.target is None:
            key = next(iter(self.kwargs))
            raise ValueError(f"data.{key}={self.kwargs[key]!r}: unknown key (allowed: "
                             f"{', '.join(type(self).model_fields)}; other keys are keyword arguments of a "
                             f"data._target_)")
        return self


BUILTIN_MODELS = ("mlp", "linear")
DEFAULT_MODEL_CODE = "pipeline/core/nets.py"


class ModelParams(_TargetSection):
    """A built-in (``name: mlp | linear``), a torchvision model (``name: resnet18``) or the user's
    class or factory (``_target_: pkg.module.Name``); the section's other keys are its keyword
    arguments (``pipeline.core.models`` checks them against its signature)."""

    name: str = Field("mlp", min_length=1)
    hidden_sizes: tuple[int, ...] = (64,)
    target: str | None = Field(None, alias="_target_")
    # The file that defines the network: a dependency of the train and evaluate stages in
    # dvc.yaml (editing it retrains), its sha256 recorded on every run.
    code: str = DEFAULT_MODEL_CODE

    @field_validator("hidden_sizes")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(h < 1 for h in v):
            raise ValueError("every hidden size must be a positive integer")
        return v

    @model_validator(mode="after")
    def _kwargs_need_a_network(self) -> "ModelParams":
        if self.kwargs and self.target is None and self.name in BUILTIN_MODELS:
            key = next(iter(self.kwargs))
            raise ValueError(f"model.{key}={self.kwargs[key]!r}: not a key of model.name={self.name!r} "
                             f"(allowed: name, hidden_sizes, code; other keys are keyword arguments of a "
                             f"torchvision model or a _target_)")
        return self

    def unused(self) -> tuple[str, ...]:
        """The keys of this section that the chosen network does not read."""
        if self.target is not None:
            return ("name", "hidden_sizes")
        return () if self.name == "mlp" else ("hidden_sizes",)

    @property
    def label(self) -> str:
        """A short name for titles: the target's last part, or the name."""
        return self.target.rsplit(".", 1)[-1] if self.target else self.name


class TrainParams(_Section):
    batch_sizes: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    # A run trains until it reaches target_value (stop_at_target) or has taken max_steps steps
    # (and, where epochs > 0, at most that many epochs): a budget in steps, so that a large batch
    # gets as many updates as a small one (Shallue et al. 2018). A run that stops short is censored.
    max_steps: int = Field(2000, ge=1)
    epochs: int = Field(0, ge=0)
    stop_at_target: bool = True
    optimizer: Literal["sgd", "adam"] = "adam"
    # The learning rate at base_batch_size; lr_scaling gives every batch size its starting rate.
    lr: float = Field(1e-2, gt=0)
    # Every batch size at its own tuned rate (lr_search): rates lr_search_factor apart around the
    # starting rate, tried with the first seed, widened while the best is at an edge (at most
    # lr_search_trials), chosen on steps to target_value on the validation split; the other seeds
    # then train at the chosen rate.
    lr_search: bool = True
    lr_search_factor: float = Field(2.0, gt=1)
    lr_search_trials: int = Field(7, ge=3)
    # Or a fixed grid: every rate with every seed, each batch size judged at its best on
    # validation. Either way lr_scaling, when set, scales each rate.
    lr_grid: tuple[float, ...] = ()
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    # Repeats: every batch size trains once per seed (model initialisation and batch order);
    # the comparison gives each figure's mean and 95 % interval over them.
    seeds: tuple[int, ...] = (0, 1, 2)
    # The seed of one run, set from ``seeds`` for each (never in params.yaml; not dumped).
    seed: int = Field(0, ge=0, exclude=True)
    drop_last: bool = False
    # Each epoch a seeded permutation of the training split; false reads it in its stored order
    # every epoch: the control that measures what shuffling does (compare two sweeps' reports).
    shuffle: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch intra-op threads; 0: one for small steps, all cores from batch x parameters >= 16M, one on a GPU
    # (system.set_threads).
    threads: int = Field(0, ge=0)
    # CPU floats below 2**-126 computed as 0 (system.set_flush_denormal): Adam's running mean of a
    # weight whose gradient has become 0 (a dead ReLU unit, a pixel that is almost never lit)
    # decays into that range, where x86 arithmetic is many times slower.
    flush_denormal: bool = True
    # Data path: "tensor" cuts batches by index from tensors on the device;
    # "dataloader" goes through torch.utils.data.DataLoader (same batches, slower).
    loader: Literal["tensor", "dataloader"] = "tensor"
    num_workers: int = Field(0, ge=0)
    # A training split larger than this (as float32) is not loaded whole: it streams from its file
    # through DataLoader workers (num_workers, pin_memory, persistent_workers), the same batches.
    memory_budget_mb: float = Field(4096, gt=0)
    pin_memory: bool = False
    persistent_workers: bool = False
    # Learning-rate scaling with batch size (Goyal et al. 2017) and warm-up.
    lr_scaling: Literal["none", "linear", "sqrt"] = "sqrt"
    base_batch_size: int = Field(32, ge=1)
    warmup_epochs: float = Field(0.0, ge=0)
    # Validation every N optimizer steps; 0: each 10 % further on (steps to a target read to a few percent).
    eval_every_steps: int = Field(0, ge=0)
    # The goal: target_value (the headline, where a run stops), and easier targets on the way
    # (curve_targets): the critical batch size is reported for each, as a curve.
    target_metric: Literal["val_acc", "val_loss"] = "val_loss"
    target_value: float = 0.2
    curve_targets: tuple[float, ...] = (0.5, 0.4, 0.3)
    # Gradient noise scale (McCandlish et al. 2018) of each trained model, measured after its loop.
    noise_scale: bool = True
    # Checkpoint every N optimizer steps (0: at every epoch end) and resume from it.
    checkpoint_every_steps: int = Field(0, ge=0)
    resume: bool = True
    stop_on_nonfinite: bool = True
    # Arithmetic of the forward pass: fp32, or autocast to bf16 / fp16 (fp16 with a gradient scaler).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Convolutional models: NHWC tensors, the layout tensor cores and oneDNN run fastest on.
    channels_last: bool = False
    # torch.compile the model: default, or reduce-overhead (CUDA graphs: the step is launched once
    # instead of kernel by kernel, the lever where a small model leaves a big card idle).
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"
    # Training batches only, per sample, batch-wise on the device: RandomHorizontalFlip,
    # RandomVerticalFlip, RandomCrop (v2 names and keywords; pipeline/core/transforms.py).
    augment: tuple[Any, ...] = ()

    @field_validator("augment")
    @classmethod
    def _augment(cls, v: tuple[Any, ...]) -> tuple[Any, ...]:
        return _transform_specs(v)

    @field_validator("batch_sizes", "seeds", "lr_grid", "curve_targets", mode="before")
    @classmethod
    def _list(cls, v: Any, info) -> Any:
        """One number, or a comma-separated string (`-P lr_grid=0.001,0.002`), as a list."""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (v,)
        if isinstance(v, str):
            items = [s.strip() for s in v.strip("[]").split(",") if s.strip()]
            return tuple(items if info.field_name in ("lr_grid", "curve_targets")
                         else (_int_item(s, f"train.{info.field_name}") for s in items))
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("needs at least one batch size")
        if any(b < 1 for b in v):
            raise ValueError("batch sizes must be positive integers")
        if len(set(v)) != len(v):
            raise ValueError("batch sizes must be distinct")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError("needs distinct non-negative integers, at least one")
        return v

    @field_validator("lr_grid")
    @classmethod
    def _lr_grid(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (lr > 0 and math.isfinite(lr)) for lr in v) or len(set(v)) != len(v):
            raise ValueError("needs distinct positive learning rates (or [] for train.lr alone)")
        return tuple(sorted(v))

    @model_validator(mode="after")
    def _targets(self) -> "TrainParams":
        easier = (lambda v: v > self.target_value) if self.target_metric == "val_loss" else (lambda v: v < self.target_value)
        bad = [v for v in self.curve_targets if not (math.isfinite(v) and easier(v))]
        if bad or len(set(self.curve_targets)) != len(self.curve_targets):
            side = "above" if self.target_metric == "val_loss" else "below"
            raise ValueError(f"train.curve_targets={list(self.curve_targets)}: each must be distinct and easier than "
                             f"train.target_value={self.target_value:g} (allowed: {self.target_metric} values {side} it)")
        return self

    def targets(self) -> list[float]:
        """The targets from the easiest to the headline (target_value)."""
        return sorted(self.curve_targets, reverse=self.target_metric == "val_loss") + [self.target_value]

    def searches(self) -> bool:
        """Is each batch size's learning rate found by a search (not a grid, not fixed)?"""
        return self.lr_search and not self.lr_grid

    def trials(self, seeds: tuple[int, ...] | None = None) -> list[tuple[float | None, int]]:
        """Every (learning rate, seed) a batch size trains, the learning rate None without a grid."""
        return [(lr, s) for lr in (self.lr_grid or (None,)) for s in (seeds or self.seeds)]

    def for_run(self, seed: int, lr: float | None = None) -> "TrainParams":
        """The params of one run of the sweep: its seed, and its learning rate from the grid."""
        return self.model_copy(update={"seed": seed} | ({} if lr is None else {"lr": lr}))


class TrackingParams(_Section):
    experiment: str = Field("batchlab", min_length=1)
    # MLflow history per metric holds at most this many points per run: per-step points
    # when the run has fewer steps, window means (window recorded as a param) above that.
    # The full per-step record always goes to steps.csv (artifact and DVC plot).
    max_points: int = Field(200, ge=10)
    full_history: bool = False


class EvaluateParams(_Section):
    batch_size: int = Field(1024, ge=1)


class CompareParams(_Section):
    # The memory a training step may hold: the recommendation names the largest batch that fits
    # it, from the step memory measured across the sweep.
    memory_mb: float = Field(4096, gt=0)


class ExecutorParams(_Section):
    """Where a train stage's trainings run. Not part of a sweep's identity: the same params give the
    same runs either way (DVC's train stages do not depend on it)."""
    # local: one after another in the stage's process. ray: each (seed, learning rate) a Ray task,
    # all at once, on the cluster at RAY_ADDRESS (a Ray instance of this machine when unset).
    name: Literal["local", "ray"] = "local"
    cpus: float = Field(1, gt=0)   # per training task
    gpus: float = Field(0, ge=0)   # per training task; a fraction shares a card (0.25: four at once)


class Params(_Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    tracking: TrackingParams = TrackingParams()
    evaluate: EvaluateParams = EvaluateParams()
    compare: CompareParams = CompareParams()
    executor: ExecutorParams = ExecutorParams()

    @model_validator(mode="before")
    @classmethod
    def _no_single_seed(cls, data: Any) -> Any:
        """A params file names the sweep's seeds; ``train.seed`` is one run's, set by the code."""
        train = data.get("train") if isinstance(data, dict) else None
        if isinstance(train, dict) and "seed" in train:
            raise ValueError(f"train.seed={train['seed']!r}: use train.seeds, a list (e.g. [{train['seed']}])")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        regression = self.data.name == "linear"
        if regression and (self.model.name != "linear" or self.model.target):
            raise ValueError(f"model.name={self.model.name!r} does not fit data.name='linear' (allowed: linear)")
        if regression and self.train.target_metric != "val_loss":
            raise ValueError("train.target_metric must be 'val_loss' for data.name='linear'")
        return self

    @property
    def task(self) -> str:
        return "regression" if self.data.name == "linear" else "classification"

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, as logged to MLflow."""
        out: dict[str, Any] = {}
        for section, values in self.model_dump(mode="json").items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out

    def described(self) -> dict[str, Any]:
        """``flat()`` less the keys that do not apply to the chosen network (``model.name`` and
        ``model.hidden_sizes`` beside a ``_target_``; ``hidden_sizes`` beside ``linear`` or a
        torchvision name): what a run records as its params, so that none describes it wrongly."""
        return {k: v for k, v in self.flat().items() if k not in {f"model.{u}" for u in self.model.unused()}}

    def sweep_key(self, data_hash: str) -> str:
        """Identity of a sweep: everything that shapes its training runs, the batch-size list
        included, and the data. A sweep's parent run holds exactly the runs its comparison
        describes, so another list is another sweep (DVC retrains its sizes under it)."""
        dump = self.model_dump(mode="json")
        for how_fetched in ("download", "mirrors"):  # checksummed: the same files either way
            dump["data"].pop(how_fetched)
        ident = {k: dump[k] for k in ("data", "model", "train")}
        blob = json.dumps({"params": ident, "data": data_hash}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _project_path(v: str) -> str:
    if Path(v).is_absolute() or ".." in Path(v).parts:
        raise ValueError("must be a path inside the project folder (DVC tracks it)")
    return Path(v).as_posix()


def _transform_specs(v: tuple[Any, ...]) -> tuple[Any, ...]:
    for spec in v:
        ok = isinstance(spec, str) or (isinstance(spec, dict) and len(spec) == 1 and
                                       isinstance(next(iter(spec.values())), (dict, type(None))))
        if not ok:
            raise ValueError(f"item {spec!r} is not a transform (allowed: a name, or {{Name: {{keyword: value}}}})")
    return v


def _int_item(text: str, key: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ParamsError(f"{key}: {text!r} is not an integer (allowed: a list of integers)") from None


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not isinstance(p, int))
    kind = first["type"]
    value = first.get("input")
    if kind == "extra_forbidden":
        section = loc.rsplit(".", 1)[0] if "." in loc else ""
        allowed = _allowed_keys(section)
        return f"unknown key {loc!r} (allowed in {section or 'top level'}: {', '.join(allowed)})"
    msg = first["msg"]
    if kind == "literal_error":
        msg = msg.replace("Input should be", "allowed:")
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if not loc or msg.startswith(f"{loc}."):
        return msg
    return f"{loc}={value!r}: {msg}"


def _allowed_keys(section: str) -> list[str]:
    model: type[BaseModel] = Params
    for part in filter(None, section.split(".")):
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def parse_params(raw: dict[str, Any] | None) -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_format_error(err)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=0.01`` -> (["train", "lr"], 0.01). The value is read as YAML, never evaluated."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} is not KEY=VALUE (for example train.lr=0.01)")
    key, value = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ParamsError(f"override {text!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {str(path)!r} not found (give an existing YAML file, e.g. params.yaml "
                          f"or configs/linear.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    for text in overrides or []:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ParamsError(f"override {text!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return parse_params(raw)
