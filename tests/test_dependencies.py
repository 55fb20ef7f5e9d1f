"""Dependencies point one way: the input pipeline imports no model, task or trainer; the
trainer and checkpointing import neither configs/ nor convert/ (read from the source, so a
lazy import inside a function counts too)."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
MODELS = ("t5", "vae", "dit", "ldm", "conditioning", "decoding", "trainer", "vae_task", "ldm_task")


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize(
    "path", sorted((REPO / "input_pipeline").glob("*.py")), ids=lambda p: p.name
)
def test_input_pipeline_imports_no_model(path):
    bad = {f"phraseldm_jax.{m}" for m in MODELS} & imported_modules(path)
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize(
    "name", ["trainer", "checkpointing", "metric_writer", "fileio", "errors", "vae_task"]
)
def test_core_modules_import_neither_configs_nor_convert(name):
    imported = imported_modules(REPO / "phraseldm_jax" / f"{name}.py")
    bad = {m for m in imported if m.split(".")[0] == "configs" or "phraseldm_jax.convert" in m}
    assert not bad, f"{name}.py imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.name)
def test_configs_import_no_trainer(path):
    assert not {m for m in imported_modules(path) if m.startswith("phraseldm_jax")}, path.name
