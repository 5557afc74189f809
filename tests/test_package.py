"""The public names and the layering of the package."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import backchannel

SRC = Path(backchannel.__file__).parent
# A layer may import only from layers below it (DESIGN.md, "Layers").
LAYERS = ["wire", "core", "store", "server", "client", "cli"]


@pytest.mark.parametrize(
    "module",
    [
        "backchannel",
        "backchannel.wire",
        "backchannel.core",
        "backchannel.store",
        "backchannel.server",
        "backchannel.client",
    ],
)
def test_all_is_honest(module: str) -> None:
    imported = importlib.import_module(module)
    assert sorted(imported.__all__) == sorted(set(imported.__all__))
    for name in imported.__all__:
        assert hasattr(imported, name), f"{module}.__all__ names missing {name}"


def _layer(path: Path) -> str:
    relative = path.relative_to(SRC).parts
    return relative[0].removesuffix(".py")


def test_imports_point_down_the_layers() -> None:
    wrong: list[str] = []
    for path in SRC.rglob("*.py"):
        layer = _layer(path)
        if layer not in LAYERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1 and node.module:
                parts = path.relative_to(SRC).parts
                base = parts[: len(parts) - node.level]
                target = (base + tuple(node.module.split(".")))[0] if base or node.module else ""
                target = target.removesuffix(".py")
                if target in LAYERS and LAYERS.index(target) > LAYERS.index(layer):
                    wrong.append(f"{path.relative_to(SRC)} imports {target}")
    assert not wrong


def test_wire_has_no_io() -> None:
    for path in (SRC / "wire").rglob("*.py"):
        source = path.read_text()
        for forbidden in ("import asyncio", "import socket", "import threading"):
            assert forbidden not in source, f"{path.name}: {forbidden}"
