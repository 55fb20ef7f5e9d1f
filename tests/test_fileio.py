"""fileio: whole-or-nothing writes, the permissions open() gives, JSON reading errors."""

from __future__ import annotations

import json
import os
import stat

import pytest

from phraseldm_jax import fileio


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_text_is_written_atomically(tmp_path):
    path = tmp_path / "sub" / "config.json"
    fileio.write_text(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n'

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        fileio.atomic_write(path, failing)
    assert path.read_text() == '{"a": 1}\n'
    assert os.listdir(path.parent) == ["config.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_get_the_permissions_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        fileio.write_text(tmp_path / "a.txt", "x")
        fileio.write_json(tmp_path / "b.json", {"x": 1})
        fileio.write_bytes(tmp_path / "c.bin", b"x")
        fileio.atomic_write(tmp_path / "d.npz", lambda tmp: open(tmp, "w").close())
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert _mode(tmp_path / "plain.txt") == expected
    for name in ("a.txt", "b.json", "c.bin", "d.npz"):
        assert _mode(tmp_path / name) == expected, name
    if umask == 0o022:
        assert expected == 0o644


def test_temporary_name_keeps_the_extension(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        with open(tmp, "w") as f:
            f.write("x")

    fileio.atomic_write(tmp_path / "latents.npz", write)
    assert seen[0].endswith("latents.npz") and os.path.dirname(seen[0]) == str(tmp_path)
    assert os.listdir(tmp_path) == ["latents.npz"]


def test_json_round_trip_and_errors(tmp_path):
    fileio.write_json(tmp_path / "v.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "v.json").read_text() == json.dumps(
        {"a": [1, 2], "b": 1}, indent=2, sort_keys=True
    ) + "\n"
    assert fileio.read_json(tmp_path / "v.json") == {"a": [1, 2], "b": 1}
    with pytest.raises(FileNotFoundError, match="missing.json not found"):
        fileio.read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        fileio.read_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="list.json: expected a JSON object, got list"):
        fileio.read_json(tmp_path / "list.json")


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "models"

    def build(files):
        def write(folder):
            for name, text in files.items():
                fileio.write_text(os.path.join(folder, name), text)
            if "fail" in files:
                raise RuntimeError("stopped")

        return write

    fileio.replace_folder(target, build({"a.txt": "one"}))
    assert sorted(os.listdir(target)) == ["a.txt"]
    fileio.replace_folder(target, build({"b.txt": "two"}))
    assert sorted(os.listdir(target)) == ["b.txt"]  # the old files went with the old folder
    with pytest.raises(RuntimeError, match="stopped"):
        fileio.replace_folder(target, build({"c.txt": "three", "fail": ""}))
    assert sorted(os.listdir(target)) == ["b.txt"] and (target / "b.txt").read_text() == "two"
    assert os.listdir(tmp_path) == ["models"]  # no temporary folder left
