"""Checkpoint integrity: how often damage is found, and what the checksums cost a save.

    PYTHONPATH=. python benchmarks/checkpoint_faults.py [--flips 20] [--config vae_stage3:small]

1. Detection: a workdir with latest/2 and latest/4 of a toy train state; for each file of
   latest/4, ``--flips`` single-bit flips at random offsets (fixed seed), each followed by the
   trainer's resume (``CheckpointStore.restore``) and a load (``load_trained``); a trial counts
   as detected when both fall back to latest/2 with one warning line and restore its values.
   Then the same flips in the array data files with ``file_digests.json`` rewritten to match
   (damage that happened before the write): only the array checksums can tell; counted as
   fallback / intact (the flip changed no value read) / wrong (silent corruption) / error.
2. Cost: the train state of ``--config`` (random values, its real shapes and dtypes), the
   time of ``tree_checksums`` (jitted, on the default device) against a ``CheckpointStore``
   save of the same state (to a temporary folder, waited for), medians of ``--repeats``.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib
import io
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from phraseldm_jax import checkpoint_integrity, checkpointing, optim, trainer  # noqa: E402


def _toy_store(workdir):
    from test_checkpointing import make_iter, make_state

    state = make_state()
    store = checkpointing.CheckpointStore(workdir)
    for step in (2, 4):
        store.save("latest", step, state, make_iter(), {"step": step})
    store.close()
    return state, make_iter


def _outcome(read, expected) -> str:
    """``fallback`` (latest/2 used, one warning line), ``intact`` (latest/4 used, the values
    saved), ``wrong`` (latest/4 used, other values: silent corruption) or ``error``."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            step, tree = read()
        except Exception:  # noqa: BLE001 - a crash is a failed trial
            return "error"
    warnings = [line for line in err.getvalue().splitlines() if line.startswith("checkpoint ")]
    if step == 2:
        return "fallback" if len(warnings) == 1 else "error"
    same = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(expected))
    )
    return "intact" if same else "wrong"


def _outcomes(workdir, state, make_iter) -> tuple[str, str]:
    """What the trainer's resume and a load make of the workdir."""

    def resume():
        store = checkpointing.CheckpointStore(workdir)
        restored, _ = store.restore(jax.eval_shape(lambda: state), make_iter())
        store.close()
        return store.restored.step, restored

    def load():
        params, used = checkpointing.load_trained(workdir, "latest")
        return used.step, params

    return _outcome(resume, state), _outcome(load, state.params)


def _flip(path, rng):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        offset = int(rng.integers(len(data)))
        data[offset] ^= 1 << int(rng.integers(8))
        f.seek(0)
        f.write(data)


def detection(flips: int) -> dict:
    rng = np.random.default_rng(16)
    with tempfile.TemporaryDirectory() as workdir:
        state, make_iter = _toy_store(workdir)
        root = os.path.join(checkpointing.checkpoint_dir(workdir, "latest"), "4")
        files = sorted(
            os.path.relpath(os.path.join(d, n), root)
            for d, _, names in os.walk(root)
            for n in names
            if n != "commit_success.txt"
        )
        per_file, arrays_only = {}, collections.Counter()
        for name in files:
            path = os.path.join(root, name)
            pristine = open(path, "rb").read()
            found = 0
            for _ in range(flips):
                _flip(path, rng)
                found += _outcomes(workdir, state, make_iter) == ("fallback", "fallback")
                open(path, "wb").write(pristine)
            per_file[name] = {"trials": flips, "detected": found}
        digests = open(os.path.join(root, checkpoint_integrity.FILE_DIGESTS), "rb").read()
        for name in [f for f in files if "/d/" in f]:
            path = os.path.join(root, name)
            pristine = open(path, "rb").read()
            for _ in range(flips):
                _flip(path, rng)
                checkpoint_integrity.write_file_digests(root)
                checkpoint_integrity.seal_step(root)
                resume, load = _outcomes(workdir, state, make_iter)
                arrays_only[f"resume {resume}"] += 1
                arrays_only[f"load {load}"] += 1
                open(path, "wb").write(pristine)
                open(os.path.join(root, checkpoint_integrity.FILE_DIGESTS), "wb").write(digests)
    return {
        "trials": sum(v["trials"] for v in per_file.values()),
        "detected": sum(v["detected"] for v in per_file.values()),
        "per_file": per_file,
        # Flips in the array data files with the digests rewritten to match (damage before
        # the write): only the checksums can tell; "intact" = the flip did not change a value.
        "array_data_with_digests_rewritten": dict(sorted(arrays_only.items())),
    }


def vae_state(config_name: str):
    """The train state of a VAE config, random values of its real shapes and dtypes."""
    module, _, size = config_name.partition(":")
    config = importlib.import_module(f"configs.{module}").get_config(size)
    config.data.data_dir = ""  # the synthetic corpus: shapes only
    from input_pipeline import vae_pipeline
    from phraseldm_jax import vae_task

    task = vae_task.vae_task(config)
    example = trainer.peek_batch(vae_pipeline.make_train_iter(config)(0, 1))
    tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
    abstract = jax.eval_shape(functools.partial(trainer.init_train_state, task, tx, 0), example)
    rng = np.random.default_rng(0)

    def fill(leaf):
        if np.issubdtype(leaf.dtype, np.floating):
            return jax.numpy.asarray(rng.normal(size=leaf.shape), leaf.dtype)
        return jax.numpy.asarray(rng.integers(0, 1000, size=leaf.shape), leaf.dtype)

    return jax.tree.map(fill, abstract), config


def cost(config_name: str, repeats: int) -> dict:
    from test_checkpointing import make_iter

    state, _ = vae_state(config_name)
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    compile_start = time.perf_counter()
    checkpoint_integrity.tree_checksums(state)
    compile_s = time.perf_counter() - compile_start
    checksum_s, save_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        checkpoint_integrity.tree_checksums(state)
        checksum_s.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as workdir:
        store = checkpointing.CheckpointStore(workdir, keep_last=1)
        for step in range(1, repeats + 2):
            start = time.perf_counter()
            store.save("latest", step, state, make_iter(), {})
            store.wait_until_finished()
            if step > 1:  # the first one opens files and warms caches
                save_s.append(time.perf_counter() - start)
        store.close()
        start = time.perf_counter()
        assert checkpointing.step_damage(workdir, "latest", repeats + 1) is None
        inspect_s = time.perf_counter() - start
        shutil.rmtree(workdir, ignore_errors=True)
    checksum_ms, save_ms = 1e3 * np.median(checksum_s), 1e3 * np.median(save_s)
    return {
        "config": config_name,
        "state_mib": round(nbytes / 2**20, 1),
        "leaves": len(jax.tree.leaves(state)),
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "checksum_ms": round(float(checksum_ms), 1),
        "checksum_first_call_s": round(compile_s, 2),
        "save_ms_including_checksum": round(float(save_ms), 1),
        "checksum_share_of_save": round(float(checksum_ms / save_ms), 3),
        "file_digest_check_ms": round(1e3 * inspect_s, 1),  # read side, once per restore/load
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flips", type=int, default=20, help="flips per file")
    parser.add_argument("--config", default="vae_stage3:small", help="configs/<module>:<size>")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip_detection", action="store_true")
    args = parser.parse_args()
    result = {"cost": cost(args.config, args.repeats)}
    if not args.skip_detection:
        result["detection"] = detection(args.flips)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
