"""Hydra's ``_target_`` convention: a dotted path to a class or function, called with the section's
other keys. One-line errors name the key (``ParamsError``), before any work."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Callable

from ..config import ParamsError


def resolve_target(target: str, key: str = "model._target_") -> Callable[..., Any]:
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = target.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ParamsError(f"{key}={target!r}: not a dotted path (allowed: module.Name, "
                          f"e.g. examples.mymodels.nets.SmallCNN)")
    error: BaseException | None = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and not module_name.startswith(err.name) and not err.name.startswith(module_name):
                raise ParamsError(f"{key}={target!r}: importing {module_name} failed "
                                  f"(No module named {err.name!r}, imported by it)") from None
            error = err
            continue
        except Exception as err:
            raise ParamsError(f"{key}={target!r}: importing {module_name} raised "
                              f"{type(err).__name__}: {err}") from None
        for i, attr in enumerate(parts[cut:], start=cut):
            if not hasattr(obj, attr):
                raise ParamsError(f"{key}={target!r}: {'.'.join(parts[:i])} has no {attr!r}")
            obj = getattr(obj, attr)
        if not callable(obj):
            raise ParamsError(f"{key}={target!r} is a {type(obj).__name__}, not a class or "
                              f"function (allowed: something that returns a torch.nn.Module)")
        return obj
    raise ParamsError(f"{key}={target!r}: no module {parts[0]!r} can be imported "
                      f"({error}); allowed: a module under the project folder or an installed package")


def bind(fn: Callable[..., Any], kwargs: dict[str, Any], what: str, section: str = "model") -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: its call will tell
    try:
        sig.bind(**kwargs)
    except TypeError as err:
        accepted = [n for n, q in sig.parameters.items()
                    if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)]
        bad = next((k for k in kwargs if k not in sig.parameters), None)
        if bad is not None and not any(q.kind == q.VAR_KEYWORD for q in sig.parameters.values()):
            raise ParamsError(f"{section}.{bad}={kwargs[bad]!r}: {what} takes no keyword {bad!r} "
                              f"(allowed: {', '.join(accepted) or 'none'})") from None
        raise ParamsError(f"{section}: {what} rejects its arguments ({err}); allowed keywords: "
                          f"{', '.join(accepted) or 'none'}") from None


def defined_in(fn: Callable[..., Any], root: Path | str = ".") -> str | None:
    """The project-relative file that defines ``fn``, or None outside the project (an installed
    package: its version is what requirements pin)."""
    try:
        source = Path(inspect.getsourcefile(fn) or "").resolve()
    except TypeError:
        return None
    try:
        return source.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return None


def check_code(fn: Callable[..., Any], target: str, code: str, section: str, root: Path | str) -> None:
    """The target must live in ``<section>.code``, the file DVC tracks for it."""
    source = defined_in(fn, root)
    if source is not None and source != code:
        raise ParamsError(f"{section}.code={code!r}: {section}._target_ {target} is defined in {source} "
                          f"(allowed: {source}, so that DVC reruns the stage when it changes)")
