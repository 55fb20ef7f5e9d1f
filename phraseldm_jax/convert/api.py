"""Public converter API: import the original's PyTorch checkpoints, run them, export them back,
and save them as our training workdirs.

    vae = import_phrase_vae("phrase-vae/")                  # folder (config.json +
    ldm = import_phrase_ldm("phrase-ldm-seccond/")          #   model.safetensors) or .ckpt
    mean, logvar = vae.encode(input_ids, attention_mask)
    eps = ldm.predict_noise(x, t, n_bars=[64], sections=["i-8 A-8 B-8"])
    export_phrase_ldm(ldm, "out/")                          # the original's layout again
    save_workdir(ldm, "runs/ldm_seccond_converted")         # for sample.py / load_params

Imported models keep the original's semantics: PhraseLDMs get ``cross_bias_mode="additive"``
(the +1 logit bias of real sections, pads unmasked) and frozen encoders. Section ids: the
params always use ``sections.DEFAULT_SECTION_VOCAB``; the checkpoint's own order (argument,
``section_vocab.json``, or ours by default) is applied at import and export (see
``original_layout``). Import and export of the same order are exact (bitwise).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from phraseldm_jax import conditioning, decoding
from phraseldm_jax import ldm as ldm_lib
from phraseldm_jax import sections as sections_lib
from phraseldm_jax import vae as vae_lib
from phraseldm_jax.convert import lightning, original_layout
from phraseldm_jax.ldm import PhraseLDM, PhraseLDMConfig

CONVERTED_FROM = "converted_from"  # config.json group of a converted workdir


def _host_tree(params: Any) -> dict:
    """Params as float32 numpy arrays (a nested dict); exact for float32 input."""
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    return jax.tree.map(lambda a: np.asarray(a, np.float32), dict(params))


@functools.partial(jax.jit, static_argnames=("config", "method"))
def _vae_apply(params, config: vae_lib.PhraseVAEConfig, *args, method: str):
    model = vae_lib.PhraseVAE(config)
    return model.apply({"params": params}, *args, method=getattr(vae_lib.PhraseVAE, method))


@functools.partial(jax.jit, static_argnames=("config",))
def _ldm_apply(params, config: PhraseLDMConfig, x, t, n_bars, section_ids):
    return PhraseLDM(config).apply({"params": params}, x, t, n_bars, section_ids)


def _int_array(value: Any, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != ndim or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(
            f"{name} must be a {ndim}-d integer array, got {array.dtype} {array.shape}"
        )
    return array.astype(np.int32)


class LoadedPhraseVAE:
    """A PhraseVAE with its config and params (float32 numpy), ready to run or save.

    ``original_config``: the original config.json it came from (kept for export), or None."""

    def __init__(
        self,
        config: vae_lib.PhraseVAEConfig,
        params: Any,
        *,
        source: str = "",
        original_config: Mapping[str, Any] | None = None,
    ):
        self.config = config
        self.params = _host_tree(params)
        self.source = source
        self.original_config = dict(original_config) if original_config else None
        self.checkpoint = None  # the CheckpointUsed of a model read from a workdir

    @functools.cached_property
    def _device_params(self):
        return jax.device_put(self.params)

    def _ids(self, ids: Any, name: str) -> np.ndarray:
        ids = _int_array(ids, name, 2)
        bad = ids[(ids < 0) | (ids >= self.config.t5.vocab_size)]
        if bad.size:
            raise ValueError(f"{name}: token ids outside 0..{self.config.t5.vocab_size - 1}")
        return ids

    def encode(self, input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
        """Posterior (mean, logvar), each [batch, latent_dim] float32, of encoder inputs
        ``[C0] [C1] [C2] [C3] [BOS] phrase [EOS] [PAD]...`` (input_ids, attention_mask:
        [batch, length] int; mask 1 = real token)."""
        ids = self._ids(input_ids, "input_ids")
        mask = _int_array(attention_mask, "attention_mask", 2)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {mask.shape} must match input_ids {ids.shape}")
        mean, logvar = _vae_apply(self._device_params, self.config, ids, mask, method="encode")
        return np.asarray(mean), np.asarray(logvar)

    def decode_logits(self, latent: Any, decoder_input_ids: Any) -> np.ndarray:
        """Teacher-forced logits [batch, length, vocab] float32 of latents [batch, latent_dim]
        (decoder_input_ids: [batch, length], ``[BOS]`` + target[:-1])."""
        latent = np.asarray(latent, np.float32)
        if latent.ndim != 2 or latent.shape[1] != self.config.latent_dim:
            raise ValueError(
                f"latent must be [batch, {self.config.latent_dim}], got {latent.shape}"
            )
        ids = self._ids(decoder_input_ids, "decoder_input_ids")
        if ids.shape[0] != latent.shape[0]:
            raise ValueError(f"{latent.shape[0]} latents but {ids.shape[0]} decoder rows")
        logits = _vae_apply(self._device_params, self.config, latent, ids, method="decode_logits")
        return np.asarray(logits)

    def greedy_decode(
        self,
        latents: Any,
        *,
        max_length: int = decoding.DEFAULT_MAX_LENGTH,
        dtype: str | None = None,
    ) -> np.ndarray:
        """Greedy token ids int32 [N, max_length] (``[BOS]`` ... ``[EOS]`` ``[PAD]``...) of
        latents [N, latent_dim], as Hugging Face ``generate(do_sample=False)``.

        ``dtype``: the decoder's matmul dtype; None = the model's (float32). "bfloat16" is
        faster on CPUs with AMX but changes tokens where two logits nearly tie, so it is not
        the default. The cache buffers are kept between calls (faster repeated decodes)."""
        return decoding.greedy_decode(
            self._device_params, self.config, latents, max_length=max_length,
            compute_dtype=dtype, buffers=self._buffers,
        )  # fmt: skip

    @functools.cached_property
    def _buffers(self) -> decoding.CacheBuffers:
        return decoding.CacheBuffers()


class LoadedPhraseLDM:
    """A PhraseLDM with its config and params (float32 numpy, section rows in our order).

    ``section_vocab``: the checkpoint's section order, used again by ``export_phrase_ldm``.
    ``clip``: the x0 clip mode it samples with (``sampler.model_space_clip``): ``"reference"``
    for the original's weights, ``"scaled"`` for ours; export writes it, import reads it."""

    def __init__(
        self,
        config: PhraseLDMConfig,
        params: Any,
        *,
        section_vocab: sections_lib.SectionVocab = sections_lib.DEFAULT_SECTION_VOCAB,
        source: str = "",
        clip: str = "reference",
    ):
        self.config = config
        self.params = _host_tree(params)
        self.section_vocab = section_vocab
        self.source = source
        self.clip = clip
        self.checkpoint = None  # the CheckpointUsed of a model read from a workdir

    @functools.cached_property
    def _device_params(self):
        return jax.device_put(self.params)

    def section_ids(
        self, plans: Sequence[str | sections_lib.SectionPlan]
    ) -> tuple[np.ndarray, ...]:
        """(type_ids, length_ids), each [batch, 30] int32, of plan strings such as
        ``"i-8 A-8 B-8"`` (or POP909's ``"i8A8B8"``), in the ids these params use."""
        return conditioning.section_ids_from_plans(
            plans, sections_lib.DEFAULT_SECTION_VOCAB, self.config.max_sections
        )

    def predict_noise(
        self,
        x: Any,
        t: Any,
        n_bars: Any = None,
        sections: Any = None,
        *,
        dtype: str = ldm_lib.INFERENCE_DIT_DTYPE,
    ) -> np.ndarray:
        """Predicted noise [batch, length, 64] float32.

        Args:
          x: [batch, length, in_channels] noisy scaled latents (length 512 for whole songs).
          t: [batch] int timesteps (or one int for all).
          n_bars: [batch] ints (length-conditioned models only, else None).
          sections: plan strings, one per row, or (type_ids, length_ids) [batch, <= 30] int
            arrays in ``DEFAULT_SECTION_VOCAB`` ids (section-conditioned models only).
          dtype: the DiT's matmul dtype. Default "bfloat16" (float32 weights, norms, softmax
            and output): about 2x faster on CPUs with AMX, PhraseFID as float32's
            (docs/BENCHMARKS.md); "float32" for the original's numbers to float32 round-off.
        """
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        cfg = ldm_lib.with_compute_dtype(self.config, dtype)
        x = np.asarray(x, np.float32)
        if x.ndim != 3 or x.shape[2] != cfg.dit.in_channels:
            raise ValueError(f"x must be [batch, length, {cfg.dit.in_channels}], got {x.shape}")
        batch = x.shape[0]
        t = np.broadcast_to(np.asarray(t), (batch,))
        t = _int_array(t, "t", 1)
        if np.any((t < 0) | (t >= cfg.diffusion_steps)):
            raise ValueError(f"t must be in 0..{cfg.diffusion_steps - 1}, got {t.tolist()}")
        if (n_bars is None) == cfg.length_control:
            raise ValueError(
                f"n_bars {'is required' if cfg.length_control else 'must be None'}: the model "
                f"{'is' if cfg.length_control else 'is not'} length-conditioned"
            )
        if (sections is None) == cfg.sec_control:
            raise ValueError(
                f"sections {'are required' if cfg.sec_control else 'must be None'}: the model "
                f"{'is' if cfg.sec_control else 'is not'} section-conditioned"
            )
        if n_bars is not None:
            n_bars = _int_array(np.broadcast_to(np.asarray(n_bars), (batch,)), "n_bars", 1)
            conditioning.check_n_bars(n_bars, cfg.length_bucket_size, cfg.num_length_buckets)
        if sections is not None:
            sections = self._section_arrays(sections, batch)
        eps = _ldm_apply(self._device_params, cfg, x, t, n_bars, sections)
        return np.asarray(eps)

    def _section_arrays(self, value: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(value, str):
            raise ValueError("sections must be one plan string per row (a list), not one string")
        if len(value) and all(isinstance(v, (str, sections_lib.SectionPlan)) for v in value):
            type_ids, length_ids = self.section_ids(value)
        elif len(value) == 2:
            type_ids = _int_array(value[0], "section type_ids", 2)
            length_ids = _int_array(value[1], "section length_ids", 2)
        else:
            raise ValueError("sections must be plan strings or (type_ids, length_ids)")
        conditioning.check_section_ids(type_ids, length_ids, max_sections=self.config.max_sections)
        if type_ids.shape[0] != batch:
            raise ValueError(f"{type_ids.shape[0]} section plans for a batch of {batch}")
        return type_ids, length_ids


Loaded = LoadedPhraseVAE | LoadedPhraseLDM


# --------------------------------------------------------------------------------------------
# The original's files -> ours


def _checkpoint_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.basename(path) == original_layout.WEIGHTS_FILE:
        return os.path.dirname(path) or "."
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint (folder or .ckpt file)")
    return path


def import_phrase_vae(path: str | os.PathLike, *, trust_pickle: bool = False) -> LoadedPhraseVAE:
    """A PhraseVAE from an original folder (config.json + model.safetensors) or a Lightning
    ``.ckpt`` of any training stage (stages 1-2 give heads ``full_sequence`` / ``query``).

    ``trust_pickle``: allow ``torch.load(weights_only=False)`` for old ``.ckpt`` files (runs
    code from the file). Raises CheckpointMismatchError listing what does not fit."""
    path = _checkpoint_path(path)
    if os.path.isdir(path):
        config, params, hf_config = original_layout.read_vae_folder(path)
    else:
        state_dict, hparams = lightning.read_lightning_checkpoint(path, trust_pickle=trust_pickle)
        config, params, hf_config = lightning.vae_from_lightning(state_dict, hparams, path)
    return LoadedPhraseVAE(config, params, source=os.path.abspath(path), original_config=hf_config)


def import_phrase_ldm(
    path: str | os.PathLike, *, section_order: Any = None, trust_pickle: bool = False
) -> LoadedPhraseLDM:
    """A PhraseLDM (any of the three variants) from an original folder or a Lightning ``.ckpt``.

    ``section_order``: the order the checkpoint's section embeddings use: a SectionVocab, a
    dict ``{"sec_type_to_id": ..., "sec_len_to_id": ...}`` or a path to such a JSON file.
    Default: the folder's ``section_vocab.json``, else ours (with a warning). The clip mode
    is the folder's (``LoadedPhraseLDM.clip``)."""
    path = _checkpoint_path(path)
    if os.path.isdir(path):
        config, params, vocab, clip = original_layout.read_ldm_folder(path, section_order)
    else:
        state_dict, hparams = lightning.read_lightning_checkpoint(path, trust_pickle=trust_pickle)
        vocab = original_layout.resolve_section_vocab(section_order)
        config, params, vocab = lightning.ldm_from_lightning(state_dict, hparams, path, vocab)
        clip = "reference"  # the original's training checkpoints
    return LoadedPhraseLDM(
        config, params, section_vocab=vocab, source=os.path.abspath(path), clip=clip
    )


def export_phrase_vae(
    model: LoadedPhraseVAE, path: str | os.PathLike, *, with_tokenizer: bool = False
) -> None:
    """Writes ``model`` as an original PhraseVAE folder (stage-3 models only); with
    ``with_tokenizer`` also its tokenizer folder, named in config.json (offline use)."""
    original_layout.write_vae_folder(
        path,
        model.config,
        model.params,
        getattr(model, "original_config", None),
        with_tokenizer=with_tokenizer,
    )


def export_phrase_ldm(
    model: LoadedPhraseLDM, path: str | os.PathLike, *, section_order: Any = None
) -> None:
    """Writes ``model`` as an original PhraseLDM folder; section embeddings in
    ``section_order`` (default: the order it was imported with), recorded in
    ``section_vocab.json``; the model's clip mode goes into config.json when it is not the
    original's."""
    vocab = original_layout.resolve_section_vocab(section_order)
    if vocab is None:
        vocab = getattr(model, "section_vocab", sections_lib.DEFAULT_SECTION_VOCAB)
    clip = getattr(model, "clip", "reference")
    original_layout.write_ldm_folder(path, model.config, model.params, vocab, clip)


def is_original_folder(path: str | os.PathLike) -> bool:
    """True for a folder in the original's layout (config.json + model.safetensors)."""
    return original_layout.is_original_folder(path)


# --------------------------------------------------------------------------------------------
# Our training workdirs: config.json + an Orbax params checkpoint (checkpoints/best/0)


def _workdir_config(model: Loaded, vae_workdir: str) -> dict:
    converted: dict[str, Any] = {"source": model.source}
    if isinstance(model, LoadedPhraseVAE):
        converted["original_config"] = model.original_config
        return {
            "model": dataclasses.asdict(model.config),
            "data": {"max_length": decoding.DEFAULT_MAX_LENGTH},
            CONVERTED_FROM: converted,
        }
    converted["section_vocab"] = original_layout.section_vocab_to_json(model.section_vocab)
    converted["clip"] = model.clip
    return {
        "model": dataclasses.asdict(model.config),
        "vae": {"workdir": vae_workdir, "checkpoint": "best"},
        CONVERTED_FROM: converted,
    }


def workdir_clip(workdir_config: Mapping[str, Any]) -> str:
    """The clip mode a PhraseLDM workdir samples with: ``"scaled"`` for one trained here; for
    a converted one what its ``converted_from`` group records, ``"reference"`` when absent
    (workdirs converted before the clip mode was recorded hold the original's weights)."""
    converted = workdir_config.get(CONVERTED_FROM)
    if not converted:
        return "scaled"
    return converted.get("clip", "reference") if isinstance(converted, Mapping) else "reference"


def save_workdir(
    model: Loaded, workdir: str | os.PathLike, *, vae_workdir: str = "", overwrite: bool = False
) -> str:
    """Writes ``model`` as a workdir our tools read (``checkpointing.load_params``, sample.py,
    ``PhraseVAEModel.from_workdir``): an Orbax checkpoint ``checkpoints/best/0`` holding
    ``{"params": ...}``, then ``config.json`` (groups ``model``, ``converted_from``, and
    ``data`` / ``vae``). ``vae_workdir``: the PhraseVAE an LDM decodes with (LDMs only).
    Returns the workdir. Refuses a workdir that already has checkpoints unless ``overwrite``."""
    import orbax.checkpoint as ocp

    from phraseldm_jax import checkpointing

    workdir = os.path.abspath(os.fspath(workdir))
    checkpoints = os.path.join(workdir, checkpointing.CHECKPOINTS)
    if os.path.exists(checkpoints):
        if not overwrite:
            raise FileExistsError(f"{workdir} already holds checkpoints (pass --overwrite)")
        shutil.rmtree(checkpoints)
    config = _workdir_config(model, vae_workdir)
    manager = ocp.CheckpointManager(
        checkpointing.checkpoint_dir(workdir, "best"),
        item_handlers={"state": ocp.StandardCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=1),
    )
    try:
        manager.save(
            0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": model.params}))
        )
        manager.wait_until_finished()
    finally:
        manager.close()
    checkpointing.write_workdir_config(workdir, config)
    return workdir


def load_workdir(workdir: str | os.PathLike, *, which: str = "best") -> Loaded:
    """A LoadedPhraseVAE or LoadedPhraseLDM from one of our workdirs (converted or trained
    here), by its config.json ``model`` group; the ``which`` checkpoint, else the other (the
    one read: its ``checkpoint``, a ``checkpointing.CheckpointUsed``)."""
    from phraseldm_jax import checkpointing

    workdir = os.fspath(workdir)
    config_path = os.path.join(workdir, checkpointing.CONFIG_JSON)
    config = checkpointing.read_workdir_config(workdir)
    model = config.get("model")
    if not isinstance(model, dict) or not ({"t5", "dit"} & set(model)):
        raise ValueError(f"{config_path}: no PhraseVAE ('t5') or PhraseLDM ('dit') model group")
    params, used = checkpointing.load_trained(workdir, which)
    converted = config.get(CONVERTED_FROM) or {}
    source = os.path.abspath(workdir)
    if "t5" in model:
        vae_model = LoadedPhraseVAE(
            vae_lib.PhraseVAEConfig(**model),
            params,
            source=source,
            original_config=converted.get("original_config"),
        )
        vae_model.checkpoint = used
        return vae_model
    ldm_config = PhraseLDMConfig(**model)
    if ldm_config.scale_factor <= 0 or ldm_config.clip_range <= 0:
        raise ValueError(f"{config_path}: model.scale_factor / clip_range not resolved (<= 0)")
    vocab = sections_lib.DEFAULT_SECTION_VOCAB
    if converted.get("section_vocab"):
        vocab = original_layout.section_vocab_from_json(converted["section_vocab"], config_path)
    ldm_model = LoadedPhraseLDM(
        ldm_config, params, section_vocab=vocab, source=source, clip=workdir_clip(config)
    )
    ldm_model.checkpoint = used
    return ldm_model
