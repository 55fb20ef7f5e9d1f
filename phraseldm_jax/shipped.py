"""The models shipped inside the repository, and ``shipped.json``, what they need beside their
weights: find the default PhraseLDM and its PhraseVAE (``sample.py`` without ``--checkpoint``).

Layout (``configs/paths.pretrained_dir()``, default ``pretrained/pop909-small``)::

    README.md          the model card (written once from a template, then kept: ship.py)
    shipped.json       this module's manifest (below)
    vae/               PhraseVAE in the original's layout: config.json + model.safetensors,
                       tokenizer/ (the tokenizer, save_pretrained layout, for offline use)
    ldm_lencond/       length-conditioned PhraseLDM: config.json + model.safetensors
    ldm_seccond/       section-conditioned PhraseLDM (optional): also section_vocab.json

What the exported folders already carry (``convert.original_layout``): the model sizes, the
latent scale factor and raw clip range (config.json), the clip mode and section attention of a
model trained here (config.json's ``_phraseldm_jax`` group) and the section id order
(``section_vocab.json``), so an exported LDM samples what its workdir samples. ``shipped.json``
adds what an export drops:

- ``format`` / ``version``: ``FORMAT`` / ``VERSION``; ``name``: the folder's name.
- ``vae``: ``folder``, ``tokenizer`` (the tokenizer folder; config.json keeps the hub id, so
  no machine path is shipped), ``d_model``, ``latent_dim``, ``max_length`` (its training
  ``data.max_length``), ``training`` (below; ``data``: data_dir, dataset, train/eval/test
  split names).
- ``ldm``: ``{"lencond": ..., "seccond": ...}`` (seccond may be absent), each with ``folder``,
  ``vae`` (the VAE folder that decodes it), ``length_control`` / ``sec_control``,
  ``scale_factor`` / ``clip_range`` / ``clip`` / ``cross_bias_mode`` (repeated from its
  config.json for readers; the loader refuses a manifest that disagrees), ``section_vocab``
  (the file, or null), ``slot_order`` and ``reference_padding`` (the layout and [SEP] pad of its
  latent dataset, which editing, ``sample.py --from``, needs), ``max_bars``, ``training``
  (``data``: latent_dir, split names, augmentation) and ``latents`` (its latent dataset's
  stats.json: scale factor, p99.9, slot order, rows, the VAE workdir and checkpoint that
  encoded it; null when it was not readable at shipping).
- ``training`` (each model): ``workdir``, ``checkpoint`` (which, step, verified), ``steps``
  (the step shipped), ``num_steps`` (configured), ``batch_size``, ``seed``, ``best_metric``,
  ``dtype``, ``params``.
- ``files``: ``{path: {"bytes", "sha256"}}`` of every model file (not README.md and
  shipped.json): sizes are checked at each load (a Git LFS pointer or a cut file is named, not
  misread), ``verify`` checks the digests.
- ``notes``: what the export warned about; ``provenance``: ``commit`` (``git rev-parse HEAD``
  of the checkout that shipped, null without git), ``commit_dirty``, ``train_commit`` (given
  by hand), ``shipped_at``, ``command``.

``write_shipped`` (``shipping.py``, ``python -m phraseldm_jax.cli.ship``) writes the folder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from phraseldm_jax import fileio

MANIFEST = "shipped.json"
MODEL_CARD = "README.md"
FORMAT = "phraseldm-jax shipped models"
VERSION = 1
VAE_FOLDER = "vae"
TOKENIZER_FOLDER = "tokenizer"
LDM_FOLDERS = {"lencond": "ldm_lencond", "seccond": "ldm_seccond"}
LDM_KINDS = {"lencond": "length-conditioned", "seccond": "section-conditioned"}
# (length_control, sec_control) each kind may have; seccond as the original's, or with sections only
LDM_FLAGS = {"lencond": ((True, False),), "seccond": ((True, True), (False, True))}
# Fields of an LDM entry that repeat its config.json, for readers (checked at load).
CONFIG_FIELDS = ("scale_factor", "clip_range", "length_control", "sec_control")
CONVENTION_FIELDS = ("clip", "cross_bias_mode", "prediction_type")
ENV_HINT = "PHRASELDM_PRETRAINED"


class ShippedModelsError(Exception):
    """The shipped models are missing or do not read back: one line, for ``sample.py``."""


class NotShippedError(ShippedModelsError):
    """No shipped models there, or not the one asked for; ``has_manifest``: the folder has a
    shipped.json (others are shipped)."""

    def __init__(self, message: str, has_manifest: bool):
        super().__init__(message)
        self.has_manifest = has_manifest


@dataclasses.dataclass(frozen=True)
class ShippedLDM:
    """One shipped PhraseLDM: its folder, the VAE folder that decodes it and its editing
    conventions. ``name``: ``lencond`` or ``seccond``; ``manifest``: the whole shipped.json."""

    root: str
    name: str
    folder: str
    vae_folder: str
    slot_order: str
    reference_padding: bool
    manifest: Mapping[str, Any]

    def describe(self) -> str:
        return (
            f"the shipped {LDM_KINDS[self.name]} PhraseLDM {fileio.user_path(self.folder)} "
            f"(PhraseVAE {fileio.user_path(self.vae_folder)})"
        )

    def summary(self) -> dict:
        """summary.json's record: where, which, and the commit it was shipped from."""
        provenance = self.manifest.get("provenance") or {}
        return {
            "root": fileio.user_path(self.root),
            "ldm": self.name,
            "vae": fileio.user_path(self.vae_folder),
            "commit": provenance.get("commit"),
        }


def read_manifest(root: str | os.PathLike) -> dict:
    """The checked ``shipped.json`` of ``root``; ShippedModelsError when there is none or it is
    not one."""
    root = os.fspath(root)
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        what = "no such folder" if not os.path.isdir(root) else f"no {MANIFEST}"
        raise NotShippedError(f"no shipped models in {fileio.user_path(root)} ({what})", False)
    try:
        manifest = fileio.read_json(path)
    except (OSError, ValueError) as err:
        raise ShippedModelsError(str(err)) from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShippedModelsError(
            f"{path}: not a {FORMAT!r} manifest of version {VERSION} (format "
            f"{manifest.get('format')!r}, version {manifest.get('version')!r})"
        )
    if not isinstance(manifest.get("ldm"), Mapping) or not isinstance(manifest.get("vae"), Mapping):
        raise ShippedModelsError(f"{path}: needs a 'vae' and an 'ldm' group")
    return manifest


def check_files(root: str, manifest: Mapping[str, Any], prefix: str = "") -> None:
    """Every file the manifest lists under ``prefix`` exists with its size (not its sha256:
    ``verify`` reads them all)."""
    for name, record in sorted((manifest.get("files") or {}).items()):
        if not name.startswith(prefix):
            continue
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise ShippedModelsError(f"{fileio.user_path(path)} is missing ({MANIFEST} lists it)")
        size = os.path.getsize(path)
        if size != record.get("bytes"):
            raise ShippedModelsError(
                f"{fileio.user_path(path)} is {size} bytes, {MANIFEST} says {record.get('bytes')}"
                + (" (a Git LFS pointer? run git lfs pull)" if size < 1024 else "")
            )


def verify(root: str | os.PathLike) -> None:
    """Every listed file's size and sha256 (ShippedModelsError naming the first that differs)."""
    root = os.fspath(root)
    manifest = read_manifest(root)
    check_files(root, manifest)
    for name, record in sorted((manifest.get("files") or {}).items()):
        if fileio.file_sha256(os.path.join(root, name)) != record.get("sha256"):
            raise ShippedModelsError(f"{os.path.join(root, name)}: sha256 differs from {MANIFEST}")


def _check_config(root: str, entry: Mapping[str, Any], folder: str) -> None:
    """The entry's repeated fields equal what the LDM's config.json says."""
    from phraseldm_jax.convert import ldm_weights

    path = os.path.join(folder, "config.json")
    try:
        hf_config = fileio.read_json(path)
        conventions = ldm_weights.conventions_from_hf_config(hf_config)
    except (OSError, ValueError) as err:
        raise ShippedModelsError(f"{path}: {err}") from None
    for field in CONFIG_FIELDS:
        if field in entry and entry[field] != hf_config.get(field):
            raise ShippedModelsError(
                f"{os.path.join(root, MANIFEST)}: {field} {entry[field]!r} but "
                f"{path} says {hf_config.get(field)!r}"
            )
    for field in CONVENTION_FIELDS:
        if field in entry and entry[field] != conventions[field]:
            raise ShippedModelsError(
                f"{os.path.join(root, MANIFEST)}: {field} {entry[field]!r} but "
                f"{path} says {conventions[field]!r}"
            )


def shipped_ldm(root: str | os.PathLike, name: str) -> ShippedLDM:
    """The shipped LDM ``name`` (``lencond`` / ``seccond``) of ``root``, its files checked;
    ShippedModelsError when it is not shipped or does not read back."""
    root = os.fspath(root)
    manifest = read_manifest(root)
    entry = manifest["ldm"].get(name)
    if not isinstance(entry, Mapping):
        listed = ", ".join(sorted(manifest["ldm"])) or "none"
        raise NotShippedError(
            f"no shipped {LDM_KINDS.get(name, name)} PhraseLDM in {fileio.user_path(root)} "
            f"(it ships: {listed})",
            True,
        )
    folder = os.path.join(root, str(entry.get("folder", LDM_FOLDERS.get(name, name))))
    vae_name = str(entry.get("vae", manifest["vae"].get("folder", VAE_FOLDER)))
    vae_folder = os.path.join(root, vae_name)
    for path in (folder, vae_folder):
        if not os.path.isdir(path):
            raise ShippedModelsError(f"{fileio.user_path(path)}: no such folder ({MANIFEST})")
    for sub in (folder, vae_folder):
        check_files(root, manifest, os.path.relpath(sub, root) + "/")
    _check_config(root, entry, folder)
    return ShippedLDM(
        root=root,
        name=name,
        folder=folder,
        vae_folder=vae_folder,
        slot_order=str(entry.get("slot_order", "pitch_order")),
        reference_padding=bool(entry.get("reference_padding", False)),
        manifest=manifest,
    )


def default_ldm(root: str | os.PathLike, with_plan: bool) -> ShippedLDM:
    """The shipped LDM ``sample.py`` uses without ``--checkpoint``: the length-conditioned one,
    or with a section plan the section-conditioned one."""
    return shipped_ldm(root, "seccond" if with_plan else "lencond")


def ldm_of_folder(path: str | os.PathLike) -> ShippedLDM | None:
    """The ShippedLDM whose folder ``path`` is (``--checkpoint pretrained/pop909-small/
    ldm_seccond``: its VAE and conventions come from shipped.json), else None."""
    folder = os.path.abspath(os.fspath(path))
    root = os.path.dirname(folder)
    if not os.path.isfile(os.path.join(root, MANIFEST)):
        return None
    manifest = read_manifest(root)
    for name, entry in manifest["ldm"].items():
        if isinstance(entry, Mapping) and entry.get("folder") == os.path.basename(folder):
            return shipped_ldm(root, name)
    return None


def for_sampling(checkpoint: str | None, with_plan: bool, root: str) -> ShippedLDM | None:
    """What ``sample.py`` samples with: without ``checkpoint`` the default shipped LDM of
    ``root`` (``default_ldm``); a ``checkpoint`` that is a shipped LDM's folder, that one;
    another, None. ShippedModelsError says in one line what is missing and what to pass."""
    if checkpoint is not None:
        return ldm_of_folder(checkpoint)
    try:
        return default_ldm(root, with_plan)
    except NotShippedError as err:
        kind = "a section-conditioned PhraseLDM" if with_plan else "an LDM workdir or folder"
        hint = "" if err.has_manifest else f" or set {ENV_HINT} to a shipped-models folder"
        raise ShippedModelsError(
            f"no --checkpoint given and {err}: give --checkpoint ({kind}){hint}"
        ) from None
