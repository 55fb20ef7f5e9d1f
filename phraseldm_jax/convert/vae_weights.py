"""PhraseVAE weights: the original PyTorch state dict <-> our params pytree (numpy only).

The original keys (SPEC section 6, FACTS 1.8) are ``<prefix>t5.<Hugging Face T5 keys>`` plus,
for the VAE head, ``<prefix>proj.*``, ``<prefix>post_proj.*`` and ``<prefix>layer_norm.*``;
the prefix is ``model.`` both in the hub folders and in Lightning checkpoints. PyTorch Linear
weights are [out, in] and are transposed into flax kernels [in, out]. The tied embedding may be
stored under any of its four aliases (safetensors keeps one); all that are present must agree.

Pass tensors as numpy arrays (e.g. ``safetensors.numpy.load_file`` or ``t.numpy()``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from phraseldm_jax import t5 as t5_lib
from phraseldm_jax import vae as vae_lib
from phraseldm_jax.errors import CheckpointMismatchError

# Every name under which PyTorch holds the one tied embedding.
TIED_EMBEDDING_KEYS = (
    "t5.shared.weight",
    "t5.encoder.embed_tokens.weight",
    "t5.decoder.embed_tokens.weight",
    "t5.lm_head.weight",
)
# Unused VQ parts of the stage 1-2 models (FACTS 1.3, 1.8): skipped, as the original's loaders do.
DEFAULT_IGNORED_PREFIXES = ("vq.", "pre_vq_proj.")

_ATTENTION = ("q", "k", "v", "o")


def _key_map(config: vae_lib.PhraseVAEConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    """(state-dict key without prefix, params path, is a Linear weight to transpose)."""
    c = config.t5
    entries = [(TIED_EMBEDDING_KEYS[0], ("t5", "shared", "embedding"), False)]
    for stack, num_layers in (("encoder", c.num_layers), ("decoder", c.num_decoder_layers)):
        root = ("t5", stack)
        entries.append(
            (
                f"t5.{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                (*root, "relative_position_bias", "embedding"),
                False,
            )
        )
        for i in range(num_layers):
            torch_block = f"t5.{stack}.block.{i}.layer"
            block = (*root, f"blocks_{i}")
            sublayers = [("0", "SelfAttention", "self_attention")]
            if stack == "decoder":
                sublayers.append(("1", "EncDecAttention", "cross_attention"))
            for index, torch_name, name in sublayers:
                for proj in _ATTENTION:
                    entries.append(
                        (
                            f"{torch_block}.{index}.{torch_name}.{proj}.weight",
                            (*block, name, proj, "kernel"),
                            True,
                        )
                    )
                entries.append(
                    (
                        f"{torch_block}.{index}.layer_norm.weight",
                        (*block, f"{name}_norm", "scale"),
                        False,
                    )
                )
            ff = str(len(sublayers))
            for proj in ("wi", "wo"):
                entries.append(
                    (
                        f"{torch_block}.{ff}.DenseReluDense.{proj}.weight",
                        (*block, "mlp", proj, "kernel"),
                        True,
                    )
                )
            entries.append(
                (f"{torch_block}.{ff}.layer_norm.weight", (*block, "mlp_norm", "scale"), False)
            )
        entries.append(
            (f"t5.{stack}.final_layer_norm.weight", (*root, "final_layer_norm", "scale"), False)
        )
    if config.head == "vae":
        entries += [
            ("layer_norm.weight", ("layer_norm", "scale"), False),
            ("layer_norm.bias", ("layer_norm", "bias"), False),
            ("proj.weight", ("proj", "kernel"), True),
            ("proj.bias", ("proj", "bias"), False),
            ("post_proj.weight", ("post_proj", "kernel"), True),
            ("post_proj.bias", ("post_proj", "bias"), False),
        ]
    return entries


def _param_shapes(config: vae_lib.PhraseVAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    abstract = jax.eval_shape(lambda rng: vae_lib.init_params(rng, config), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return None
        tree = tree[name]
    return tree


def _as_float32(key: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"state dict entry {key!r} has dtype {array.dtype}, expected floats")
    return array.astype(np.float32)


def vae_params_from_state_dict(
    state_dict: Mapping[str, Any],
    config: vae_lib.PhraseVAEConfig,
    prefix: str = "model.",
    ignored_prefixes: Iterable[str] = DEFAULT_IGNORED_PREFIXES,
) -> dict[str, Any]:
    """Our params pytree (float32 numpy arrays) from an original PhraseVAE state dict.

    Args:
      state_dict: key -> array, keys ``<prefix>t5.…``, ``<prefix>proj.…``, ...
      config: the model the weights must fit (see ``infer_vae_config``).
      prefix: prefix of every key ("model." for hub folders and Lightning checkpoints).
      ignored_prefixes: keys (after ``prefix``) starting with these are skipped.
    Raises:
      CheckpointMismatchError: listing every missing key, unexpected key and shape mismatch.
      ValueError: tied-embedding aliases with different values, or non-float tensors.
    """
    ignored = tuple(ignored_prefixes)
    stripped: dict[str, Any] = {}
    unexpected = []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            unexpected.append(key)
        elif not key[len(prefix) :].startswith(ignored):
            stripped[key[len(prefix) :]] = value

    aliases = [k for k in TIED_EMBEDDING_KEYS if k in stripped]
    for alias in aliases[1:]:
        if not np.array_equal(np.asarray(stripped[alias]), np.asarray(stripped[aliases[0]])):
            raise ValueError(
                f"tied embedding {prefix}{alias} differs from {prefix}{aliases[0]}: "
                "PhraseVAE's input and output embeddings must be tied"
            )
    if aliases:
        stripped[TIED_EMBEDDING_KEYS[0]] = stripped[aliases[0]]

    shapes = _param_shapes(config)
    params: dict[str, Any] = {}
    missing, mismatched, used = [], [], set(TIED_EMBEDDING_KEYS)
    for key, path, transpose in _key_map(config):
        used.add(key)
        if key not in stripped:
            alias_note = " (or another tied alias)" if key == TIED_EMBEDDING_KEYS[0] else ""
            missing.append(prefix + key + alias_note)
            continue
        array = _as_float32(prefix + key, stripped[key])
        expected = shapes[path][::-1] if transpose else shapes[path]
        if array.shape != expected:
            mismatched.append((prefix + key, expected, array.shape))
            continue
        _set(params, path, np.ascontiguousarray(array.T) if transpose else array)
    unexpected += [prefix + k for k in stripped if k not in used]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"PhraseVAE state dict (head {config.head!r})", missing, unexpected, mismatched
        )
    return params


def vae_state_dict_from_params(
    params: Mapping[str, Any],
    config: vae_lib.PhraseVAEConfig,
    prefix: str = "model.",
    tied_embedding_keys: Iterable[str] = TIED_EMBEDDING_KEYS,
) -> dict[str, np.ndarray]:
    """The original's state dict (float32 numpy, PyTorch [out, in] Linear weights) from our params.

    Args:
      tied_embedding_keys: aliases written for the tied embedding. All four (the default) is what
        PyTorch's ``state_dict()`` holds and what ``load_state_dict(strict=True)`` expects; pass
        ``TIED_EMBEDDING_KEYS[:1]`` for the safetensors layout that keeps one.
    Raises:
      CheckpointMismatchError: params missing, extra or of the wrong shape for ``config``.
    """
    shapes = _param_shapes(config)
    given = jax.tree_util.tree_flatten_with_path(params)[0]
    given_paths = {tuple(getattr(k, "key", k) for k in path) for path, _ in given}
    missing = ["/".join(p) for p in shapes if p not in given_paths]
    unexpected = ["/".join(p) for p in given_paths if p not in shapes]
    mismatched = []
    state_dict: dict[str, np.ndarray] = {}
    for key, path, transpose in _key_map(config):
        value = _get(params, path)
        if value is None:
            continue
        array = np.asarray(value, dtype=np.float32)
        if array.shape != shapes[path]:
            mismatched.append(("/".join(path), shapes[path], array.shape))
            continue
        array = np.ascontiguousarray(array.T) if transpose else array.copy()
        if key == TIED_EMBEDDING_KEYS[0]:
            for alias in tied_embedding_keys:
                state_dict[prefix + alias] = array
        else:
            state_dict[prefix + key] = array
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"PhraseVAE params (head {config.head!r})", missing, unexpected, mismatched
        )
    return state_dict


def _head_from_original(original_config: Mapping[str, Any], has_vae_head: bool) -> str:
    if has_vae_head:
        return "vae"
    style = original_config.get("compress_style")
    if style == "full_sequence":
        return "full_sequence"
    if style in ("first_n_tokens", None):
        return "query"
    raise ValueError(f"config.json: unknown compress_style {style!r}")


def infer_vae_config(
    state_dict: Mapping[str, Any],
    original_config: Mapping[str, Any] | None = None,
    prefix: str = "model.",
    dtype: str = "float32",
) -> vae_lib.PhraseVAEConfig:
    """A ``PhraseVAEConfig`` from a state dict's shapes and the original ``config.json``.

    Sizes come from the tensors; ``t5_config`` supplies what shapes cannot tell (dropout_rate,
    layer_norm_epsilon, relative_attention_max_distance) and must agree with them. The head is
    "vae" when ``proj.weight`` is present, else from ``compress_style`` ("full_sequence" or
    "first_n_tokens" -> "query"; "query" when unknown).

    Args:
      original_config: the original ``config.json`` dict (with ``t5_config``), or None.
    Raises:
      CheckpointMismatchError: a tensor needed to infer a size is missing.
      ValueError: shapes disagree with ``t5_config`` / ``n_compress_tokens`` / ``bottleneck_dim``,
        or ``t5_config`` asks for something PhraseVAE does not have (gated FFN, untied embedding).
    """
    original = dict(original_config or {})
    t5_json = dict(original.get("t5_config") or {})
    if t5_json.get("feed_forward_proj", "relu") != "relu":
        raise ValueError(
            f"config.json: feed_forward_proj {t5_json['feed_forward_proj']!r} is not supported "
            "(PhraseVAE uses relu)"
        )
    if t5_json.get("tie_word_embeddings", True) is False:
        raise ValueError("config.json: untied word embeddings are not supported")

    def shape(key: str) -> tuple[int, ...] | None:
        value = state_dict.get(prefix + key)
        return None if value is None else tuple(np.shape(value))

    embedding = next((shape(k) for k in TIED_EMBEDDING_KEYS if shape(k) is not None), None)
    needed = {
        "enc_q": "t5.encoder.block.0.layer.0.SelfAttention.q.weight",
        "bias": "t5.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "wi": "t5.encoder.block.0.layer.1.DenseReluDense.wi.weight",
    }
    found = {name: shape(key) for name, key in needed.items()}
    missing = [prefix + key for name, key in needed.items() if found[name] is None]
    if embedding is None:
        missing.append(prefix + TIED_EMBEDDING_KEYS[0] + " (or another tied alias)")
    if missing:
        raise CheckpointMismatchError("PhraseVAE state dict: cannot infer the config", missing)

    vocab_size, d_model = embedding
    inner = found["enc_q"][0]
    num_buckets, num_heads = found["bias"]
    block_ids = {
        stack: {
            int(m.group(1))
            for k in state_dict
            if (m := re.match(re.escape(f"{prefix}t5.{stack}.block.") + r"(\d+)\.", k))
        }
        for stack in ("encoder", "decoder")
    }
    inferred = dict(
        d_model=d_model,
        d_ff=found["wi"][0],
        d_kv=inner // num_heads,
        num_heads=num_heads,
        num_layers=max(block_ids["encoder"]) + 1,
        num_decoder_layers=max(block_ids["decoder"], default=-1) + 1,
        vocab_size=vocab_size,
        relative_attention_num_buckets=num_buckets,
    )
    # config.json spells the decoder depth as num_layers when num_decoder_layers is absent.
    stated = dict(t5_json)
    if "num_layers" in stated:
        stated.setdefault("num_decoder_layers", stated["num_layers"])
    conflicts = [
        f"t5_config.{name}={stated[name]} but the tensors say {value}"
        for name, value in inferred.items()
        if name in stated and stated[name] is not None and int(stated[name]) != value
    ]

    has_vae_head = shape("proj.weight") is not None
    head = _head_from_original(original, has_vae_head)
    n_query = int(original.get("n_compress_tokens", 4))
    latent_dim = int(original.get("bottleneck_dim", 64))
    if has_vae_head:
        post_proj = shape("post_proj.weight")
        if post_proj is None:
            raise CheckpointMismatchError(
                "PhraseVAE state dict: cannot infer the config", [prefix + "post_proj.weight"]
            )
        inferred_latent, inferred_query = post_proj[1], post_proj[0] // d_model
        for name, stated_value, value in (
            ("n_compress_tokens", original.get("n_compress_tokens"), inferred_query),
            ("bottleneck_dim", original.get("bottleneck_dim"), inferred_latent),
        ):
            if stated_value is not None and int(stated_value) != value:
                conflicts.append(f"{name}={stated_value} but the tensors say {value}")
        n_query, latent_dim = inferred_query, inferred_latent
    if conflicts:
        raise ValueError(
            "PhraseVAE config.json disagrees with the state dict: " + "; ".join(conflicts)
        )
    t5_config = t5_lib.T5Config(
        **inferred,
        relative_attention_max_distance=int(t5_json.get("relative_attention_max_distance", 128)),
        dropout_rate=float(t5_json.get("dropout_rate", 0.1)),
        layer_norm_epsilon=float(t5_json.get("layer_norm_epsilon", 1e-6)),
        dtype=dtype,
    )
    return vae_lib.PhraseVAEConfig(
        t5=t5_config, head=head, n_query_tokens=n_query, latent_dim=latent_dim
    )
