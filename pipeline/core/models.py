"""Which network a sweep trains, from ``model`` params: a built-in (``name: mlp | linear``), a
torchvision model by name (``name: resnet18`` and its keyword arguments), or any importable class
or factory by Hydra's ``_target_`` convention (``_target_: examples.mymodels.nets.SmallCNN`` and
its keyword arguments). ``num_classes`` and ``in_channels`` follow from the data unless given.

Every way a target can be wrong stops with one line naming the key (``ParamsError``), before any
work: a module that cannot be imported, a missing name, something not callable or not known to
make a network (``check_maker``: refused before it is called), keywords its signature rejects, a
result that is not an ``nn.Module``.
"""
from __future__ import annotations

import hashlib
import inspect
import math
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..config import BUILTIN_MODELS, ModelParams, ParamsError
from .targets import bind, check_code, resolve_target


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm
    return tvm.list_models(module=tvm)  # classification models: they take num_classes


def _from_data(fn: Callable[..., Any], kwargs: dict[str, Any], shape: tuple[int, ...], n_out: int) -> dict[str, Any]:
    """``num_classes`` and ``in_channels`` from the data, where the signature names them and the
    params do not."""
    try:
        names = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    extra: dict[str, Any] = {}
    if "num_classes" in names and "num_classes" not in kwargs:
        extra["num_classes"] = n_out
    if len(shape) == 3 and "in_channels" in names and "in_channels" not in kwargs:
        extra["in_channels"] = shape[0]
    return extra | kwargs


# Packages whose callables build networks: a factory there is called without a return annotation.
MODEL_LIBRARIES = ("torchvision", "timm")


def check_maker(fn: Callable[..., Any], what: str, root: Path | str = ".") -> None:
    """Nothing is called that is not known to make a network: a class must subclass
    ``torch.nn.Module``; a function must be annotated to return one, or live in a model library
    (MODEL_LIBRARIES) or in the project's own folder (``model.code``). ``os.system``,
    ``builtins.eval``, ``subprocess.run`` and the like are refused here, uncalled. Raises ParamsError."""
    allowed = ("allowed: a torch.nn.Module subclass, a function annotated to return one, or a function "
               f"of {', '.join(MODEL_LIBRARIES)} or of this project's folder; it was not called")
    if inspect.isclass(fn):
        if issubclass(fn, nn.Module):
            return
        raise ParamsError(f"model._target_={what!r} is the class {fn.__name__}, not a torch.nn.Module ({allowed})")
    returns = _return_annotation(fn)
    if returns is not None:
        if inspect.isclass(returns) and issubclass(returns, nn.Module):
            return
        raise ParamsError(f"model._target_={what!r} is annotated to return {getattr(returns, '__name__', returns)}, "
                          f"not a torch.nn.Module ({allowed})")
    module = getattr(fn, "__module__", None) or ""
    if module.split(".")[0] in MODEL_LIBRARIES or _in_project(fn, root):
        return
    raise ParamsError(f"model._target_={what!r} is a function of {module or 'no module'}, not known to make a "
                      f"network ({allowed})")


def _return_annotation(fn: Callable[..., Any]) -> Any:
    """The return annotation, resolved; None where there is none or it cannot be resolved."""
    import typing
    try:
        return typing.get_type_hints(fn).get("return")
    except Exception:  # a forward reference that does not resolve, a builtin: no claim either way
        return None


def _in_project(fn: Callable[..., Any], root: Path | str) -> bool:
    """Defined in a file of the user's own: under the project's folder (or a folder the user put on
    the import path, as the stages put the project's), and not in the Python installation or an
    environment, wherever those live (a virtualenv inside the project holds the standard
    library's and every package's code)."""
    import sys
    try:
        path = Path(inspect.getsourcefile(fn) or "").resolve()
    except TypeError:  # a builtin: no file
        return False
    if not path.is_file():
        return False
    envs = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    if any(env in path.parents for env in envs) or {"site-packages", "dist-packages"} & set(path.parts):
        return False
    return any(Path(d or ".").resolve() in path.parents for d in (str(root), *sys.path))


def check_model(p: ModelParams, root: Path | str = ".", build: bool = False) -> None:
    """What can be checked without the data: the target imports, is callable, takes the keywords,
    and lives in ``model.code``; a torchvision name exists. ``build``: a target is also called
    (on a stand-in sample shape) to see that it returns a Module, as the first stage does, so
    that no stage runs for a network that cannot train. Raises ParamsError."""
    if p.target is None:
        if p.name not in BUILTIN_MODELS and p.name not in _torchvision_names():
            raise ParamsError(f"model.name={p.name!r}: not a built-in or torchvision model (allowed: "
                              f"{', '.join(BUILTIN_MODELS)}, a name torchvision.models.list_models() gives, "
                              f"or model._target_)")
        if build and p.name not in BUILTIN_MODELS:  # its keywords reach the model's class: build to see
            build_model(p, (3, 32, 32), 2)
        return
    fn = resolve_target(p.target)
    check_maker(fn, p.target, root)
    bind(fn, _from_data(fn, p.kwargs, (1, 1, 1), 2), p.target)
    check_code(fn, p.target, p.code, "model", root)
    if build:
        build_model(p, (1, 8, 8), 2)


def build_model(p: ModelParams, shape: int | tuple[int, ...] | list[int], n_out: int) -> nn.Module:
    """The network for samples of ``shape`` (one sample's, e.g. (1, 28, 28)) and ``n_out``
    outputs (classes, or 1 for the regression)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n_in = math.prod(shape)
    if p.target is None and p.name == "mlp":
        from .nets import MLP
        return MLP(n_in, p.hidden_sizes, n_out)
    if p.target is None and p.name == "linear":
        from .nets import Linear
        return Linear(n_in, n_out)
    if p.target is None:
        import torchvision.models as tvm
        if p.name not in _torchvision_names():
            check_model(p)
        fn, what = tvm.get_model_builder(p.name), f"torchvision.models.{p.name}"
        kwargs = {"num_classes": n_out} | p.kwargs
    else:
        fn, what = resolve_target(p.target), p.target
        check_maker(fn, what, Path.cwd())
        kwargs = _from_data(fn, p.kwargs, shape, n_out)
        bind(fn, kwargs, what)
    try:
        model = fn(**kwargs)
    except TypeError as err:
        if "argument" not in str(err):
            raise
        raise ParamsError(f"model: {what}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                          f"rejects its arguments ({err})") from None
    if not isinstance(model, nn.Module):
        raise ParamsError(f"model._target_={what!r} returned a {type(model).__name__}, not a torch.nn.Module "
                          f"(allowed: a class or factory that returns one)")
    return model


def check_forward(p: ModelParams, sample_shape: tuple[int, ...], n_out: int, task: str, x=None) -> nn.Module:
    """Build the network for the data's real sample shape and run one forward and backward pass on
    a batch of two (``x``, else zeros): a network that cannot take the data stops here with one
    line naming it, the shape and the layer that refused (ParamsError), not in the loop after
    prepare wrote the data. Returns the network built."""
    import torch
    model = build_model(p, sample_shape, n_out)
    x = torch.zeros((2, *sample_shape)) if x is None else x[:2].float()
    entered: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda m, args: entered.append(names[m]))
             for m in model.modules() if not list(m.children())]
    try:
        out = model(x)
        y = torch.zeros(len(x), dtype=torch.long) if task == "classification" else torch.zeros_like(out)
        if task == "classification" and (out.ndim != 2 or out.shape[1] != n_out):
            raise ParamsError(f"model {_name(p)}: a batch of shape {list(x.shape)} gives outputs of shape "
                              f"{list(out.shape)}, not [{len(x)}, {n_out}] ({n_out} classes in the data)")
        loss_fn(task)(out, y).backward()
    except RuntimeError as err:
        layer = entered[-1] if entered else None
        where = f" in layer {layer} ({type(model.get_submodule(layer)).__name__})" if layer else ""
        raise ParamsError(f"model {_name(p)}: a batch of the data's shape {list(x.shape)} (after data.transforms) "
                          f"fails{where}: {' '.join(str(err).split())[:200]} (allowed: a network that takes "
                          f"this shape; change data.transforms or the model)") from None
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    return model


def _name(p: ModelParams) -> str:
    return p.target or p.name


def code_sha256(p: ModelParams, root: Path | str = ".") -> str:
    """The content hash of ``model.code`` (recorded on each run; reproduce compares it)."""
    path = Path(root) / p.code
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def loss_fn(task: str, reduction: str = "mean") -> nn.Module:
    return nn.CrossEntropyLoss(reduction=reduction) if task == "classification" else nn.MSELoss(reduction=reduction)


def rebuild_trained(folder: Path) -> nn.Module:
    """A trained model rebuilt from a training's output folder (its params, run.json and
    model.pt): what publishing from files logs to MLflow."""
    import json

    import torch
    from ..config import parse_params
    params = parse_params(json.loads((Path(folder) / "params.json").read_text()))
    identity = json.loads((Path(folder) / "run.json").read_text())
    model = build_model(params.model, identity.get("sample_shape") or identity["n_in"], identity["n_out"])
    model.load_state_dict(torch.load(Path(folder) / "model.pt", weights_only=True))
    return model
