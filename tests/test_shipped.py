"""The shipped models (``phraseldm_jax/shipped.py``, ``shipping.py``, ``cli/ship.py``):
tiny workdirs shipped with the real command, ``sample.py`` without ``--checkpoint`` pointed
at them by ``PHRASELDM_PRETRAINED`` samples the same songs as the workdirs they came from
(same seed: same tokens, same MIDI bytes), and every refusal is one line."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import ldm_fixtures
import numpy as np
import pytest
import vae_fixtures

import sample
from configs import paths
from phraseldm_jax import ldm, ldm_task, pretrained, shipped, shipping, vae
from phraseldm_jax.cli import edit_flags
from phraseldm_jax.cli import ship as cli

SAMPLE = ["--num_songs", "2", "--sampler", "ddim", "--steps", "3", "--max_decode_length", "8",
          "--seed", "3", "--cpu_devices", "1", "--force_length"]  # fmt: skip


def _random_params(init, seed):
    """Random params shaped as ``init`` gives (traced only: no init program compiled)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: rng.normal(0.0, 0.3, a.shape).astype(np.float32), jax.eval_shape(init)
    )


def _vae_workdir(path) -> str:
    config = vae_fixtures.tiny_config(3)
    model = vae.PhraseVAEConfig(**config.model.to_dict())
    params = _random_params(lambda: vae.init_params(jax.random.key(0), model), 0)
    return ldm_fixtures.save_workdir(path, config, params, step=5)


def _ldm_workdir(path, latent_dir, vae_dir, sections, seed) -> str:
    config = ldm_fixtures.tiny_config(latent_dir, not sections, sections, num_steps=7)
    config.model.dit.sample_size = 64  # 16 bars
    config.model.scale_factor, config.model.clip_range = 0.76, 3.0
    config.vae.workdir = vae_dir
    config.data.reference_padding = sections  # travels in shipped.json (editing)
    model = ldm_task.ldm_config(config)
    params = _random_params(lambda: ldm.init_params(jax.random.key(1), model), seed)
    return ldm_fixtures.save_workdir(path, config, params, step=7)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("workdirs")
    vae_dir = _vae_workdir(root / "vae")
    latents = root / "latents"
    latents.mkdir()
    stats = {"scale_factor": 0.76, "abs_p999": 3.0, "slot_order": "pitch_order",
             "train_rows": 40, "vae_workdir": vae_dir,
             "vae_source": f"checkpoint {vae_dir}/checkpoints/best/5"}  # fmt: skip
    (latents / "stats.json").write_text(json.dumps(stats))
    return {
        "vae": vae_dir,
        "lencond": _ldm_workdir(root / "lencond", str(latents), vae_dir, False, 1),
        "seccond": _ldm_workdir(root / "seccond", str(latents), vae_dir, True, 2),
    }


def _ship(capsys, workdirs, out, *extra, seccond=True):
    argv = ["--vae_workdir", workdirs["vae"], "--ldm_workdir", workdirs["lencond"],
            "--out", str(out), *extra]  # fmt: skip
    if seccond:
        argv += ["--seccond_workdir", workdirs["seccond"]]
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def shipped_dir(workdirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained") / "pop909-small"
    assert cli.main(["--vae_workdir", workdirs["vae"], "--ldm_workdir", workdirs["lencond"],
                     "--seccond_workdir", workdirs["seccond"], "--out", str(out)]) == 0  # fmt: skip
    return out


def _refused(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_the_folder_and_its_manifest(shipped_dir, workdirs):
    names = sorted(
        os.path.relpath(os.path.join(d, f), shipped_dir)
        for d, _, files in os.walk(shipped_dir)
        for f in files
    )
    assert names == [
        "README.md",
        "ldm_lencond/config.json",
        "ldm_lencond/model.safetensors",
        "ldm_seccond/config.json",
        "ldm_seccond/model.safetensors",
        "ldm_seccond/section_vocab.json",
        "shipped.json",
        "vae/config.json",
        "vae/model.safetensors",
        "vae/tokenizer/special_tokens_map.json",
        "vae/tokenizer/tokenizer.json",
        "vae/tokenizer/tokenizer_config.json",
    ]
    assert not [n for n in os.listdir(shipped_dir.parent) if n.startswith(".")]  # no temp left
    manifest = json.loads((shipped_dir / "shipped.json").read_text())
    assert (manifest["format"], manifest["version"]) == (shipped.FORMAT, shipped.VERSION)
    lencond, seccond = manifest["ldm"]["lencond"], manifest["ldm"]["seccond"]
    assert (lencond["folder"], lencond["vae"], seccond["folder"]) == (
        "ldm_lencond", "vae", "ldm_seccond")  # fmt: skip
    assert (lencond["scale_factor"], lencond["clip_range"], lencond["clip"]) == (
        0.76,
        3.0,
        "scaled",
    )
    assert (seccond["cross_bias_mode"], seccond["section_vocab"]) == ("mask", "section_vocab.json")
    assert (lencond["slot_order"], lencond["reference_padding"], seccond["reference_padding"]) == (
        "pitch_order", False, True)  # fmt: skip
    assert lencond["training"]["checkpoint"] == {"which": "best", "step": 7, "verified": True}
    assert lencond["training"]["num_steps"] == 7 and lencond["latents"]["train_rows"] == 40
    assert lencond["training"]["data"]["train_split"] == "train"
    assert manifest["vae"]["training"]["steps"] == 5
    assert manifest["vae"]["training"]["data"]["train_split"] == "train"
    assert re.fullmatch(r"[0-9a-f]{40}", manifest["provenance"]["commit"])
    assert manifest["provenance"]["command"][0] == cli.PROG
    assert set(manifest["files"]) == set(names) - {"README.md", "shipped.json"}
    vae_config = json.loads((shipped_dir / "vae" / "config.json").read_text())
    assert not os.path.isabs(vae_config["tokenizer_repo_id"])  # no machine path shipped
    shipped.verify(shipped_dir)
    # The exported models are the workdirs' (same params, same sampling config).
    for name in ("lencond", "seccond"):
        a = pretrained.load_ldm(str(shipped_dir / f"ldm_{name}"))
        b = pretrained.load_ldm(workdirs[name])
        assert a.default_clip == b.default_clip == "scaled"
        assert a.config == dataclasses.replace(b.config, train_encoders=False)
        vae_fixtures.assert_trees_equal(a.params, b.params)


def _songs(out):
    return {n: (out / n).read_bytes() for n in sorted(os.listdir(out)) if n.startswith("song_")}


@pytest.mark.parametrize("plan", [None, "A-4 B-4"])
def test_sample_without_checkpoint_equals_the_workdir(
    shipped_dir, workdirs, tmp_path, monkeypatch, capsys, plan
):
    monkeypatch.setenv("PHRASELDM_PRETRAINED", str(shipped_dir))
    options = SAMPLE + (["--plan", plan] if plan else ["--bars", "8"])
    name = "seccond" if plan else "lencond"
    assert sample.main(["--out", str(tmp_path / "shipped"), *options]) == 0
    err = capsys.readouterr().err
    kind = "section" if plan else "length"
    assert f"using the shipped {kind}-conditioned PhraseLDM {shipped_dir}/ldm_{name}" in err
    summary = json.loads((tmp_path / "shipped" / "summary.json").read_text())
    assert summary["shipped"]["ldm"] == name and summary["format"] == "original"
    assert summary["settings"]["clip"] == "scaled"
    assert summary["written"] == 2 and (tmp_path / "shipped" / "song_001.mid").is_file()
    assert (
        sample.main(["--checkpoint", workdirs[name], "--out", str(tmp_path / "wd"), *options]) == 0
    )
    songs = _songs(tmp_path / "shipped")
    assert len(songs) == 4 and songs == _songs(tmp_path / "wd")  # same tokens, same MIDI
    # --checkpoint naming a shipped folder finds its VAE in shipped.json.
    monkeypatch.delenv("PHRASELDM_PRETRAINED")
    folder = str(shipped_dir / f"ldm_{name}")
    assert sample.main(["--checkpoint", folder, "--out", str(tmp_path / "f"), *options]) == 0
    assert _songs(tmp_path / "f") == songs


def test_no_shipped_models_and_no_seccond_are_one_line(workdirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PHRASELDM_PRETRAINED", str(tmp_path / "none"))
    err = _refused(capsys, ["--out", str(tmp_path / "o")])
    assert f"no --checkpoint given and no shipped models in {tmp_path}/none (no such folder)" in err
    assert "give --checkpoint (an LDM workdir or folder) or set PHRASELDM_PRETRAINED" in err
    out = tmp_path / "lencond_only"
    assert _ship(capsys, workdirs, out, seccond=False)[0] == 0
    monkeypatch.setenv("PHRASELDM_PRETRAINED", str(out))
    err = _refused(capsys, ["--out", str(tmp_path / "o"), "--plan", "A-8"])
    assert (
        f"no shipped section-conditioned PhraseLDM in {out} (it ships: lencond): give "
        "--checkpoint (a section-conditioned PhraseLDM)"
    ) in err
    assert not (tmp_path / "o").exists()
    # A cut weights file (a Git LFS pointer) and a manifest that disagrees with config.json.
    (out / "vae" / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    err = _refused(capsys, ["--out", str(tmp_path / "o")])
    assert re.search(r"vae/model.safetensors is \d+ bytes, shipped.json says \d+", err)
    assert "git lfs pull" in err
    assert _ship(capsys, workdirs, out, "--overwrite", seccond=False)[0] == 0
    manifest = json.loads((out / "shipped.json").read_text())
    manifest["ldm"]["lencond"]["scale_factor"] = 0.5
    (out / "shipped.json").write_text(json.dumps(manifest))
    err = _refused(capsys, ["--out", str(tmp_path / "o")])
    assert "shipped.json: scale_factor 0.5 but" in err and "says 0.76" in err


def test_the_size_limit_and_other_refusals(workdirs, tmp_path, capsys):
    out = tmp_path / "pretrained" / "small"
    code, err = _ship(capsys, workdirs, out, "--max_mb", "0.01")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert re.search(r"error: the shipped models take [\d.]+ MB, over the 0.01 MB limit \(", err)
    assert "nothing written" in err and not out.exists()
    assert os.listdir(out.parent) == []  # the temporary folder is gone
    assert _ship(capsys, workdirs, out, seccond=False)[0] == 0
    (out / "README.md").write_text("# our model card\n")
    before = (out / "shipped.json").read_text()
    code, err = _ship(capsys, workdirs, out)
    assert code == 1 and "already holds shipped models (pass --overwrite)" in err
    code, err = _ship(capsys, workdirs, out, "--overwrite", "--max_mb", "0.01")
    assert code == 1 and (out / "shipped.json").read_text() == before  # the old one stays
    code, err = _ship(capsys, workdirs, out, "--overwrite")
    assert code == 0, err
    assert (out / "README.md").read_text() == "# our model card\n"  # the card is kept
    assert "seccond" in json.loads((out / "shipped.json").read_text())["ldm"]

    other = tmp_path / "other"
    argv = ["--vae_workdir", workdirs["vae"], "--ldm_workdir", workdirs["seccond"], "--out", other]
    assert cli.main([str(a) for a in argv]) == 1
    assert "is not a length-conditioned PhraseLDM" in capsys.readouterr().err
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "x.txt").write_text("x")
    code, err = _ship(capsys, workdirs, stray)
    assert code == 1 and "holds other files (no shipped.json)" in err
    argv = [
        "--vae_workdir",
        tmp_path / "nope",
        "--ldm_workdir",
        workdirs["lencond"],
        "--out",
        other,
    ]
    assert cli.main([str(a) for a in argv]) == 2
    assert "--vae_workdir" in capsys.readouterr().err and not other.exists()


def test_an_ldm_of_another_vae_is_refused(workdirs, tmp_path, capsys):
    other_vae = _vae_workdir(tmp_path / "other_vae")
    argv = ["--vae_workdir", other_vae, "--ldm_workdir", workdirs["lencond"],
            "--out", tmp_path / "out"]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert "was trained with the PhraseVAE" in err and "--allow_vae_mismatch" in err
    assert cli.main([str(a) for a in argv] + ["--allow_vae_mismatch"]) == 0
    assert "warning: lencond was trained with the PhraseVAE" in capsys.readouterr().err


def test_editing_reads_the_conventions_from_shipped_json(shipped_dir):
    for name, padding in (("lencond", False), ("seccond", True)):
        entry = shipped.shipped_ldm(shipped_dir, name)
        assert edit_flags.model_conventions(entry.folder, True, entry) == ("pitch_order", padding)
    # Without shipped.json an original-layout folder is taken for the original's (unscaled pad).
    assert edit_flags.model_conventions(str(shipped_dir / "ldm_lencond"), True)[1] is True


def test_model_card_template(shipped_dir):
    manifest = json.loads((shipped_dir / "shipped.json").read_text())
    card = shipping.model_card(manifest)
    assert card == (shipped_dir / "README.md").read_text()
    assert "| `ldm_seccond/` | PhraseLDM, section-conditioned" in card
    assert manifest["provenance"]["commit"] in card and "## Results" in card


REPO_SHIPPED = paths.pretrained_dir()


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(REPO_SHIPPED, shipped.MANIFEST)),
    reason=f"no shipped models in {REPO_SHIPPED} yet",
)
def test_the_models_shipped_in_the_repository(tmp_path, capsys):
    """Once pretrained/pop909-small is in the checkout: every file as shipped.json lists it,
    within the size limit, and sample.py without --checkpoint writes a song with it."""
    shipped.verify(REPO_SHIPPED)
    assert shipping.folder_bytes(REPO_SHIPPED) <= shipping.DEFAULT_MAX_MB * shipping.MB
    argv = ["--out", str(tmp_path / "songs"), "--num_songs", "1", "--bars", "4", "--steps", "2",
            "--max_decode_length", "16", "--force_length", "--cpu_devices", "1"]  # fmt: skip
    assert sample.main(argv) == 0
    assert "using the shipped length-conditioned PhraseLDM" in capsys.readouterr().err
    assert (tmp_path / "songs" / "song_000.txt").is_file()
