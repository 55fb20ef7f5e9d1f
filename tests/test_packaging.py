"""What ``pip install`` puts in site-packages: our two packages and their data, never the
repository's ``configs`` or ``benchmarks`` folders; and config files that load by path from
any working folder."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("phraseldm_jax", "input_pipeline")


def _pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _package_data_files() -> list[str]:
    """Files of the checkout that ``[tool.setuptools.package-data]`` puts in the wheel."""
    found = []
    for package, patterns in _pyproject()["tool"]["setuptools"]["package-data"].items():
        root = os.path.join(REPO, package.replace(".", os.sep))
        for folder, _, files in os.walk(root):
            for name in files:
                relative = os.path.relpath(os.path.join(folder, name), root)
                if any(fnmatch.fnmatch(relative, p) for p in patterns):
                    found.append(f"{package.replace('.', '/')}/{relative}")
    return found


def test_package_list_names_only_our_packages():
    config = _pyproject()
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted({name.rstrip("*") for name in include}) == sorted(PACKAGES)
    first_party = config["tool"]["ruff"]["lint"]["isort"]["known-first-party"]
    assert set(first_party) == {*PACKAGES, "configs", "benchmarks"}  # still ours to sort


@pytest.mark.slow
def test_wheel_holds_our_packages_and_data_but_no_configs_or_benchmarks(tmp_path):
    """Builds the wheel offline (``pip wheel --no-deps --no-build-isolation``) from a copy of
    what packaging reads, so the checkout gets no build/ or egg-info folders."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in (*PACKAGES, "configs", "benchmarks"):
        shutil.copytree(os.path.join(REPO, name), source / name, ignore=ignore)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["--no-index", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == set(PACKAGES)
    assert "phraseldm_jax/cli/common.py" in names and "input_pipeline/splits.py" in names
    missing = [f for f in _package_data_files() if f not in names]
    assert not missing, f"package data left out of the wheel: {missing}"


def test_config_files_load_by_path_from_another_folder(tmp_path):
    """``python /repo/train_vae.py --config /repo/configs/vae_stage2.py:tiny`` run elsewhere:
    the config file's ``from configs import ...`` resolves (the script's folder is
    sys.path[0]). An override of a field no config has stops the run right after the config
    loaded (naming the key is only possible once it has), before any training."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runs = (("train_vae.py", "vae_stage2.py:tiny"), ("train_ldm.py", "ldm_lencond.py:tiny"))
    for script, config in runs:
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, script)]
            + ["--config", os.path.join(REPO, "configs", config), "--workdir", str(tmp_path / "w")]
            + ["--config.train.no_such_field=1"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]  # a usage error, said in one line
        assert "unknown config key 'train.no_such_field'" in proc.stderr, proc.stderr[-2000:]
        assert "ModuleNotFoundError" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "w").exists()
