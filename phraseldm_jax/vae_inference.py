"""A trained PhraseVAE for inference: the one class that encodes and decodes phrases.

``PhraseVAEModel`` holds a stage-3 config and its params: ``encode`` phrases to posterior
means and log-variances (batched, jitted, padded to a few fixed shapes so that only a handful
of programs are ever compiled, batch split over a device mesh), ``decode`` latents to phrases
(cached greedy decoding, ``decoding.py``, optionally split over ``devices``), ``first_tokens``
(one greedy step: where songs end); ``songs.decode_songs`` assembles songs with it.
``from_workdir`` loads a training workdir or an original-layout folder
(``pretrained.load_vae``). The commands are in ``cli/vae.py``.

Bad input: a phrase longer than the model's ``max_length`` is truncated and a warning counts
how many were; an unknown token (``UnknownTokenError``), an empty phrase, latents of the wrong
width or with NaN/inf, and a checkpoint whose shapes do not match the config
(``CheckpointMismatchError``) are errors that say where.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from phraseldm_jax import checkpointing, decoding, phrases, pretrained, sharding
from phraseldm_jax import vae as vae_lib
from phraseldm_jax.vocab import BOS_ID, EOS_ID, PAD_ID, PHRASE_VOCAB, QUERY_IDS

LENGTH_BUCKETS = (8, 16, 32, 64, 128)  # encoder input lengths compiled (capped at max_length)
SONG_DECODE_BATCH = 4096  # decode_batch_size for whole generated songs (sampling, evaluation)


def abstract_params(config: vae_lib.PhraseVAEConfig) -> Any:
    """ShapeDtypeStructs of the params of ``config`` (nothing allocated)."""
    return jax.eval_shape(lambda: vae_lib.init_params(jax.random.PRNGKey(0), config))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class PhraseVAEModel:
    """A stage-3 PhraseVAE: config, params and jitted encode/decode.

    Args:
      config: the model config (head ``vae``).
      params: its params pytree (numpy or jax arrays); checked against ``config``.
      max_length: encoder input and decoding length limit (the training ``data.max_length``).
      batch_size: most phrases encoded in one call of the jitted encoder.
      decode_batch_size: most latents decoded together.
      compute_dtype: matmul dtype of greedy decoding (``decoding.greedy_decode``'s
        ``compute_dtype``): None keeps the model's (float32); "bfloat16" is faster on CPUs
        with AMX and on accelerators, with nearly the same tokens (see docs/DECODING.md).
      devices: decoding splits its rows over these (``decoding.greedy_decode``); None: one
        device (the mesh's first when a mesh is given, else the default device).
      mesh: device mesh the encoder batch is split over (default: every device, data axis;
        made at the first ``encode``).
      source: where the params came from, quoted in errors.
    """

    def __init__(
        self,
        config: vae_lib.PhraseVAEConfig,
        params: Any,
        *,
        max_length: int = decoding.DEFAULT_MAX_LENGTH,
        batch_size: int = 512,
        decode_batch_size: int = 1024,
        compute_dtype: str | None = None,
        devices: Sequence[jax.Device] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        source: str = "params",
    ):
        if not isinstance(config, vae_lib.PhraseVAEConfig):
            config = vae_lib.PhraseVAEConfig(**config)
        if config.head != "vae":
            raise ValueError(
                f"{source}: PhraseVAEModel needs a stage-3 model (head 'vae'), got {config.head!r}"
            )
        checkpointing.check_matches(
            f"{source} vs its config.model", params, abstract_params(config)
        )
        self.config = config
        self.source = source
        self.checkpoint: checkpointing.CheckpointUsed | None = None  # set by from_workdir
        self.latent_dim = config.latent_dim
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.decode_batch_size = int(decode_batch_size)
        self.compute_dtype = compute_dtype
        self.devices = None if devices is None else list(devices)
        self._mesh = mesh
        self._host_params = params
        # Decoding runs on one device unless ``devices`` splits it: replicated over a mesh it
        # would repeat the work.
        self.decode_params = jax.device_put(params, None if mesh is None else mesh.devices.flat[0])
        # Cache buffers kept from one decode to the next (decoding.CacheBuffers): the cache
        # grows into them instead of fresh allocations.
        self.buffers = decoding.CacheBuffers()
        self.n_prefix = config.n_query_tokens + 1  # [C0].. [BOS]

    @classmethod
    def from_workdir(cls, workdir: str, which: str = "best", **kwargs) -> PhraseVAEModel:
        """The ``which`` checkpoint (else the other one) of a training workdir, with the model
        config and ``max_length`` of its ``config.json``, or a PhraseVAE folder in the
        original's layout (config.json + model.safetensors)."""
        loaded = pretrained.load_vae(workdir, which)
        kwargs.setdefault("max_length", loaded.max_length)
        model = cls(loaded.config, loaded.params, source=loaded.source, **kwargs)
        model.checkpoint = loaded.checkpoint  # which step was read (None: an original folder)
        return model

    @functools.cached_property
    def mesh(self) -> jax.sharding.Mesh:
        """The mesh the encoder batch is split over."""
        return self._mesh or sharding.make_mesh({"data": -1, "fsdp": 1})

    @functools.cached_property
    def params(self) -> Any:
        """The params replicated over ``mesh`` (the encoder's copy)."""
        return jax.device_put(self._host_params, sharding.replicated(self.mesh))

    @functools.cached_property
    def _encode(self):
        model = vae_lib.PhraseVAE(self.config)
        return jax.jit(
            lambda p, ids, mask: model.apply(
                {"params": p}, ids, mask, method=vae_lib.PhraseVAE.encode
            ),
            out_shardings=sharding.replicated(self.mesh),
        )

    # --- encoding ------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Encoder inputs ``[C0]..[C3] [BOS] phrase [EOS]``, truncated to ``max_length`` (with
        a warning counting the truncated phrases)."""
        if self.max_length < self.n_prefix + 2:
            raise ValueError(f"max_length {self.max_length} leaves no room for a phrase")
        prefix = [*QUERY_IDS[: self.config.n_query_tokens], BOS_ID]
        inputs, truncated = [], 0
        for index, text in enumerate(texts):
            text = phrases.as_text(text)
            tokens = PHRASE_VOCAB.encode(text, source=f"phrase {index}")
            if not tokens:
                raise ValueError(f"phrase {index} is empty (an empty slot is '[INST]')")
            ids = [*prefix, *tokens, EOS_ID]
            if len(ids) > self.max_length:
                truncated += 1
                ids = ids[: self.max_length]
            inputs.append(ids)
        if truncated:
            warnings.warn(
                f"{truncated} of {len(texts)} phrases were longer than the model's limit of "
                f"{self.max_length - self.n_prefix - 1} tokens and were truncated",
                stacklevel=3,
            )
        return inputs

    def _bucket_shape(self, n_rows: int, longest: int) -> tuple[int, int]:
        length = next((b for b in LENGTH_BUCKETS if b >= longest), self.max_length)
        length = min(max(length, longest), self.max_length)
        rows = min(_pow2(n_rows), _pow2(self.batch_size))
        return _round_up(rows, self.mesh.devices.size), length

    def encode(
        self,
        texts: Sequence[str],
        sample: bool = False,
        rng: jax.Array | None = None,
        progress=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Posterior of each phrase.

        Args:
          texts: phrase strings (``"i-0 o-0 p-60 d-12"``, or ``[INST]``, ``b-1``, ``[SEP]``).
          sample: return a posterior sample z = mean + eps * exp(logvar / 2) in place of the
            mean (needs ``rng``).
          progress: a tqdm-like callable wrapping the batch loop, or None.
        Returns:
          (mean or z, logvar): float32 numpy [N, latent_dim].
        """
        if sample and rng is None:
            raise ValueError("encode(sample=True) needs an rng key")
        inputs = self.tokenize(texts)
        mean = np.zeros((len(inputs), self.latent_dim), np.float32)
        logvar = np.zeros_like(mean)
        order = np.argsort([len(ids) for ids in inputs], kind="stable")
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batch_sh = sharding.batch_sharding(self.mesh)
        for chunk in progress(chunks) if progress else chunks:
            rows, length = self._bucket_shape(len(chunk), max(len(inputs[i]) for i in chunk))
            ids = np.full((rows, length), PAD_ID, np.int32)
            mask = np.zeros((rows, length), np.int32)
            for row, index in enumerate(chunk):
                ids[row, : len(inputs[index])] = inputs[index]
                mask[row, : len(inputs[index])] = 1
            mask[len(chunk) :, : self.n_prefix + 1] = 1  # filler rows: no fully masked row
            m, lv = self._encode(
                self.params, jax.device_put(ids, batch_sh), jax.device_put(mask, batch_sh)
            )
            mean[chunk] = np.asarray(m)[: len(chunk)]
            logvar[chunk] = np.asarray(lv)[: len(chunk)]
        if sample:
            eps = np.asarray(jax.random.normal(rng, mean.shape, np.float32))
            return mean + eps * np.exp(0.5 * logvar), logvar
        return mean, logvar

    # --- decoding ------------------------------------------------------------------------

    def check_latents(self, latents: Any, what: str = "latents") -> np.ndarray:
        """``latents`` as float32 [N, latent_dim]; a clear error for any other shape or NaN/inf."""
        array = np.asarray(latents, np.float32)
        if array.ndim != 2 or array.shape[1] != self.latent_dim:
            raise ValueError(f"{what} must be [N, {self.latent_dim}], got shape {array.shape}")
        bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
        if len(bad):
            raise ValueError(f"{what} rows {bad[:10].tolist()} hold NaN or inf")
        return array

    def _tokens(self, latents: Any, max_length: int) -> np.ndarray:
        return decoding.greedy_decode(
            self.decode_params,
            self.config,
            self.check_latents(latents),
            max_length=max_length,
            batch_size=self.decode_batch_size,
            devices=self.devices,
            buffers=self.buffers,
            compute_dtype=self.compute_dtype,
        )

    def decode(self, latents: Any) -> list[str]:
        """Greedy phrase of each latent row ([N, latent_dim]) -> N strings."""
        return decoding.tokens_to_phrases(self._tokens(latents, self.max_length))

    def first_tokens(self, latents: Any) -> np.ndarray:
        """[N] int: the first token each latent decodes to (one greedy step)."""
        return self._tokens(latents, 2)[:, 1]

    def reconstruct(self, texts: Sequence[str]) -> list[str]:
        """``decode(encode(texts).mean)``."""
        return self.decode(self.encode(texts)[0])
