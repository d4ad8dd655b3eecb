"""The package's layers point down only, counting imports made inside functions.

base (errors, file I/O, config, data config and its ONNX metadata format, the one preprocessing
function, image discovery, embedding comparisons, console plumbing) -> data -> modeling -> export ->
runtime -> index -> verify / bench -> serve -> API -> trainer -> demo -> cli. ``trainer`` uses the
library, never the CLI; the demo calls the API, and the CLI's ``demo`` command calls the demo. A layer may
import any layer below it; an import of a layer above it, or of a sibling at the same rank, is
a cycle waiting to happen and fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

# rank of each unit: a unit may import only units of a strictly lower rank (or itself)
RANKS = {
    "base": 0,
    "data": 1, "synth": 2,
    "modeling": 3,
    "export": 4, "trt": 5,
    "runtime": 6,
    "index": 7,
    "verify": 8, "bench": 8,
    "serve": 9,
    "api": 10,
    "trainer": 11,
    "demo": 12,
    "cli": 13,
}
BASE_MODULES = {"__init__", "errors", "fileio", "config", "data_config", "cpuinfo", "report", "preprocess",
                "embeddings", "console", "deploy_preprocess"}
TOP_LEVEL_UNITS = {"checkpoint": "modeling", "api": "api", "__main__": "cli"}


def unit_of(module: str) -> str | None:
    """The layer of a dotted module name inside this project (None for anything outside)."""
    parts = module.split(".")
    if parts[0] in ("trainer", "reid_train"):  # the folder trainer/ installs as reid_train
        return "trainer"
    if parts[0] != "reid_export":
        return None
    if len(parts) == 1:
        return "base"
    if (REPO / "reid_export" / parts[1]).is_dir():
        return parts[1]
    if parts[1] in TOP_LEVEL_UNITS:
        return TOP_LEVEL_UNITS[parts[1]]
    return "base" if parts[1] in BASE_MODULES else f"?{parts[1]}"


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports, at any depth (inside functions too), with its line."""
    rel = path.relative_to(REPO).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, node.lineno))
            for alias in node.names:  # ``from . import x`` where x is a module
                candidate = REPO.joinpath(*module.split("."), alias.name)
                if candidate.with_suffix(".py").exists() or candidate.is_dir():
                    out.append((f"{module}.{alias.name}", node.lineno))
    return out


def project_files() -> list[Path]:
    return sorted([*(REPO / "reid_export").rglob("*.py"), *(REPO / "trainer").rglob("*.py")])


def violations() -> list[str]:
    found = []
    for path in project_files():
        rel = path.relative_to(REPO).with_suffix("")
        source = unit_of(".".join(p for p in rel.parts if p != "__init__"))
        for module, line in imports_of(path):
            target = unit_of(module)
            if target is None or target == source:
                continue
            if source.startswith("?") or target.startswith("?"):
                found.append(f"{path.relative_to(REPO)}:{line}: {module}: module not placed in a layer")
            elif RANKS[target] >= RANKS[source]:
                found.append(f"{path.relative_to(REPO)}:{line}: {source} imports {module} ({target}, not below it)")
    return found


@pytest.mark.slow
def test_layers_point_down_only():
    found = violations()
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_trainer_does_not_use_the_cli():
    for path in (REPO / "trainer").rglob("*.py"):
        for module, line in imports_of(path):
            assert not module.startswith("reid_export.cli"), f"{path.relative_to(REPO)}:{line} imports {module}"


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checker is not blind to a function-level import pointing up (the way cycles were hidden)."""
    fake = REPO / "reid_export" / "export" / "_layer_probe_tmp.py"
    fake.write_text("def f():\n    from ..runtime import open_encoder\n    return open_encoder\n")
    try:
        assert any("_layer_probe_tmp.py:2: export imports reid_export.runtime" in v for v in violations())
    finally:
        fake.unlink()


@pytest.mark.parametrize("module,unit", [("reid_export.errors", "base"), ("reid_export.checkpoint", "modeling"),
                                         ("reid_export.runtime.encoder", "runtime"), ("trainer.engine", "trainer"), ("reid_train.engine", "trainer"),
                                         ("numpy", None)])
def test_units(module, unit):
    assert unit_of(module) == unit
