"""``convert export`` writes a PhraseVAE folder whose tokenizer loads offline with
``transformers`` (the original's ``AutoTokenizer.from_pretrained(tokenizer_repo_id)``), with
the special tokens the original sets and our ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_convert_cli import _vae

from phraseldm_jax import vocab
from phraseldm_jax.cli import convert as cli
from phraseldm_jax.convert import api

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHRASE = "i-0 o-0 p-60 d-12 o-12 p-64 d-12"


def _check_tokenizer(folder, monkeypatch):
    transformers = pytest.importorskip("transformers", reason="needs the transformers package")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub lookup would fail, not silently succeed
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = {
        role: getattr(tokenizer, f"{role}_token_id")
        for role in ("bos", "eos", "pad", "unk", "sep", "cls", "mask")
    }
    assert ids == {"bos": vocab.BOS_ID, "eos": vocab.EOS_ID, "pad": vocab.PAD_ID,
                   "unk": vocab.UNK_ID, "sep": vocab.SEP_ID, "cls": 3, "mask": vocab.MASK_ID}  # fmt: skip
    assert tokenizer(PHRASE)["input_ids"] == vocab.PHRASE_VOCAB.encode(PHRASE)
    # Padding (right, with [PAD]) works, as the original's collate needs.
    batch = tokenizer(["[BOS] " + PHRASE + " [EOS]", "[BOS] b-1 [EOS]"], padding=True)
    assert batch["input_ids"][1] == [vocab.BOS_ID, vocab.PHRASE_VOCAB.id_of("b-1"), vocab.EOS_ID,
                                     *[vocab.PAD_ID] * 6]  # fmt: skip
    assert batch["attention_mask"][1] == [1, 1, 1] + [0] * 6
    assert tokenizer.decode(vocab.PHRASE_VOCAB.encode(PHRASE)) == PHRASE


def test_save_pretrained_loads_offline_with_the_special_tokens(tmp_path, monkeypatch):
    vocab.PHRASE_VOCAB.save_pretrained(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == sorted(vocab.TOKENIZER_FILES)
    assert vocab.Vocabulary.from_tokenizer_json(tmp_path / "tok" / "tokenizer.json") == (
        vocab.PHRASE_VOCAB
    )
    _check_tokenizer(tmp_path / "tok", monkeypatch)


def test_convert_export_writes_the_tokenizer_and_points_config_at_it(tmp_path, monkeypatch):
    api.export_phrase_vae(_vae(), tmp_path / "original")
    argv = ["import", "--kind", "vae", "--src", str(tmp_path / "original"),
            "--workdir", str(tmp_path / "w")]  # fmt: skip
    assert cli.main(argv) == 0
    command = [sys.executable, "-m", "phraseldm_jax.cli.convert", "export", "--kind", "vae",
               "--workdir", str(tmp_path / "w"), "--dst", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "config.json, model.safetensors, tokenizer" in done.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tokenizer_repo_id"] == os.path.abspath(tmp_path / "out" / "tokenizer")
    _check_tokenizer(config["tokenizer_repo_id"], monkeypatch)
    # Our loader still reads the folder.
    assert api.import_phrase_vae(tmp_path / "out").config == _vae().config
