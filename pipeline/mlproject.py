"""Adapter for MLproject entry points: ``VERB [--params F] [--batch-size N] key=value ...``.

MLflow substitutes every parameter, empty ones too; ``key=`` (no value) means "keep params.yaml".
"""
from __future__ import annotations

import sys

from .__main__ import main as cli


def translate(argv: list[str]) -> list[str]:
    out: list[str] = []
    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            if value.strip():
                out += ["--set", f"{key}={value}"]
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(cli(translate(sys.argv[1:])))
