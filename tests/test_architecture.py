"""The layout rules of docs/ARCHITECTURE.md, read from the source with ``ast`` (so a lazy
import inside a function counts too): dependencies point one way, and modules stay small."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "phraseldm_jax"
MAX_MODULE_LINES = 600

# Layers of the package, lowest first. A module may import modules of its own layer or of
# lower ones, never of a higher one (docs/ARCHITECTURE.md, "Dependency rule").
LAYERS = {
    "core": (
        "remiz", "vocab", "sections", "phrases", "fileio", "errors", "trees", "diffusion",
        "inpainting", "sharding", "optim",
    ),
    "models": ("layers", "t5", "vae", "dit", "conditioning", "ldm"),
    "kernels": ("decode_cache", "decoding", "metrics"),
    "training": (
        "checkpoint_integrity",
        "checkpointing",
        "metric_writer",
        "workdir_lock",
        "interrupts",
        "nonfinite_guard",
        "trainer",
    ),
    "convert": ("convert",),
    "inference": (
        "pretrained", "vae_inference", "sampler", "songs", "latent_dataset", "latent_tools",
        "editing", "shipped", "shipping",
    ),
    "tasks": ("vae_task", "ldm_task"),
    "cli": ("cli", "__main__"),
}  # fmt: skip
RANK = {name: rank for rank, names in enumerate(LAYERS.values()) for name in names}
# What input_pipeline and configs/ may use of the package.
DATA_MAY_IMPORT = {"remiz", "vocab", "sections", "phrases", "fileio"}
CONFIGS_MAY_IMPORT = {"vae"}  # the stage -> head table


def package_imports(path: pathlib.Path) -> set[str]:
    """Top-level names of the ``phraseldm_jax`` modules ``path`` imports (``metrics.f1`` and
    ``convert.api`` count as ``metrics`` and ``convert``); relative imports are resolved."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            modules = ["phraseldm_jax." + path.parent.name]  # inside a subpackage
        elif isinstance(node, ast.ImportFrom) and node.module == "phraseldm_jax":
            modules = [f"phraseldm_jax.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "phraseldm_jax" and len(parts) > 1:
                names.add(parts[1])
    return names


def other_imports(path: pathlib.Path) -> set[str]:
    """Top-level packages ``path`` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def package_modules() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def layer_name(path: pathlib.Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else path.stem


def test_every_module_has_a_layer():
    missing = {layer_name(p) for p in package_modules()} - set(RANK)
    assert not missing, f"add {sorted(missing)} to LAYERS here and to docs/ARCHITECTURE.md"


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_package_imports_point_down(path):
    own = layer_name(path)
    upward = {m for m in package_imports(path) if RANK.get(m, -1) > RANK[own]}
    assert not upward, f"{path.relative_to(REPO)} ({own}) imports higher layers: {sorted(upward)}"


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_package_does_not_import_configs_or_benchmarks(path):
    assert not {"configs", "benchmarks"} & other_imports(path), path.relative_to(REPO)


@pytest.mark.parametrize(
    "path", sorted((REPO / "input_pipeline").glob("*.py")), ids=lambda p: p.name
)
def test_input_pipeline_imports_no_model(path):
    bad = package_imports(path) - DATA_MAY_IMPORT
    assert not bad, f"input_pipeline/{path.name} imports phraseldm_jax.{sorted(bad)}"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.name)
def test_configs_import_no_trainer_or_task(path):
    bad = package_imports(path) - CONFIGS_MAY_IMPORT
    assert not bad, f"configs/{path.name} imports phraseldm_jax.{sorted(bad)}"


def test_models_import_no_task_loader_sampler_or_convert():
    for name in LAYERS["models"]:
        imported = package_imports(PACKAGE / f"{name}.py")
        assert imported <= set(LAYERS["core"]) | set(LAYERS["models"]), (name, imported)


@pytest.mark.parametrize(
    "path",
    package_modules() + sorted((REPO / "input_pipeline").glob("*.py")),
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_modules_are_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)}: {lines} lines"


def test_library_modules_have_no_command_line():
    """Commands live in ``phraseldm_jax/cli`` (docs/ARCHITECTURE.md)."""
    for path in package_modules() + sorted((REPO / "input_pipeline").glob("*.py")):
        if path.parent.name == "cli":
            continue
        tree = ast.parse(path.read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "main" not in names, path.relative_to(REPO)
        parsers = [n for n in ast.walk(tree) if getattr(n, "attr", None) == "ArgumentParser"]
        assert not parsers, f"{path.relative_to(REPO)} builds a command-line parser"
