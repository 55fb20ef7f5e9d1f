"""Folders in the original's Hugging Face layout (``PyTorchModelHubMixin``), both directions.

A folder holds ``config.json`` (the original class's constructor arguments, SPEC section 6) and
``model.safetensors``. We add, for section-conditioned PhraseLDMs only, ``section_vocab.json``:
the section id order the weights were trained with, as the original ``SecEncoder``'s own dicts
``{"sec_type_to_id": {"A": 3, ...}, "sec_len_to_id": {"8": 5, ...}}`` (in PyTorch, assign them
to ``model.sec_encoder``). It is a separate file, so the original's strict load is untouched.
A PhraseLDM that samples with another clip mode than the original's (ours: ``"scaled"``) or
masks padded sections records that in config.json's ``_phraseldm_jax`` group
(``ldm_weights.CONVENTIONS_KEY``), read back at import: the same seed gives the same song.

Section order. The original numbered section types and lengths in Python set order, which
changes per process, so a checkpoint's order is unknown unless recorded. Our parameters always
use ``sections.DEFAULT_SECTION_VOCAB``: at import the rows of the type and length embeddings
are permuted from the checkpoint's order into ours (row 0, the pad, stays), and at export back
into the requested order. Permuting rows is exact, so round trips are bitwise.

PhraseVAE's tied embedding is written once, under the alias ``safetensors.torch.save_model``
keeps (the first name in sorted order), with its metadata mapping the other aliases to it, as
the original's files are written; any alias is accepted on import.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from phraseldm_jax import fileio, sections
from phraseldm_jax import vae as vae_lib
from phraseldm_jax.convert import ldm_weights, safetensors_io, vae_weights
from phraseldm_jax.errors import CheckpointMismatchError
from phraseldm_jax.ldm import PhraseLDMConfig
from phraseldm_jax.vocab import PHRASE_VOCAB

CONFIG_JSON = "config.json"
WEIGHTS_FILE = "model.safetensors"
SECTION_VOCAB_JSON = "section_vocab.json"
DEFAULT_TOKENIZER_REPO_ID = "LongshenOu/phrase-vae-tokenizer"
TOKENIZER_DIR = "tokenizer"  # an exported PhraseVAE's tokenizer folder (save_pretrained layout)
# The original PhraseVAE's constructor arguments (its config.json keys).
VAE_CONFIG_KEYS = (
    "tokenizer_repo_id",
    "t5_config",
    "compress_style",
    "n_compress_tokens",
    "bottleneck_dim",
    "vocab_size",
)
# Hugging Face T5Config defaults for the fields PhraseVAE can change; written when they differ.
_HF_T5_DEFAULTS = {
    "d_kv": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
}
_KEPT_EMBEDDING_ALIAS = sorted(vae_weights.TIED_EMBEDDING_KEYS)[0]  # t5.decoder.embed_tokens


def is_original_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder with ``config.json`` and ``model.safetensors``."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, CONFIG_JSON)) and os.path.isfile(
        os.path.join(path, WEIGHTS_FILE)
    )


def read_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, tensors) of an original-layout folder."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    for name in (CONFIG_JSON, WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(
                f"{folder} is not a checkpoint in the original's layout: {name} is missing"
            )
    hf_config = fileio.read_json(os.path.join(folder, CONFIG_JSON))
    return hf_config, safetensors_io.read_safetensors(os.path.join(folder, WEIGHTS_FILE))


def _with_source(err: CheckpointMismatchError, source: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(source, err.missing, err.unexpected, err.shape_mismatches)


# --------------------------------------------------------------------------------------------
# PhraseVAE


def vae_from_original(
    hf_config: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    source: str,
    ignored_prefixes: tuple[str, ...] = (),
) -> tuple[vae_lib.PhraseVAEConfig, dict]:
    """(config, params) from the original PhraseVAE's config.json and state dict.

    Sizes come from the tensor shapes and must agree with ``t5_config``. ``source`` (a path)
    starts every error message."""
    unknown = sorted(k for k in hf_config if k not in VAE_CONFIG_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{source}: unknown PhraseVAE config keys {unknown}")
    t5_json = hf_config.get("t5_config") or {}
    vocab_size = hf_config.get("vocab_size")
    if vocab_size is not None and int(t5_json.get("vocab_size", vocab_size)) != int(vocab_size):
        raise ValueError(
            f"{source}: vocab_size={vocab_size} but t5_config.vocab_size={t5_json['vocab_size']}"
        )
    try:
        config = vae_weights.infer_vae_config(state_dict, hf_config)
        params = vae_weights.vae_params_from_state_dict(
            state_dict, config, ignored_prefixes=ignored_prefixes
        )
    except CheckpointMismatchError as err:
        raise _with_source(err, source) from None
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return config, params


def original_vae_config(
    config: vae_lib.PhraseVAEConfig,
    base: Mapping[str, Any] | None = None,
    tokenizer_repo_id: str | None = None,
) -> dict[str, Any]:
    """The original PhraseVAE's config.json for ``config``.

    ``base`` (the config.json a model was imported from) is kept where it agrees, so an
    imported folder exports the same file; sizes always come from ``config``.
    ``tokenizer_repo_id`` (a tokenizer folder) replaces the hub id when given."""
    c = config.t5
    t5_config = dict((base or {}).get("t5_config") or {})
    t5_config.update(
        d_model=c.d_model,
        d_ff=c.d_ff,
        num_layers=c.num_layers,
        num_heads=c.num_heads,
        vocab_size=c.vocab_size,
    )
    t5_config.setdefault("decoder_start_token_id", 1)
    if c.num_decoder_layers != c.num_layers or "num_decoder_layers" in t5_config:
        t5_config["num_decoder_layers"] = c.num_decoder_layers
    for name, default in _HF_T5_DEFAULTS.items():
        value = getattr(c, name)
        if value != default or name in t5_config:
            t5_config[name] = value
    return {
        "tokenizer_repo_id": tokenizer_repo_id
        or (base or {}).get("tokenizer_repo_id", DEFAULT_TOKENIZER_REPO_ID),
        "t5_config": t5_config,
        "compress_style": "first_n_tokens",
        "n_compress_tokens": config.n_query_tokens,
        "bottleneck_dim": config.latent_dim,
        "vocab_size": c.vocab_size,
    }


def vae_tensors_for_export(
    params: Mapping[str, Any], config: vae_lib.PhraseVAEConfig
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, safetensors metadata) of ``model.safetensors``: the tied embedding once, under
    the alias ``safetensors.torch.save_model`` keeps, and ``{dropped alias: kept}`` metadata."""
    if config.head != "vae":
        raise ValueError(
            f"only stage-3 PhraseVAEs (head 'vae') have the original's Hugging Face layout; "
            f"this model has head {config.head!r}"
        )
    prefix = "model."
    tensors = vae_weights.vae_state_dict_from_params(
        params, config, prefix=prefix, tied_embedding_keys=(_KEPT_EMBEDDING_ALIAS,)
    )
    metadata = {
        prefix + alias: prefix + _KEPT_EMBEDDING_ALIAS
        for alias in vae_weights.TIED_EMBEDDING_KEYS
        if alias != _KEPT_EMBEDDING_ALIAS
    }
    return tensors, metadata


def read_vae_folder(folder: str | os.PathLike) -> tuple[vae_lib.PhraseVAEConfig, dict, dict]:
    """(config, params, the original config.json) of an original PhraseVAE folder."""
    hf_config, tensors = read_folder(folder)
    config, params = vae_from_original(
        hf_config, tensors, os.path.join(os.fspath(folder), WEIGHTS_FILE)
    )
    return config, params, hf_config


def write_vae_folder(
    folder: str | os.PathLike,
    config: vae_lib.PhraseVAEConfig,
    params: Mapping[str, Any],
    base_config: Mapping[str, Any] | None = None,
    with_tokenizer: bool = False,
) -> None:
    """Writes an original PhraseVAE folder (each file atomically; config.json last).

    ``with_tokenizer`` also writes ``tokenizer/`` (``vocab.Vocabulary.save_pretrained``) and
    points ``tokenizer_repo_id`` at it (an absolute path), so that the original code loads
    the folder offline instead of asking the hub for its tokenizer."""
    folder = os.fspath(folder)
    tensors, metadata = vae_tensors_for_export(params, config)
    tokenizer_dir = os.path.abspath(os.path.join(folder, TOKENIZER_DIR))
    hf_config = original_vae_config(config, base_config, tokenizer_dir if with_tokenizer else None)
    os.makedirs(folder, exist_ok=True)
    if with_tokenizer:
        PHRASE_VOCAB.save_pretrained(tokenizer_dir)
    safetensors_io.write_safetensors(os.path.join(folder, WEIGHTS_FILE), tensors, metadata)
    fileio.write_json(os.path.join(folder, CONFIG_JSON), hf_config, sort_keys=False)


# --------------------------------------------------------------------------------------------
# Section vocabulary (the id order of a checkpoint's section embeddings)


def section_vocab_to_json(vocab: sections.SectionVocab) -> dict[str, dict[str, int]]:
    """``{"sec_type_to_id": ..., "sec_len_to_id": ...}``, the original SecEncoder's dicts."""
    return {
        "sec_type_to_id": dict(vocab.type_to_id),
        "sec_len_to_id": {str(k): int(v) for k, v in vocab.length_to_id.items()},
    }


def _order_from_ids(mapping: Any, what: str, source: str) -> list[str]:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{source}: {what} must be an object of name -> id")
    ids = sorted(int(v) for v in mapping.values())
    if ids != list(range(1, len(ids) + 1)):
        raise ValueError(f"{source}: {what} ids must be 1..{len(ids)} each once, got {ids}")
    return [str(name) for name, _ in sorted(mapping.items(), key=lambda item: int(item[1]))]


def section_vocab_from_json(value: Mapping[str, Any], source: str) -> sections.SectionVocab:
    """A SectionVocab from ``{"sec_type_to_id", "sec_len_to_id"}`` (the original's dicts) or
    ``{"type_order": "xXAEbiBcDoC", "length_order": [9, 1, 8, ...]}`` (ids 1, 2, ...)."""
    try:
        if "sec_type_to_id" in value or "sec_len_to_id" in value:
            types = _order_from_ids(value.get("sec_type_to_id"), "sec_type_to_id", source)
            lengths = _order_from_ids(value.get("sec_len_to_id"), "sec_len_to_id", source)
        elif "type_order" in value and "length_order" in value:
            types, lengths = list(value["type_order"]), list(value["length_order"])
        else:
            raise ValueError(
                f"{source}: expected keys sec_type_to_id and sec_len_to_id (or type_order "
                f"and length_order), got {sorted(value)}"
            )
        return sections.SectionVocab.from_orders(types, lengths)
    except sections.SectionPlanError as err:
        raise ValueError(f"{source}: {err}") from None


def resolve_section_vocab(section_order: Any) -> sections.SectionVocab | None:
    """``section_order`` as a SectionVocab: a SectionVocab, a dict as ``section_vocab_from_json``
    reads, a path to such a JSON file, or None."""
    if section_order is None or isinstance(section_order, sections.SectionVocab):
        return section_order
    if isinstance(section_order, Mapping):
        return section_vocab_from_json(section_order, "section_order")
    if isinstance(section_order, (str, os.PathLike)):
        path = os.fspath(section_order)
        return section_vocab_from_json(fileio.read_json(path), path)
    raise TypeError(
        "section_order must be a SectionVocab, a dict or a JSON file path, got "
        f"{type(section_order).__name__}"
    )


def permute_section_rows(
    params: Mapping[str, Any], src: sections.SectionVocab, dst: sections.SectionVocab
) -> dict:
    """Copy of LDM ``params`` whose section embedding rows move from ``src``'s ids to ``dst``'s
    (row 0, the pad, stays): the same strings then give the same vectors."""
    params = dict(params)
    if "sec_encoder" not in params or src == dst:
        return params
    encoder = dict(params["sec_encoder"])
    for name, src_ids, dst_ids in (
        ("type_embed", src.type_to_id, dst.type_to_id),
        ("len_embed", src.length_to_id, dst.length_to_id),
    ):
        table = np.asarray(encoder[name])
        moved = table.copy()
        for key, src_id in src_ids.items():
            moved[dst_ids[key]] = table[src_id]
        encoder[name] = moved
    params["sec_encoder"] = encoder
    return params


# --------------------------------------------------------------------------------------------
# PhraseLDM


def ldm_from_original(
    hf_config: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    source: str,
    section_vocab: sections.SectionVocab | None = None,
) -> tuple[PhraseLDMConfig, dict, sections.SectionVocab]:
    """(config, params in our section order, the checkpoint's section order).

    ``section_vocab``: the order the checkpoint's section embeddings use; None = ours (with a
    warning for section-conditioned models, whose training order cannot be known)."""
    try:
        config = ldm_weights.ldm_config_from_hf_config(hf_config)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: {err}") from None
    try:
        params = ldm_weights.ldm_params_from_state_dict(state_dict, config)
    except CheckpointMismatchError as err:
        raise _with_source(err, source) from None
    if section_vocab is None:
        if config.sec_control:
            warnings.warn(
                f"{source}: no section order given and no {SECTION_VOCAB_JSON}; assuming ours "
                "(types sorted, lengths 1..32). The original's order came from Python set "
                "iteration and is not stored in its checkpoints.",
                stacklevel=3,
            )
        section_vocab = sections.DEFAULT_SECTION_VOCAB
    params = permute_section_rows(params, section_vocab, sections.DEFAULT_SECTION_VOCAB)
    return config, params, section_vocab


def read_ldm_folder(
    folder: str | os.PathLike, section_order: Any = None
) -> tuple[PhraseLDMConfig, dict, sections.SectionVocab, str]:
    """(config, params, section order, clip mode) of an original PhraseLDM folder. The section
    order is ``section_order`` if given, else the folder's ``section_vocab.json``, else ours;
    the clip mode is what its config.json records (``ldm_weights.conventions_from_hf_config``:
    ``"reference"`` for the original's own folders)."""
    folder = os.fspath(folder)
    hf_config, tensors = read_folder(folder)
    vocab = resolve_section_vocab(section_order)
    vocab_path = os.path.join(folder, SECTION_VOCAB_JSON)
    if vocab is None and os.path.isfile(vocab_path):
        vocab = section_vocab_from_json(fileio.read_json(vocab_path), vocab_path)
    source = os.path.join(folder, CONFIG_JSON)
    try:
        clip = ldm_weights.conventions_from_hf_config(hf_config)["clip"]
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    config, params, vocab = ldm_from_original(
        hf_config, tensors, os.path.join(folder, WEIGHTS_FILE), vocab
    )
    return config, params, vocab, clip


def write_ldm_folder(
    folder: str | os.PathLike,
    config: PhraseLDMConfig,
    params: Mapping[str, Any],
    section_vocab: sections.SectionVocab = sections.DEFAULT_SECTION_VOCAB,
    clip: str = "reference",
) -> None:
    """Writes an original PhraseLDM folder from params in our section order; the section
    embeddings are stored in ``section_vocab``'s order, recorded in ``section_vocab.json``;
    ``clip``, the clip mode the model samples with, goes into config.json when it is not the
    original's (``ldm_weights.hf_config_from_ldm_config``)."""
    folder = os.fspath(folder)
    if config.sec_control and config.cross_bias_mode != "additive":
        warnings.warn(
            f"{folder}: this model masks padded sections (cross_bias_mode="
            f"{config.cross_bias_mode!r}); the original's code adds its float mask to the "
            "attention logits instead, so it will not reproduce this model's outputs exactly",
            stacklevel=3,
        )
    if config.prediction_type != "epsilon":
        warnings.warn(
            f"{folder}: this model predicts {config.prediction_type} (recorded in config.json's "
            f"{ldm_weights.CONVENTIONS_KEY} group); the original's code samples it only with "
            "its scheduler's prediction_type set to match",
            stacklevel=3,
        )
    params = permute_section_rows(params, sections.DEFAULT_SECTION_VOCAB, section_vocab)
    tensors = ldm_weights.ldm_state_dict_from_params(params, config)
    os.makedirs(folder, exist_ok=True)
    safetensors_io.write_safetensors(os.path.join(folder, WEIGHTS_FILE), tensors)
    vocab_path = os.path.join(folder, SECTION_VOCAB_JSON)
    if config.sec_control:
        fileio.write_json(vocab_path, section_vocab_to_json(section_vocab), sort_keys=False)
    elif os.path.exists(vocab_path):
        os.remove(vocab_path)  # left by an earlier export of another model
    fileio.write_json(
        os.path.join(folder, CONFIG_JSON),
        ldm_weights.hf_config_from_ldm_config(config, clip),
        sort_keys=False,
    )
