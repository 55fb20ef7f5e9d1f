"""The sharded train step exactly as ``trainer.run`` builds it, for the mesh tests of both models.

``compiled_step`` repeats run()'s setup (optimiser from ``config.optim``, abstract state,
FSDP shardings from ``config.mesh.fsdp_min_size``, sharded init, one ``jax.jit`` with explicit
in/out shardings and donation) on a given mesh, so that a test can take single steps and look
at the state in between.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import subprocess
import sys
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from phraseldm_jax import optim, sharding, trainer

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@contextlib.contextmanager
def fast_compiles():
    """XLA without most of its optimisation passes (much faster compiles on CPU; the flax
    examples' tests do the same). Sharding propagation and partitioning still run, and every
    comparison in these tests is between programs compiled the same way."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@dataclasses.dataclass
class Compiled:
    """A sharded train state with its step: ``state, metrics = step(state, batch, frozen)``."""

    mesh: Any
    state: Any
    step: Any
    frozen: Any
    batch_sharding: Any

    def run(self, host_batch: dict, steps: int = 1) -> dict:
        """``steps`` updates on the same host batch; returns the last step's metrics."""
        batch = sharding.global_batch(self.batch_sharding, host_batch)
        metrics = None
        for _ in range(steps):
            self.state, metrics = self.step(self.state, batch, self.frozen)
        return sharding.fetch(metrics)


def mesh(data: int, fsdp: int):
    """A ("data", "fsdp") mesh over the first ``data * fsdp`` devices."""
    return sharding.make_mesh({"data": data, "fsdp": fsdp}, jax.devices()[: data * fsdp])


def compiled_step(task: trainer.Task, config, on_mesh, example: dict) -> Compiled:
    """``trainer.run``'s state and step for ``task`` on ``on_mesh`` (``config.mesh`` ignored,
    except ``fsdp_min_size``); ``example``: a host batch giving the init its shapes."""
    accum = int(config.optim.grad_accum_steps)
    min_size = int(config.mesh.fsdp_min_size)
    tx, lr_fn = optim.make_optimizer(config.optim, config.train.num_steps)
    init_fn = functools.partial(trainer.init_train_state, task, tx, config.train.seed)
    abstract = jax.eval_shape(init_fn, example)
    state_sh = sharding.tree_shardings(abstract, on_mesh, min_size)
    state = jax.jit(init_fn, out_shardings=state_sh)(example)
    frozen_sh = sharding.tree_shardings(task.frozen, on_mesh, min_size)
    batch_sh = sharding.batch_sharding(on_mesh)
    micro_sh = NamedSharding(on_mesh, P(None, sharding.BATCH_AXES))
    step = jax.jit(
        trainer.make_train_step(task, tx, lr_fn, accum, micro_sh),
        in_shardings=(state_sh, batch_sh, frozen_sh),
        out_shardings=(state_sh, sharding.replicated(on_mesh)),
        donate_argnums=0,
    )
    frozen = jax.device_put(task.frozen, frozen_sh)
    return Compiled(on_mesh, state, step, frozen, batch_sh)


def specs(tree: Any) -> dict[str, P]:
    """``{"params/t5/shared/embedding": PartitionSpec}`` of every array of ``tree``."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {optim.path_string(path): leaf.sharding.spec for path, leaf in leaves}


def largest_params(params: Any, count: int) -> list[tuple[str, tuple[int, ...]]]:
    """The ``count`` biggest parameter arrays: ``[(path, shape)]``, biggest first."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    sized = [(optim.path_string(path), tuple(leaf.shape)) for path, leaf in leaves]
    return sorted(sized, key=lambda item: -int(np.prod(item[1])))[:count]


def host(tree: Any) -> Any:
    """Device arrays -> numpy copies (they survive donation)."""
    return jax.tree.map(lambda x: np.array(x), tree)


def max_abs_diff(a: Any, b: Any) -> float:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def run_one_device(
    script: str, *args: str, cwd: str | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Runs ``script`` (Python source) in a fresh process that sees a single CPU device;
    ``sys.argv[1:]`` = ``args``, and the tests folder is importable."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = str(jax.config.read("jax_disable_most_optimizations"))
    env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_processes(
    script: str, *args: str, count: int = 2, devices: int = 4, cwd: str | None = None
) -> list[str]:
    """Runs ``script`` in ``count`` processes of ``devices`` CPU devices each, joined by
    ``jax.distributed`` over localhost (the environment ``trainer.maybe_initialize_distributed``
    reads); returns their stdouts, asserting that every process succeeded."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES=str(count),
        JAX_DISABLE_MOST_OPTIMIZATIONS=str(jax.config.read("jax_disable_most_optimizations")),
        PYTHONPATH=os.pathsep.join([TESTS_DIR, env.get("PYTHONPATH", "")]),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            env=dict(env, JAX_PROCESS_ID=str(i)),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=900))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, (proc, (_, err)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {i} of {count}:\n{err[-3000:]}"
    return [out for out, _ in outputs]


class ProcessShards(grain.DatasetIterator):
    """The global batches of a multi-process run, built in one process: the host batches of
    the iterators of processes 0, 1, ... concatenated in process order (the order in which
    ``jax.make_array_from_process_local_data`` lays them out on a mesh over all devices)."""

    def __init__(self, parts):
        super().__init__(parts)
        self.parts = parts

    def __next__(self):
        batches = [next(part) for part in self.parts]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self):
        return {str(i): part.get_state() for i, part in enumerate(self.parts)}

    def set_state(self, state):
        for i, part in enumerate(self.parts):
            part.set_state(state[str(i)])
