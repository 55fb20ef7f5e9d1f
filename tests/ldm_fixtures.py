"""Small latent datasets and a stand-in phrase decoder for the LDM tests.

``Codebook`` gives every phrase string (and ``[INST]``, ``b-1``, ``[SEP]``) a fixed random
64-d latent and decodes latents back by nearest neighbour: a real, deterministic
latent -> phrase map with the PhraseVAE decoder's interface (``decode(latents) -> list[str]``),
so songs built from it decode exactly and generated latents always give valid phrases.

Datasets follow docs/ARCHITECTURE.md "Song-latent dataset" (``write_latent_dataset``); the
synthetic corpus (``input_pipeline.synthetic``) plants section repetition: every section of a
type repeats the same bars, hence the same latents.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np

from configs import ldm_common
from input_pipeline import latent_records, synthetic
from phraseldm_jax import phrases

SCALE = 0.76
SPECIALS = (phrases.INST_TOKEN, phrases.BAR_TOKEN, phrases.SEP_TOKEN)
ONE_NOTE_BAR = "i-0 o-0 p-60 d-12"


class Codebook:
    """Phrase string <-> fixed latent (N(0, SCALE^2) per dimension, seeded by insertion)."""

    def __init__(self, seed: int = 0, dim: int = 64):
        self._rng = np.random.default_rng(seed)
        self.dim = dim
        self.texts: list[str] = []
        self.vectors = np.zeros((0, dim), np.float32)
        for text in SPECIALS:
            self.latent(text)

    def latent(self, text: str) -> np.ndarray:
        if text not in self.texts:
            vector = (self._rng.normal(size=(1, self.dim)) * SCALE).astype(np.float32)
            self.texts.append(text)
            self.vectors = np.concatenate([self.vectors, vector])
        return self.vectors[self.texts.index(text)]

    def song_latents(self, slots: Iterable[str]) -> np.ndarray:
        return np.stack([self.latent(s) for s in slots])

    def decode(self, latents: np.ndarray) -> list[str]:
        """Nearest codebook phrase of every row of latents [N, dim]."""
        latents = np.asarray(latents, np.float32)
        d2 = (
            np.sum(latents**2, 1)[:, None]
            - 2 * latents @ self.vectors.T
            + np.sum(self.vectors**2, 1)[None]
        )
        return [self.texts[i] for i in np.argmin(d2, axis=1)]

    def stats(self) -> dict:
        return dict(
            scale_factor=SCALE,
            abs_p999=3.0,
            inst_latent=self.latent(phrases.INST_TOKEN),
            bar_latent=self.latent(phrases.BAR_TOKEN),
            sep_latent=self.latent(phrases.SEP_TOKEN),
            latent_dim=self.dim,
            slot_order="pitch_order",
        )


class EncodingCodebook(Codebook):
    """The codebook as a PhraseVAE (editing tests): ``encode`` gives each phrase its latent;
    b-1 and [SEP] are far from everything, so only kept slots decode to them."""

    def __init__(self):
        super().__init__(seed=5)
        self.latent(ONE_NOTE_BAR)
        for token in (phrases.BAR_TOKEN, phrases.SEP_TOKEN):
            self.vectors[self.texts.index(token)] *= 50.0

    def encode(self, texts):
        latents = np.stack([self.latent(t) for t in texts])
        return latents, np.zeros_like(latents)


def synthetic_songs(codebook: Codebook, n_songs: int, seed: int = 0) -> list[dict]:
    """Latent records of the synthetic corpus (16-64 bars, fitting section plans)."""
    songs = []
    for record in synthetic.synthetic_records(n_songs, seed=seed):
        songs.append(
            dict(
                song_id=record["song_id"],
                latents=codebook.song_latents(phrases.slot_phrases(record)),
                n_bars=record["n_bars"],
                section_plan=record["section_plan"],
                plan_fits=True,
            )
        )
    return songs


def fixed_length_songs(codebook: Codebook, lengths: Sequence[int]) -> list[dict]:
    """One song per length: every bar one note (``ONE_NOTE_BAR``), plan ``A-<n>`` (n <= 32)."""
    bar = [ONE_NOTE_BAR, phrases.INST_TOKEN, phrases.INST_TOKEN, phrases.BAR_TOKEN]
    return [
        dict(
            song_id=f"len{n}/{i}",
            latents=codebook.song_latents(bar * n),
            n_bars=n,
            section_plan=f"A-{n}" if n <= 32 else "",
            plan_fits=n <= 32,
        )
        for i, n in enumerate(lengths)
    ]


def write_dataset(path, codebook: Codebook, train: list[dict], validation: list[dict]) -> str:
    latent_records.write_latent_dataset(
        path, {"train": train, "validation": validation}, codebook.stats(), overwrite=True
    )
    return str(path)


def tiny_config(
    latent_dir: str, length_control=True, sec_control=False, **train
) -> ml_collections.ConfigDict:
    """``ldm_common``'s tiny size on a test dataset: no VAE, loss-only evaluation."""
    config = ldm_common.ldm_config(length_control, sec_control, "tiny")
    config.data.latent_dir = latent_dir
    config.vae.workdir = ""
    config.train.best_metric = "eval/loss"
    config.train.eval_every = 0
    config.eval.num_songs = 0
    config.train.update(train)
    return config


def save_workdir(workdir, config, params, which: str = "best", step: int = 1) -> str:
    """A training workdir as ``trainer.run`` leaves it: config.json and an Orbax checkpoint
    whose state holds ``params`` (enough for ``checkpointing.load_params``)."""
    import grain

    from phraseldm_jax import checkpointing, trainer

    workdir = str(workdir)
    checkpointing.write_workdir_config(workdir, config)
    store = checkpointing.CheckpointStore(workdir)
    data = iter(grain.MapDataset.source([0]).to_iter_dataset())
    store.save(which, step, {"params": params}, data, trainer.fresh_progress())
    store.wait_until_finished()
    store.close()
    return workdir


def init_key(seed: int = 0):
    """A RngBitGenerator key for parameter init: threefry init programs compile several
    times slower on CPU."""
    import jax

    return jax.random.key(seed, impl="unsafe_rbg")
