"""Loading trained models: a training workdir (Orbax checkpoints + ``config.json``) or a
folder in the original's layout (``config.json`` + ``model.safetensors``, read by
``convert.api``).

``load_ldm`` / ``read_ldm_config`` for the PhraseLDM, ``load_vae`` for the PhraseVAE (what
``vae_inference.PhraseVAEModel.from_workdir`` builds on). A workdir's ``which`` checkpoint is
loaded, or the other one when it has none (a run without evaluation has no best checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from phraseldm_jax import checkpointing, decoding
from phraseldm_jax import vae as vae_lib
from phraseldm_jax.convert import api, ldm_weights
from phraseldm_jax.ldm import PhraseLDMConfig


@dataclasses.dataclass(frozen=True)
class LoadedLDM:
    """A PhraseLDM ready to sample: config, params and where it came from.

    format: "orbax" (a ``train_ldm.py`` workdir) or "original" (config.json +
    model.safetensors). vae_workdir: the PhraseVAE the workdir names ("" if none).
    default_clip: "scaled" for our models, "reference" for the original's weights (trained
    and sampled with the raw clip value in scaled space).
    """

    config: PhraseLDMConfig
    params: Any
    format: str
    vae_workdir: str
    default_clip: str


@dataclasses.dataclass(frozen=True)
class LoadedVAE:
    """A stage-3 PhraseVAE's config and params; ``max_length`` is its training
    ``data.max_length`` (the default for an original folder); ``source`` names the files."""

    config: vae_lib.PhraseVAEConfig
    params: Any
    max_length: int
    source: str


def read_json(path: str) -> dict:
    """A JSON file as a dict; a missing file or bad JSON is an error that names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None


def load_checkpoint_params(workdir: str, which: str = "best") -> tuple[Any, str]:
    """(params, the checkpoint actually loaded): ``which``, else the other one."""
    try:
        return checkpointing.load_params(workdir, which), which
    except FileNotFoundError:
        other = "latest" if which == "best" else "best"
        return checkpointing.load_params(workdir, other), other


# ------------------------------------------------------------------------------------------
# PhraseLDM.


def _checkpoint_format(path: str) -> str:
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "orbax"
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return "original"
    raise FileNotFoundError(
        f"{path} is neither an LDM training workdir (no checkpoints/ folder) nor an original "
        "PhraseLDM folder (no model.safetensors)"
    )


def read_ldm_config(path: str) -> PhraseLDMConfig:
    """The model config of a checkpoint folder, without loading weights (cheap)."""
    fmt = _checkpoint_format(path)
    config = read_json(os.path.join(path, "config.json"))
    if fmt == "original":
        return ldm_weights.ldm_config_from_hf_config(config)
    model = config.get("model")
    if not isinstance(model, dict) or "dit" not in model:
        raise ValueError(f"{path}/config.json has no PhraseLDM 'model' group")
    if model.get("scale_factor", 0) <= 0 or model.get("clip_range", 0) <= 0:
        raise ValueError(f"{path}/config.json: model.scale_factor / clip_range not resolved")
    return PhraseLDMConfig(**model)


def load_ldm(path: str, which: str = "best") -> LoadedLDM:
    """Loads a PhraseLDM from a training workdir (the ``which`` checkpoint, else the other
    one) or from a folder in the original's layout."""
    fmt = _checkpoint_format(path)
    if fmt == "original":  # section ids in the order of its section_vocab.json, if any
        model = api.import_phrase_ldm(path)
        return LoadedLDM(model.config, model.params, fmt, "", "reference")
    config = read_ldm_config(path)
    params, _ = load_checkpoint_params(path, which)
    workdir_config = read_json(os.path.join(path, "config.json"))
    vae = workdir_config.get("vae", {}).get("workdir", "")
    clip = "reference" if workdir_config.get("converted_from") else "scaled"  # original weights
    return LoadedLDM(config, params, fmt, vae or "", clip)


# ------------------------------------------------------------------------------------------
# PhraseVAE.


def read_vae_workdir_config(workdir: str) -> dict:
    """``<workdir>/config.json`` (written by the trainer) of a PhraseVAE workdir, as a dict."""
    path = os.path.join(os.fspath(workdir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a PhraseVAE training workdir")
    config = read_json(path)
    if not isinstance(config.get("model"), dict) or "t5" not in config["model"]:
        raise ValueError(f"{path}: no PhraseVAE 'model' group with a 't5' entry")
    return config


def load_vae(path: str, which: str = "best") -> LoadedVAE:
    """Loads a PhraseVAE from a training workdir (the ``which`` checkpoint, else the other
    one) or from a folder in the original's layout."""
    if api.is_original_folder(path):
        model = api.import_phrase_vae(path)
        return LoadedVAE(model.config, model.params, decoding.DEFAULT_MAX_LENGTH, str(path))
    config = read_vae_workdir_config(path)
    params, loaded = load_checkpoint_params(path, which)
    max_length = int(config.get("data", {}).get("max_length", decoding.DEFAULT_MAX_LENGTH))
    source = f"checkpoint {checkpointing.checkpoint_dir(path, loaded)}"
    return LoadedVAE(vae_lib.PhraseVAEConfig(**config["model"]), params, max_length, source)
