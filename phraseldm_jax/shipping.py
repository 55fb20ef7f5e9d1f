"""Writing the shipped models' folder (layout and ``shipped.json``: ``shipped.py``) from
training workdirs; ``python -m phraseldm_jax.cli.ship`` is its command.

``write_shipped`` exports the PhraseVAE and each PhraseLDM (``convert.api``) into a new folder
beside ``out``, with the VAE's tokenizer, ``shipped.json`` and the model card, checks the total
size, and swaps the folder in (``fileio.replace_folder``): ``out`` then holds the old models or
the new ones, never a mix, and a refused folder (too large) leaves ``out`` as it was. An LDM
whose training names another PhraseVAE than the one shipped (its config.json's
``vae.workdir``, its latent dataset's ``stats.json`` workdir or checkpoint) is refused unless
``allow_vae_mismatch``: it would decode with a VAE whose latents it never saw.

The model card (``README.md``) is written from a template the first time; after that the
folder's own README.md is kept (the trained numbers are written by hand), unless ``readme``
names a file to use.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from phraseldm_jax import checkpointing, fileio, shipped
from phraseldm_jax.convert import api
from phraseldm_jax.trees import param_count
from phraseldm_jax.vocab import PHRASE_VOCAB

DEFAULT_MAX_MB = 25.0  # MB = 10**6 bytes
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1e6


class ShipError(ValueError):
    """Why the shipped folder is not written (one line)."""


def git_commit(repo: str = REPO_ROOT) -> dict:
    """``{"commit": HEAD, "dirty": tracked files changed}`` of ``repo``; None values when git
    or the repository is not there."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", repo, *args], capture_output=True, text=True, timeout=30, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _realpath(path: str) -> str:
    return os.path.realpath(fileio.user_path(path))


def _checkpoint(used: checkpointing.CheckpointUsed) -> dict:
    return {"which": used.which_used, "step": used.step, "verified": used.verified}


def _training(workdir: str, config: Mapping, used, n_params: int) -> dict:
    """Provenance of one model: where, which checkpoint, the configured run."""
    train, data, model = (config.get(k) or {} for k in ("train", "data", "model"))
    dtype = (model.get("dit") or model.get("t5") or {}).get("dtype", "float32")
    record = {
        "workdir": fileio.user_path(workdir),
        "checkpoint": _checkpoint(used),
        "steps": used.step,
        "num_steps": train.get("num_steps"),
        "batch_size": data.get("batch_size"),
        "seed": train.get("seed"),
        "best_metric": train.get("best_metric"),
        "dtype": dtype,
        "params": n_params,
    }
    if config.get(api.CONVERTED_FROM):
        record["converted_from"] = config[api.CONVERTED_FROM].get("source")
    return record


def _latent_stats(config: Mapping) -> dict | None:
    """The LDM's latent dataset ``stats.json`` (None when it is not readable here)."""
    latent_dir = str((config.get("data") or {}).get("latent_dir") or "")
    path = os.path.join(latent_dir, "stats.json")
    if not latent_dir or not os.path.isfile(path):
        return None
    try:
        return fileio.read_json(path)
    except (OSError, ValueError):
        return None


LATENT_FIELDS = ("scale_factor", "abs_p999", "slot_order", "train_rows", "max_bars",
                 "n_excluded", "data_dir", "vae_workdir", "vae_source")  # fmt: skip


LDM_DATA_FIELDS = ("latent_dir", "train_split", "eval_split", "augmentation",
                   "exclude_unfit_plans")  # fmt: skip


def _vae_mismatch(name: str, config: Mapping, stats: Mapping | None, vae_workdir: str, used):
    """Why the LDM ``name`` was not trained on this VAE's latents, or None."""
    want = _realpath(vae_workdir)
    named = str((config.get("vae") or {}).get("workdir") or "")
    if named and _realpath(named) != want:
        return f"{name} was trained with the PhraseVAE {named}, not {vae_workdir}"
    stats = stats or {}
    if stats.get("vae_workdir") and _realpath(stats["vae_workdir"]) != want:
        return f"{name}'s latents were encoded by {stats['vae_workdir']}, not {vae_workdir}"
    source = str(stats.get("vae_source") or "")
    if source.startswith("checkpoint "):
        encoded = source[len("checkpoint ") :]
        if _realpath(encoded) != os.path.join(want, used.path):
            return (
                f"{name}'s latents were encoded by the checkpoint {encoded}, but the PhraseVAE "
                f"shipped is {used.label} of {vae_workdir}"
            )
    return None


def _files(folder: str) -> dict:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``folder``."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            files[relative] = {"bytes": os.path.getsize(path), "sha256": fileio.file_sha256(path)}
    return dict(sorted(files.items()))


def folder_bytes(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(parent, name))
        for parent, _, names in os.walk(folder)
        for name in names
    )


def _by_model(folder: str) -> str:
    parts = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            parts.append(f"{name}/ {folder_bytes(path) / MB:.1f} MB")
    return ", ".join(parts)


def _check_out(out: str, overwrite: bool) -> None:
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise ShipError(f"{out} exists and is not a folder")
    if not os.listdir(out):
        return
    if not os.path.isfile(os.path.join(out, shipped.MANIFEST)):
        raise ShipError(f"{out} holds other files (no {shipped.MANIFEST}); refusing to replace it")
    if not overwrite:
        raise ShipError(f"{out} already holds shipped models (pass --overwrite)")


def _load_ldm(name: str, workdir: str, which: str):
    model = api.load_workdir(workdir, which=which)
    if not isinstance(model, api.LoadedPhraseLDM):
        raise ShipError(f"{workdir} holds a PhraseVAE, not a {shipped.LDM_KINDS[name]} PhraseLDM")
    flags = (model.config.length_control, model.config.sec_control)
    if flags not in shipped.LDM_FLAGS[name]:
        raise ShipError(
            f"{workdir} is not a {shipped.LDM_KINDS[name]} PhraseLDM (length_control="
            f"{flags[0]}, sec_control={flags[1]})"
        )
    return model


def _ldm_entry(name: str, model, config: Mapping, stats: Mapping | None, vae_folder: str):
    cfg = model.config
    data = config.get("data") or {}
    slot_order = str((stats or {}).get("slot_order") or "pitch_order")
    return {
        "folder": shipped.LDM_FOLDERS[name],
        "vae": vae_folder,
        "length_control": cfg.length_control,
        "sec_control": cfg.sec_control,
        "scale_factor": cfg.scale_factor,
        "clip_range": cfg.clip_range,
        "clip": model.clip,
        "cross_bias_mode": cfg.cross_bias_mode,
        "prediction_type": cfg.prediction_type,
        "section_vocab": "section_vocab.json" if cfg.sec_control else None,
        "slot_order": slot_order,
        "reference_padding": bool(data.get("reference_padding", False)),
        "max_bars": cfg.dit.sample_size // 4,
        "training": {
            **_training(model.source, config, model.checkpoint, param_count(model.params)),
            "data": {k: data.get(k) for k in LDM_DATA_FIELDS},
        },
        "latents": None if stats is None else {k: stats.get(k) for k in LATENT_FIELDS},
    }


def _vae_entry(model, config: Mapping) -> dict:
    data, evaluation = config.get("data") or {}, config.get("eval") or {}
    c = model.config
    return {
        "folder": shipped.VAE_FOLDER,
        "tokenizer": f"{shipped.VAE_FOLDER}/{shipped.TOKENIZER_FOLDER}",
        "d_model": c.t5.d_model,
        "latent_dim": c.latent_dim,
        "max_length": int(data.get("max_length", 128)),
        "training": {
            **_training(model.source, config, model.checkpoint, param_count(model.params)),
            "data": {
                "data_dir": data.get("data_dir"),
                "dataset": data.get("dataset"),
                "train_split": data.get("train_split"),
                "eval_split": evaluation.get("split"),
                "test_split": evaluation.get("test_split"),
            },
        },
    }


def write_shipped(
    out: str,
    vae_workdir: str,
    ldm_workdirs: Mapping[str, str],
    *,
    which: str = "best",
    vae_which: str | None = None,
    max_mb: float = DEFAULT_MAX_MB,
    overwrite: bool = False,
    allow_vae_mismatch: bool = False,
    train_commit: str | None = None,
    readme: str | None = None,
    command: Sequence[str] = (),
    log: Callable[[str], Any] = print,
) -> dict:
    """Writes ``out`` (module docstring) and returns its manifest. ``ldm_workdirs``:
    ``{"lencond": workdir, "seccond": workdir}`` (lencond required); ``which`` picks the LDMs'
    checkpoints, ``vae_which`` the PhraseVAE's (None: ``which``). Raises ShipError."""
    out = fileio.user_path(out)
    if "lencond" not in ldm_workdirs or set(ldm_workdirs) - set(shipped.LDM_FOLDERS):
        raise ShipError(f"ldm_workdirs needs 'lencond' (and may have 'seccond'): {ldm_workdirs}")
    _check_out(out, overwrite)
    readme_text = None
    if readme is not None:
        with open(readme, encoding="utf-8") as f:
            readme_text = f.read()
    elif os.path.isfile(os.path.join(out, shipped.MODEL_CARD)):
        with open(os.path.join(out, shipped.MODEL_CARD), encoding="utf-8") as f:
            readme_text = f.read()
        log(f"keeping the model card {os.path.join(out, shipped.MODEL_CARD)}")
    vae = api.load_workdir(vae_workdir, which=vae_which or which)
    if not isinstance(vae, api.LoadedPhraseVAE):
        raise ShipError(f"{vae_workdir} holds a PhraseLDM, not a PhraseVAE")
    if vae.config.head != "vae":
        raise ShipError(f"{vae_workdir} is a stage with head {vae.config.head!r}, not stage 3")
    vae_config = checkpointing.read_workdir_config(vae_workdir)
    entries, models = {}, {}
    for name in ("lencond", "seccond"):
        if name not in ldm_workdirs:
            continue
        workdir = ldm_workdirs[name]
        model = _load_ldm(name, workdir, which)
        config = checkpointing.read_workdir_config(workdir)
        stats = _latent_stats(config)
        mismatch = _vae_mismatch(name, config, stats, vae_workdir, vae.checkpoint)
        if mismatch and not allow_vae_mismatch:
            raise ShipError(f"{mismatch} (pass --allow_vae_mismatch to ship it anyway)")
        if mismatch:
            log(f"warning: {mismatch}")
        if stats is None:
            log(f"warning: {workdir}: its latent dataset's stats.json is not readable here; "
                "recording slot_order pitch_order")  # fmt: skip
        entries[name] = _ldm_entry(name, model, config, stats, shipped.VAE_FOLDER)
        models[name] = model
    code = git_commit()
    manifest = {
        "format": shipped.FORMAT,
        "version": shipped.VERSION,
        "name": os.path.basename(out),
        "vae": _vae_entry(vae, vae_config),
        "ldm": entries,
        "notes": [],
        "provenance": {
            "commit": code["commit"],
            "commit_dirty": code["dirty"],
            "train_commit": train_commit,
            "shipped_at": datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds"),
            "command": list(command),
        },
    }

    def build(tmp: str) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            api.export_phrase_vae(vae, os.path.join(tmp, shipped.VAE_FOLDER))
            PHRASE_VOCAB.save_pretrained(
                os.path.join(tmp, shipped.VAE_FOLDER, shipped.TOKENIZER_FOLDER)
            )
            for name, model in models.items():
                api.export_phrase_ldm(model, os.path.join(tmp, shipped.LDM_FOLDERS[name]))
        manifest["notes"] = sorted({str(w.message).replace(tmp + os.sep, "") for w in caught})
        manifest["files"] = _files(tmp)
        fileio.write_json(os.path.join(tmp, shipped.MANIFEST), manifest, sort_keys=False)
        card = readme_text if readme_text is not None else model_card(manifest)
        fileio.write_text(os.path.join(tmp, shipped.MODEL_CARD), card)
        total = folder_bytes(tmp)
        if total > max_mb * MB:
            raise ShipError(
                f"the shipped models take {total / MB:.1f} MB, over the {max_mb:g} MB limit "
                f"({_by_model(tmp)}); nothing written"
            )
        manifest["total_bytes"] = total

    fileio.replace_folder(out, build)
    for note in manifest["notes"]:
        log(f"note: {note}")
    vae_training = manifest["vae"]["training"]
    log(f"PhraseVAE {vae_training['checkpoint']['which']}/{vae_training['steps']} of "
        f"{vae_workdir} -> {shipped.VAE_FOLDER}/")  # fmt: skip
    for name, entry in entries.items():
        training = entry["training"]
        log(f"{shipped.LDM_KINDS[name]} PhraseLDM {training['checkpoint']['which']}/"
            f"{training['steps']} of {ldm_workdirs[name]} -> {entry['folder']}/")  # fmt: skip
    log(f"wrote {out}: {manifest['total_bytes'] / MB:.1f} MB ({_by_model(out)})")
    return manifest


def model_card(manifest: Mapping[str, Any]) -> str:
    """A README.md template from the manifest: what is there and how it was trained; the
    results table is left for the numbers of the trained models."""
    vae, ldms, provenance = manifest["vae"], manifest["ldm"], manifest["provenance"]
    rows = [
        f"| `{vae['folder']}/` | PhraseVAE (stage 3, d_model {vae['d_model']}, latent "
        f"{vae['latent_dim']}) | {vae['training']['params']:,} | {vae['training']['steps']} "
        f"({vae['training']['checkpoint']['which']}) |"
    ]
    for name, entry in ldms.items():
        rows.append(
            f"| `{entry['folder']}/` | PhraseLDM, {shipped.LDM_KINDS[name]}, up to "
            f"{entry['max_bars']} bars (scale factor {entry['scale_factor']:.4f}, clip "
            f"{entry['clip']}) | {entry['training']['params']:,} | {entry['training']['steps']} "
            f"({entry['training']['checkpoint']['which']}) |"
        )
    data = vae["training"]["data"]
    corpus = f"`{data['data_dir']}`" if data["data_dir"] else "the synthetic corpus"
    bars = min([64, *(e["max_bars"] for e in ldms.values())])
    usage = [f"python sample.py --out songs/ --num_songs 4 --bars {bars}"]
    if "seccond" in ldms:
        usage.append('python sample.py --out songs/ --plan "i-4 A-8 B-8 A-8 o-4"')
    lines = [
        f"# {manifest['name']}: PhraseVAE + PhraseLDM trained on POP909",
        "",
        "The models `sample.py` uses when no `--checkpoint` is given. Each folder is in the",
        "original's Hugging Face layout (config.json + model.safetensors); `shipped.json` says",
        "which VAE decodes each LDM, the editing conventions, every file's sha256 and where the",
        "models come from.",
        "",
        "| folder | model | parameters | steps (checkpoint) |",
        "|---|---|---|---|",
        *rows,
        "",
        "## Use",
        "",
        "```bash",
        *usage,
        "```",
        "",
        "## Training data",
        "",
        f"PhraseVAE: `{data['dataset']}` of {corpus}, "
        f"split `{data['train_split']}` (evaluated on `{data['eval_split']}`, tested on "
        f"`{data['test_split']}`).",
        *(
            f"PhraseLDM {name}: latents `{e['training']['data']['latent_dir']}`, split "
            f"`{e['training']['data']['train_split']}` (validation `"
            f"{e['training']['data']['eval_split']}`), slot order {e['slot_order']}."
            for name, e in ldms.items()
        ),
        "",
        "## Results",
        "",
        "<!-- To be filled in with the trained models' numbers (docs/LDM_RESULTS.md). -->",
        "",
        "| model | measure | value |",
        "|---|---|---|",
        "| | | |",
        "",
        "## Provenance",
        "",
        f"Shipped {provenance['shipped_at']} from commit `{provenance['commit']}`"
        + (" (with uncommitted changes)" if provenance.get("commit_dirty") else "")
        + (f", trained at `{provenance['train_commit']}`" if provenance.get("train_commit") else "")
        + "; the workdirs, checkpoints and configured runs are in `shipped.json`.",
        *(f"Note: {note}" for note in manifest.get("notes", [])),
        "",
    ]
    return "\n".join(lines)
