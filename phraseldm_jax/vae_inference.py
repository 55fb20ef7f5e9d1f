"""A trained PhraseVAE for use from Python and the command line.

``PhraseVAEModel`` holds a stage-3 config and its params: ``encode`` phrases to posterior
means and log-variances (batched, jitted, padded to a few fixed shapes so that only a handful
of programs are ever compiled, batch split over a device mesh), ``decode`` latents to phrases
(cached greedy decoding, ``decoding.py``), ``decode_song`` a song's slot latents
``[4 * n_bars (or 512), 64]`` to its REMI-z string or MultiTrack, ``write_midi``.

Bad input: a phrase longer than the model's ``max_length`` is truncated and a warning counts
how many were; an unknown token (``UnknownTokenError``), an empty phrase, latents of the wrong
width or with NaN/inf, and a checkpoint whose shapes do not match the config
(``CheckpointMismatchError``) are errors that say where.

Command line::

  python -m phraseldm_jax.vae_inference encode --workdir W --input phrases.txt --output z.npz
  python -m phraseldm_jax.vae_inference decode --workdir W --input z.npz --output phrases.txt
  python -m phraseldm_jax.vae_inference reconstruct --workdir W --input in.mid --output out.mid

``encode`` reads one phrase per line and writes ``mean`` and ``logvar`` ([N, 64]); ``decode``
reads a ``.npy`` array or the ``mean`` of such a ``.npz`` (``--song`` also writes the rows
as a song's slot latents to a MIDI file); ``reconstruct`` sends a MIDI file through the VAE
(every track phrase of every bar) and prints how well it came back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from phraseldm_jax import checkpointing, decoding, phrases, sharding
from phraseldm_jax import vae as vae_lib
from phraseldm_jax.metrics import f1 as f1_lib
from phraseldm_jax.remiz import MultiTrack
from phraseldm_jax.vocab import BOS_ID, EOS_ID, PAD_ID, PHRASE_VOCAB, QUERY_IDS

LENGTH_BUCKETS = (8, 16, 32, 64, 128)  # encoder input lengths compiled (capped at max_length)
DEFAULT_TEMPO = 90.0  # bpm of written MIDI, as the original's sampling script


def read_workdir_config(workdir: str) -> dict:
    """``<workdir>/config.json`` (written by the trainer) as a dict."""
    path = os.path.join(os.fspath(workdir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a PhraseVAE training workdir")
    with open(path) as f:
        config = json.load(f)
    if not isinstance(config.get("model"), dict) or "t5" not in config["model"]:
        raise ValueError(f"{path}: no PhraseVAE 'model' group with a 't5' entry")
    return config


def abstract_params(config: vae_lib.PhraseVAEConfig) -> Any:
    """ShapeDtypeStructs of the params of ``config`` (nothing allocated)."""
    return jax.eval_shape(lambda: vae_lib.init_params(jax.random.PRNGKey(0), config))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def write_atomic(path: str, write) -> None:
    """Calls ``write(tmp_path)`` on a temporary file next to ``path``, then renames it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class PhraseVAEModel:
    """A stage-3 PhraseVAE: config, params and jitted encode/decode.

    Args:
      config: the model config (head ``vae``).
      params: its params pytree (numpy or jax arrays); checked against ``config``.
      max_length: encoder input and decoding length limit (the training ``data.max_length``).
      batch_size: most phrases encoded in one call of the jitted encoder.
      decode_batch_size: most latents decoded together.
      decode_compute_dtype: matmul dtype of greedy decoding (``decoding.greedy_decode``'s
        ``compute_dtype``): None keeps the model's (float32); "bfloat16" is ~1.5-2x faster on
        CPUs with AMX, with nearly the same tokens (see docs/DECODING.md).
      mesh: device mesh the encoder batch is split over (default: every device, data axis).
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
        decode_compute_dtype: str | None = None,
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
        self.latent_dim = config.latent_dim
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.decode_batch_size = int(decode_batch_size)
        self.decode_compute_dtype = decode_compute_dtype
        self.mesh = mesh or sharding.make_mesh({"data": -1, "fsdp": 1})
        self.params = jax.device_put(params, sharding.replicated(self.mesh))
        # Decoding runs on one device: replicated over a mesh it would repeat the work.
        self.decode_params = jax.device_put(params, self.mesh.devices.flat[0])
        self.n_prefix = config.n_query_tokens + 1  # [C0].. [BOS]
        if self.max_length < self.n_prefix + 2:
            raise ValueError(f"max_length {self.max_length} leaves no room for a phrase")
        model = vae_lib.PhraseVAE(config)
        self._encode = jax.jit(
            lambda p, ids, mask: model.apply(
                {"params": p}, ids, mask, method=vae_lib.PhraseVAE.encode
            ),
            out_shardings=sharding.replicated(self.mesh),
        )

    @classmethod
    def from_workdir(cls, workdir: str, which: str = "best", **kwargs) -> PhraseVAEModel:
        """The ``which`` checkpoint (``latest`` when there is no best) of a training workdir,
        with the model config and ``max_length`` of its ``config.json``."""
        config = read_workdir_config(workdir)
        model_config = vae_lib.PhraseVAEConfig(**config["model"])
        try:
            params = checkpointing.load_params(workdir, which)
        except FileNotFoundError:
            if which != "best":
                raise
            which = "latest"  # a run without evaluation has no best checkpoint
            params = checkpointing.load_params(workdir, which)
        kwargs.setdefault("max_length", int(config.get("data", {}).get("max_length", 128)))
        source = f"checkpoint {checkpointing.checkpoint_dir(workdir, which)}"
        return cls(model_config, params, source=source, **kwargs)

    # --- encoding ------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Encoder inputs ``[C0]..[C3] [BOS] phrase [EOS]``, truncated to ``max_length`` (with
        a warning counting the truncated phrases)."""
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

    def decode(self, latents: Any) -> list[str]:
        """Greedy phrase of each latent row ([N, latent_dim]) -> N strings."""
        latents = self.check_latents(latents)
        tokens = decoding.greedy_decode(
            self.decode_params,
            self.config,
            latents,
            max_length=self.max_length,
            batch_size=self.decode_batch_size,
            compute_dtype=self.decode_compute_dtype,
        )
        return decoding.tokens_to_phrases(tokens)

    def reconstruct(self, texts: Sequence[str]) -> list[str]:
        """``decode(encode(texts).mean)``."""
        return self.decode(self.encode(texts)[0])

    def decode_song(self, latents: Any) -> str:
        """A song's slot latents [4 * n_bars, latent_dim] (or a padded [512, latent_dim])
        -> its REMI-z string (tokens up to the first ``[SEP]``, SPEC section 7)."""
        latents = self.check_latents(latents, "song latents")
        if len(latents) % 4:
            raise ValueError(
                f"song latents have {len(latents)} rows, not a multiple of the 4 slots of a bar"
            )
        return phrases.slots_to_remiz(self.decode(latents))

    def decode_song_multitrack(self, latents: Any) -> MultiTrack:
        """``decode_song`` as a remi-z MultiTrack."""
        return phrases.remiz_to_multitrack(self.decode_song(latents))


def write_midi(path: str, song: str | MultiTrack, tempo: float = DEFAULT_TEMPO) -> None:
    """Writes a song (REMI-z string or MultiTrack) as a MIDI file, atomically."""
    if isinstance(song, str):
        song = phrases.remiz_to_multitrack(song)
    if not song.bars:
        raise ValueError(f"{path}: the song has no bars (no 'b-1' token), nothing to write")
    write_atomic(path, lambda tmp: song.to_midi(tmp, tempo=float(tempo), verbose=False))


def notes_only(text: str) -> str:
    """A decoded phrase without bar, song or special tokens, so that it stays in its bar."""
    return " ".join(t for t in text.split() if t[:2] in ("i-", "o-", "p-", "d-"))


def bars_as_song(slots: Sequence[str], per_bar: int = phrases.DEFAULT_N_SLOTS + 1) -> list[str]:
    """Decoded bars of ``per_bar`` slots made safe to write: track slots keep only note tokens
    (``[INST]`` when none are left) and every bar ends in ``b-1``, so a stray ``[SEP]`` or
    ``b-1`` in a decoded slot cannot cut the song short or add bars."""
    if len(slots) % per_bar:
        raise ValueError(f"{len(slots)} slot strings are not whole bars of {per_bar}")
    out = []
    for start in range(0, len(slots), per_bar):
        tracks = slots[start : start + per_bar - 1]
        out.extend(notes_only(t) or phrases.INST_TOKEN for t in tracks)
        out.append(phrases.BAR_TOKEN)
    return out


def midi_slots(
    path: str, slot_order: str = "pitch_order", n_slots: int | None = None
) -> tuple[list[str], float]:
    """Slot strings of a MIDI file (per bar its track phrases, ``[INST]``-padded to
    ``n_slots``, then ``b-1``) and its first tempo in bpm.

    ``n_slots`` None: 3, or more when a bar has more tracks (``pitch_order``), so that no
    phrase is dropped.
    """
    try:
        song = MultiTrack.from_midi(os.fspath(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read as MIDI ({type(e).__name__}: {e})") from e
    if not song.bars:
        raise ValueError(f"{path}: no bars")
    if n_slots is None:
        n_slots = phrases.DEFAULT_N_SLOTS
        if slot_order == "pitch_order":
            n_slots = max(n_slots, *(len(bar) for bar in phrases.multitrack_phrases(song)))
    slots = phrases.slot_phrases(song, slot_order, n_slots=n_slots)
    return slots, float(song.bars[0].tempo)


# ----------------------------------------------------------------------------------------
# Command line.


def _load_latents(path: str) -> np.ndarray:
    data = np.load(path)
    if isinstance(data, np.lib.npyio.NpzFile):
        key = next((k for k in ("mean", "latents") if k in data.files), None)
        if key is None:
            raise ValueError(f"{path}: expected an array 'mean' or 'latents', found {data.files}")
        return data[key]
    return data


def _write_lines(path: str, lines: Sequence[str]) -> None:
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def _reconstruct(model: PhraseVAEModel, args) -> dict:
    """MIDI -> every track phrase through the VAE -> MIDI with the input's bar layout."""
    slots, tempo = midi_slots(args.input, args.slot_order)
    per_bar = slots.index(phrases.BAR_TOKEN) + 1
    real = [i for i, s in enumerate(slots) if s.startswith("i-")]
    decoded = model.reconstruct([slots[i] for i in real]) if real else []
    out = list(slots)
    for i, text in zip(real, decoded):
        out[i] = text
    write_midi(args.output, phrases.slots_to_remiz(bars_as_song(out, per_bar)), tempo)
    scores = f1_lib.reconstruction_f1(decoded, [slots[i] for i in real])
    exact = float(np.mean([d == slots[i] for i, d in zip(real, decoded)])) if real else 0.0
    return {
        "bars": len(slots) // per_bar,
        "phrases": len(real),
        "exact_match": exact,
        **scores,
        "output": args.output,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phraseldm_jax.vae_inference", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=("encode", "decode", "reconstruct"))
    parser.add_argument("--workdir", required=True, help="PhraseVAE (stage 3) training workdir")
    parser.add_argument("--checkpoint", default="best", choices=checkpointing.WHICH)
    parser.add_argument("--input", required=True, help="phrases.txt | latents.npy/.npz | in.mid")
    parser.add_argument("--output", required=True, help="latents.npz | phrases.txt | out.mid")
    parser.add_argument("--sample", action="store_true", help="encode: posterior samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--song", default="", help="decode: also write the rows as a song MIDI")
    parser.add_argument("--tempo", type=float, default=DEFAULT_TEMPO)
    parser.add_argument("--slot_order", default="pitch_order", choices=phrases.SLOT_ORDERS)
    parser.add_argument(
        "--decode_dtype", default=None, choices=("float32", "bfloat16"), help="decoding matmuls"
    )
    args = parser.parse_args(argv)

    model = PhraseVAEModel.from_workdir(
        args.workdir, args.checkpoint, decode_compute_dtype=args.decode_dtype
    )
    if args.command == "encode":
        with open(args.input) as f:
            texts = [line.strip() for line in f if line.strip()]
        mean, logvar = model.encode(texts, args.sample, jax.random.PRNGKey(args.seed))
        write_atomic(args.output, lambda tmp: np.savez(tmp, mean=mean, logvar=logvar))
        summary = {"phrases": len(texts), "output": args.output}
    elif args.command == "decode":
        latents = _load_latents(args.input)
        texts = model.decode(latents)
        write_atomic(args.output, lambda tmp: _write_lines(tmp, texts))
        summary = {"latents": len(texts), "output": args.output}
        if args.song:
            write_midi(args.song, phrases.slots_to_multitrack(texts), args.tempo)
            summary["song"] = args.song
    else:
        summary = _reconstruct(model, args)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
