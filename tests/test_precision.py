"""bfloat16 compute (``config.model.t5.dtype`` / ``config.model.dit.dtype``) through both real
tasks: a few training steps track float32, the train state stays float32, and the train step's
jaxpr keeps in float32 what must be (docs/BF16.md).

Tolerance: bf16 keeps 8 significant bits (relative rounding 2**-9 = 0.2% per operation);
after 5 steps from the same init on the same batches, the bf16 loss is within 1% of the
float32 loss at every step.
"""

import jax
import jax.numpy as jnp
import ldm_fixtures
import mesh_helpers as mh
import numpy as np
import pytest
import vae_fixtures as fx

from input_pipeline import ldm_pipeline, vae_pipeline
from phraseldm_jax import ldm_task, optim, trainer, vae_task

STEPS = 5
LOSS_RTOL = 1e-2
BF16, F32, BOOL = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(bool)


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    codebook = ldm_fixtures.Codebook()
    songs = ldm_fixtures.fixed_length_songs(codebook, [3, 5, 8, 12, 16, 7, 9, 4, 10, 2])
    path = tmp_path_factory.mktemp("precision") / "latents"
    return ldm_fixtures.write_dataset(path, codebook, songs[:8], songs[8:])


def ldm_setup(latent_dir, dtype):
    config = ldm_fixtures.tiny_config(latent_dir, length_control=True, sec_control=True)
    config.model.dit.sample_size = 64
    config.model.dit.dtype = dtype
    ldm_task.resolve_config(config)
    task = ldm_task.make_ldm_task(config)
    iterator = ldm_pipeline.make_train_iter(config)(0, 1)
    return config, task, [next(iterator) for _ in range(STEPS)]


def vae_setup(dtype):
    config = fx.tiny_config(3)
    config.model.t5.dtype = dtype
    config.data.batch_size = 16
    iterator = vae_pipeline.make_train_iter(config)(0, 1)
    return config, vae_task.vae_task(config), [next(iterator) for _ in range(STEPS)]


def train(config, task, batches):
    """``STEPS`` steps of the trainer's step on one device: (losses, final state)."""
    compiled = mh.compiled_step(task, config, mh.mesh(1, 1), batches[0])
    losses = [compiled.run(batch)["train/loss"] for batch in batches]
    return losses, compiled.state


def assert_tracks_float32(setup):
    (losses32, state32), (losses16, state16) = (train(*setup(d)) for d in ("float32", "bfloat16"))
    print("float32 losses", np.round(losses32, 5), "\nbfloat16 losses", np.round(losses16, 5))
    np.testing.assert_allclose(losses16, losses32, rtol=LOSS_RTOL)
    assert losses32[-1] < losses32[0] and losses16[-1] < losses16[0]
    assert losses16 != losses32  # the bf16 run really computed in bf16
    # Weights, Adam moments, step and key: float32 (or integer) whatever the compute dtype.
    for leaf32, leaf16 in zip(jax.tree.leaves(state32), jax.tree.leaves(state16)):
        assert leaf16.dtype == leaf32.dtype and leaf16.dtype != BF16
    return state16


def test_ldm_bf16_training_tracks_float32(latent_dir):
    assert_tracks_float32(lambda dtype: ldm_setup(latent_dir, dtype))


def test_vae_bf16_training_tracks_float32():
    assert_tracks_float32(vae_setup)


def _walk(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _walk(inner)


def step_equations(config, task, batch):
    """Every equation (nested ones included) of the trainer's train step, and its outputs."""
    tx, lr_fn = optim.make_optimizer(config.optim, STEPS)
    state = jax.eval_shape(lambda b: trainer.init_train_state(task, tx, 0, b), batch)
    closed = jax.make_jaxpr(trainer.make_train_step(task, tx, lr_fn))(state, batch, None)
    return list(_walk(closed.jaxpr)), closed.out_avals


def out_dtypes(eqns, primitive: str, shape=None) -> set:
    return {
        v.aval.dtype
        for e in eqns
        if e.primitive.name == primitive
        for v in e.outvars
        if shape is None or v.aval.shape == shape
    }


def dot_operand_dtypes(eqns) -> list[tuple]:
    return [
        tuple(v.aval.dtype for v in e.invars) for e in eqns if e.primitive.name == "dot_general"
    ]


def test_ldm_bf16_step_keeps_time_features_norms_softmax_stream_and_loss_float32(latent_dir):
    config, task, batches = ldm_setup(latent_dir, "bfloat16")
    eqns, outs = step_equations(config, task, batches[0])
    batch, length = batches[0]["latents"].shape[:2]
    inner = config.model.dit.num_attention_heads * config.model.dit.attention_head_dim
    dots = dot_operand_dtypes(eqns)
    assert (BF16, BF16) in dots  # the linear layers run in bf16 (forward and backward)
    assert out_dtypes(eqns, "cos") == out_dtypes(eqns, "sin") == {F32}  # Fourier features
    assert out_dtypes(eqns, "rsqrt") == {F32}  # layer norms
    assert out_dtypes(eqns, "exp") == {F32}  # softmax
    assert out_dtypes(eqns, "add", (batch, length + 1, inner)) == {F32}  # residual stream
    assert out_dtypes(eqns, "sub", (batch, length, 64)) == {F32}  # predicted - true noise
    # bool: the step's all-finite flag (the non-finite guard).
    assert {a.dtype for a in outs} == {F32, jnp.dtype(jnp.int32), jnp.dtype(jnp.uint32), BOOL}


def test_vae_bf16_step_keeps_norms_logits_loss_and_latent_head_float32():
    config, task, batches = vae_setup("bfloat16")
    eqns, outs = step_equations(config, task, batches[0])
    batch, length = batches[0]["input_ids"].shape
    t5 = config.model.t5
    dots = dot_operand_dtypes(eqns)
    assert (BF16, BF16) in dots
    # The latent head (LayerNorm -> proj -> z -> post_proj) runs on float32 operands.
    width = config.model.n_query_tokens * t5.d_model
    head = [
        e for e in eqns if e.primitive.name == "dot_general" and width in e.invars[1].aval.shape
    ]
    assert head and {v.aval.dtype for e in head for v in e.invars} == {F32}
    assert out_dtypes(eqns, "rsqrt") == {F32}  # RMS and layer norms
    assert out_dtypes(eqns, "exp") == {F32}  # softmax, log-softmax, KL
    assert out_dtypes(eqns, "log") <= {F32}
    logits = (batch * length, t5.vocab_size)  # layers.dense: one 2-D matmul
    assert out_dtypes(eqns, "dot_general", logits) == {F32}  # bf16 operands, float32 logits
    assert out_dtypes(eqns, "add", (batch, length, t5.d_model)) == {F32}  # residual stream
    # bool: the step's all-finite flag (the non-finite guard).
    assert {a.dtype for a in outs} == {F32, jnp.dtype(jnp.int32), jnp.dtype(jnp.uint32), BOOL}
