"""Original PhraseLDM checkpoints (Hugging Face layout) <-> our PhraseLDM parameters.

The original ``PhraseLDM`` (a ``PyTorchModelHubMixin``) stores ``config.json`` (its constructor
arguments) and ``model.safetensors`` with keys (SPEC section 6):

- ``ldm.<diffusers StableAudioDiTModel keys>`` (channels-first convolutions, torch Linear
  weights [out, in]);
- ``length_encoder.length_embedding.weight`` when ``length_control``;
- ``sec_encoder.{type_embed,len_embed}.weight`` and ``sec_encoder.sec_encoder.layers.{i}.*``
  (torch ``nn.TransformerEncoderLayer``, q/k/v packed in ``in_proj_weight``) when
  ``sec_control``.

One table (``weight_table``) lists every tensor with its shape and how it maps to ours; both
directions read it, so ``params -> state dict -> params`` is exact. Fused weights of ours
(self-attention q/k/v, cross-attention k/v) are the transposed torch weights concatenated
along the output axis.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from phraseldm_jax import diffusion, fileio
from phraseldm_jax.dit import DiTConfig
from phraseldm_jax.errors import CheckpointMismatchError
from phraseldm_jax.ldm import PhraseLDMConfig

# A config.json group of ours, outside the original's constructor arguments (HF_CONFIG_KEYS;
# our reader skips "_" keys): how the weights are sampled and attend to sections where that
# is not the original's convention, so that an exported model samples the same songs when
# read back.
CONVENTIONS_KEY = "_phraseldm_jax"
ORIGINAL_CONVENTIONS = {
    "clip": "reference",
    "cross_bias_mode": "additive",
    "prediction_type": "epsilon",
}

HF_CONFIG_KEYS = (
    "model_config",
    "scale_factor",
    "diffusion_steps",
    "clip_range",
    "length_control",
    "length_bucket_size",
    "sec_control",
)


@dataclasses.dataclass(frozen=True)
class WeightEntry:
    """One of our arrays and the torch tensor(s) it comes from.

    kind: ``"linear"`` (ours = concat of the transposed torch weights along axis 1),
    ``"conv1x1"`` (ours = weight[:, :, 0].T) or ``"copy"``."""

    ours: tuple[str, ...]
    torch_keys: tuple[str, ...]
    torch_shapes: tuple[tuple[int, ...], ...]
    kind: str

    @property
    def our_shape(self) -> tuple[int, ...]:
        if self.kind == "copy":
            return self.torch_shapes[0]
        if self.kind == "conv1x1":
            out_dim, in_dim, _ = self.torch_shapes[0]
            return (in_dim, out_dim)
        return (self.torch_shapes[0][1], sum(s[0] for s in self.torch_shapes))

    def to_ours(self, tensors: list[np.ndarray]) -> np.ndarray:
        if self.kind == "copy":
            return tensors[0]
        if self.kind == "conv1x1":
            return tensors[0][:, :, 0].T
        return np.concatenate([w.T for w in tensors], axis=1)

    def to_torch(self, value: np.ndarray) -> list[np.ndarray]:
        if self.kind == "copy":
            return [value]
        if self.kind == "conv1x1":
            return [value.T[:, :, None]]
        splits = np.cumsum([s[0] for s in self.torch_shapes])[:-1]
        return [part.T for part in np.split(value, splits, axis=1)]


def _linear(ours, keys, shapes):
    return WeightEntry(tuple(ours), tuple(keys), tuple(tuple(s) for s in shapes), "linear")


def _copy(ours, key, shape):
    return WeightEntry(tuple(ours), (key,), (tuple(shape),), "copy")


def _dit_table(cfg: DiTConfig, prefix: str) -> list[WeightEntry]:
    d, tp, dg = cfg.inner_dim, cfg.time_proj_dim, cfg.global_states_input_dim
    cin, cc, cout = cfg.cross_attention_input_dim, cfg.cross_attention_dim, cfg.out_channels
    kv = cfg.num_key_value_attention_heads * cfg.attention_head_dim
    ff = 4 * d
    root = ("dit",)
    table = [
        _copy(root + ("time_proj", "weight"), prefix + "time_proj.weight", (tp // 2,)),
        _linear(root + ("timestep_proj", "dense_in", "kernel"), [prefix + "timestep_proj.0.weight"], [(d, tp)]),
        _copy(root + ("timestep_proj", "dense_in", "bias"), prefix + "timestep_proj.0.bias", (d,)),
        _linear(root + ("timestep_proj", "dense_out", "kernel"), [prefix + "timestep_proj.2.weight"], [(d, d)]),
        _copy(root + ("timestep_proj", "dense_out", "bias"), prefix + "timestep_proj.2.bias", (d,)),
        _linear(root + ("global_proj", "dense_in", "kernel"), [prefix + "global_proj.0.weight"], [(d, dg)]),
        _linear(root + ("global_proj", "dense_out", "kernel"), [prefix + "global_proj.2.weight"], [(d, d)]),
        _linear(root + ("cross_attention_proj", "dense_in", "kernel"), [prefix + "cross_attention_proj.0.weight"], [(cc, cin)]),
        _linear(root + ("cross_attention_proj", "dense_out", "kernel"), [prefix + "cross_attention_proj.2.weight"], [(cc, cc)]),
        WeightEntry(root + ("preprocess_conv", "kernel"), (prefix + "preprocess_conv.weight",), ((cfg.in_channels, cfg.in_channels, 1),), "conv1x1"),
        _linear(root + ("proj_in", "kernel"), [prefix + "proj_in.weight"], [(d, cfg.in_channels)]),
        _linear(root + ("proj_out", "kernel"), [prefix + "proj_out.weight"], [(cout, d)]),
        WeightEntry(root + ("postprocess_conv", "kernel"), (prefix + "postprocess_conv.weight",), ((cout, cout, 1),), "conv1x1"),
    ]  # fmt: skip
    for i in range(cfg.num_layers):
        ours, theirs = root + (f"transformer_blocks_{i}",), f"{prefix}transformer_blocks.{i}."
        for norm in ("norm1", "norm2", "norm3"):
            table.append(_copy(ours + (norm, "scale"), f"{theirs}{norm}.weight", (d,)))
            table.append(_copy(ours + (norm, "bias"), f"{theirs}{norm}.bias", (d,)))
        qkv = [f"{theirs}attn1.to_{n}.weight" for n in "qkv"]
        table += [
            _linear(ours + ("attn1", "qkv", "kernel"), qkv, [(d, d)] * 3),
            _linear(ours + ("attn1", "out", "kernel"), [f"{theirs}attn1.to_out.0.weight"], [(d, d)]),
            _linear(ours + ("attn2", "query", "kernel"), [f"{theirs}attn2.to_q.weight"], [(d, d)]),
            _linear(ours + ("attn2", "key_value", "kernel"), [f"{theirs}attn2.to_k.weight", f"{theirs}attn2.to_v.weight"], [(kv, cc)] * 2),
            _linear(ours + ("attn2", "out", "kernel"), [f"{theirs}attn2.to_out.0.weight"], [(d, d)]),
            _linear(ours + ("ff", "proj_in", "kernel"), [f"{theirs}ff.net.0.proj.weight"], [(2 * ff, d)]),
            _copy(ours + ("ff", "proj_in", "bias"), f"{theirs}ff.net.0.proj.bias", (2 * ff,)),
            _linear(ours + ("ff", "proj_out", "kernel"), [f"{theirs}ff.net.2.weight"], [(d, ff)]),
            _copy(ours + ("ff", "proj_out", "bias"), f"{theirs}ff.net.2.bias", (d,)),
        ]  # fmt: skip
    return table


def _section_table(c: int, num_layers: int, prefix: str) -> list[WeightEntry]:
    root = ("sec_encoder",)
    table = [
        _copy(root + ("type_embed",), prefix + "type_embed.weight", (12, c // 2)),
        _copy(root + ("len_embed",), prefix + "len_embed.weight", (33, c // 2)),
    ]
    for i in range(num_layers):
        ours, theirs = root + (f"layers_{i}",), f"{prefix}sec_encoder.layers.{i}."
        table += [
            _linear(ours + ("qkv", "kernel"), [f"{theirs}self_attn.in_proj_weight"], [(3 * c, c)]),
            _copy(ours + ("qkv", "bias"), f"{theirs}self_attn.in_proj_bias", (3 * c,)),
            _linear(ours + ("out", "kernel"), [f"{theirs}self_attn.out_proj.weight"], [(c, c)]),
            _copy(ours + ("out", "bias"), f"{theirs}self_attn.out_proj.bias", (c,)),
            _linear(ours + ("linear1", "kernel"), [f"{theirs}linear1.weight"], [(4 * c, c)]),
            _copy(ours + ("linear1", "bias"), f"{theirs}linear1.bias", (4 * c,)),
            _linear(ours + ("linear2", "kernel"), [f"{theirs}linear2.weight"], [(c, 4 * c)]),
            _copy(ours + ("linear2", "bias"), f"{theirs}linear2.bias", (c,)),
        ]
        for norm in ("norm1", "norm2"):
            table.append(_copy(ours + (norm, "scale"), f"{theirs}{norm}.weight", (c,)))
            table.append(_copy(ours + (norm, "bias"), f"{theirs}{norm}.bias", (c,)))
    return table


def weight_table(config: PhraseLDMConfig) -> list[WeightEntry]:
    """Every tensor of a PhraseLDM checkpoint with ``config``, in a fixed order."""
    table = _dit_table(config.dit, "ldm.")
    if config.length_control:
        shape = (config.num_length_buckets, config.dit.global_states_input_dim)
        table.append(
            _copy(("length_encoder", "embedding"), "length_encoder.length_embedding.weight", shape)
        )
    if config.sec_control:
        table += _section_table(config.dit.cross_attention_input_dim, 3, "sec_encoder.")
    return table


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array-like as a float32 numpy array (bfloat16 tensors upcast first)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.dtype.itemsize < 4:
            value = value.float()
        value = value.numpy()
    return np.asarray(value, dtype=np.float32)


def ldm_params_from_state_dict(
    state_dict: Mapping[str, Any], config: PhraseLDMConfig
) -> dict[str, Any]:
    """Our parameters (nested dict of float32 numpy arrays, the ``"params"`` collection of
    ``ldm.PhraseLDM(config)``) from an original HF-layout state dict (torch tensors or arrays).

    Raises CheckpointMismatchError listing every missing key, extra key and shape mismatch."""
    table = weight_table(config)
    expected = {k: s for e in table for k, s in zip(e.torch_keys, e.torch_shapes)}
    present = set(state_dict)
    mismatches = [
        (k, expected[k], tuple(state_dict[k].shape))
        for k in sorted(present & expected.keys())
        if tuple(state_dict[k].shape) != expected[k]
    ]
    error = CheckpointMismatchError(
        "PhraseLDM state dict", expected.keys() - present, present - expected.keys(), mismatches
    )
    if error.any:
        raise error
    params: dict[str, Any] = {}
    for entry in table:
        value = entry.to_ours([_to_numpy(state_dict[k]) for k in entry.torch_keys])
        node = params
        for name in entry.ours[:-1]:
            node = node.setdefault(name, {})
        node[entry.ours[-1]] = np.ascontiguousarray(value, dtype=np.float32)
    return params


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (str(name),)))
        else:
            flat[prefix + (str(name),)] = value
    return flat


def ldm_state_dict_from_params(
    params: Mapping[str, Any], config: PhraseLDMConfig
) -> dict[str, np.ndarray]:
    """The original HF-layout state dict (plain float32 numpy arrays) from our parameters.

    Raises CheckpointMismatchError (paths written ``dit/proj_in/kernel``) when ``params`` does
    not have exactly the arrays ``config`` implies."""
    if "params" in params and len(params) == 1:
        params = params["params"]
    table = weight_table(config)
    flat = _flatten(params)
    expected = {e.ours: e.our_shape for e in table}
    name = "/".join
    mismatches = [
        (name(p), expected[p], tuple(np.shape(flat[p])))
        for p in sorted(flat.keys() & expected.keys())
        if tuple(np.shape(flat[p])) != expected[p]
    ]
    error = CheckpointMismatchError(
        "PhraseLDM params",
        [name(p) for p in expected.keys() - flat.keys()],
        [name(p) for p in flat.keys() - expected.keys()],
        mismatches,
    )
    if error.any:
        raise error
    state_dict = {}
    for entry in table:
        parts = entry.to_torch(np.asarray(flat[entry.ours], dtype=np.float32))
        for key, part in zip(entry.torch_keys, parts):
            state_dict[key] = np.ascontiguousarray(part)
    return state_dict


# --------------------------------------------------------------------------------------------
# config.json


def ldm_config_from_hf_config(hf_config: Mapping[str, Any], **overrides) -> PhraseLDMConfig:
    """Our config from the original's ``config.json`` (its ``PhraseLDM`` constructor arguments).

    A missing ``model_config`` means the original's default (cross-attention widths 256 with
    sections, 128 without). Converted weights get ``cross_bias_mode="additive"`` (the
    reference's behaviour, unless the file's ``CONVENTIONS_KEY`` group records ours) and
    ``train_encoders=False``; ``overrides`` replace any field."""
    unknown = sorted(k for k in hf_config if k not in HF_CONFIG_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"PhraseLDM config.json: unknown keys {unknown}")
    sec_control = bool(hf_config.get("sec_control", False))
    model_config = hf_config.get("model_config")
    if model_config is None:
        width = 256 if sec_control else 128
        dit = DiTConfig(cross_attention_dim=width, cross_attention_input_dim=width)
    else:
        dit = DiTConfig.from_model_config(model_config)
    conventions = conventions_from_hf_config(hf_config)
    kwargs = dict(
        dit=dit,
        length_control=bool(hf_config.get("length_control", False)),
        sec_control=sec_control,
        length_bucket_size=int(hf_config.get("length_bucket_size", 10)),
        scale_factor=float(hf_config.get("scale_factor", PhraseLDMConfig.scale_factor)),
        clip_range=float(hf_config.get("clip_range", PhraseLDMConfig.clip_range)),
        diffusion_steps=int(hf_config.get("diffusion_steps", 1000)),
        cross_bias_mode=conventions["cross_bias_mode"],
        prediction_type=conventions["prediction_type"],
        train_encoders=False,
    )
    kwargs.update(overrides)
    return PhraseLDMConfig(**kwargs)


def conventions_from_hf_config(hf_config: Mapping[str, Any]) -> dict[str, str]:
    """``{"clip", "cross_bias_mode", "prediction_type"}`` of a PhraseLDM config.json: its
    ``CONVENTIONS_KEY`` group, else the original's (``clip="reference"``: the raw clip value
    applied to scaled latents; additive section bias; the DiT predicts the noise)."""
    group = hf_config.get(CONVENTIONS_KEY) or {}
    if not isinstance(group, Mapping):
        raise ValueError(f"{CONVENTIONS_KEY} must be an object, got {group!r}")
    conventions = {
        **ORIGINAL_CONVENTIONS,
        **{k: group[k] for k in ORIGINAL_CONVENTIONS if k in group},
    }
    clip = conventions["clip"]
    if clip not in diffusion.CLIP_MODES:
        raise ValueError(f"{CONVENTIONS_KEY}.clip must be one of {diffusion.CLIP_MODES}: {clip!r}")
    if conventions["prediction_type"] not in diffusion.PREDICTION_TYPES:
        raise ValueError(
            f"{CONVENTIONS_KEY}.prediction_type must be one of {diffusion.PREDICTION_TYPES}: "
            f"{conventions['prediction_type']!r}"
        )
    return conventions


def hf_config_from_ldm_config(config: PhraseLDMConfig, clip: str | None = None) -> dict[str, Any]:
    """The original's ``config.json`` contents for ``config``. Given ``clip`` (the mode the
    model samples with), a model whose clip or section bias is not the original's also gets a
    ``CONVENTIONS_KEY`` group; None writes the original's keys only (refused for a
    v_prediction model, which the original would sample as if it predicted the noise)."""
    extra = {}
    if clip is None and config.prediction_type != ORIGINAL_CONVENTIONS["prediction_type"]:
        raise ValueError(
            f"a {config.prediction_type} PhraseLDM needs its conventions group in config.json "
            "(pass its clip mode)"
        )
    if clip is not None:
        if clip not in diffusion.CLIP_MODES:
            raise ValueError(f"clip must be one of {diffusion.CLIP_MODES}, got {clip!r}")
        conventions = {
            "clip": clip,
            "cross_bias_mode": config.cross_bias_mode,
            "prediction_type": config.prediction_type,
        }
        if conventions != ORIGINAL_CONVENTIONS:
            extra[CONVENTIONS_KEY] = conventions
    return {
        "model_config": config.dit.to_model_config(),
        "scale_factor": config.scale_factor,
        "diffusion_steps": config.diffusion_steps,
        "clip_range": config.clip_range,
        "length_control": config.length_control,
        "length_bucket_size": config.length_bucket_size,
        "sec_control": config.sec_control,
        **extra,
    }


def hf_state_dict_from_lightning(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Renames a Lightning training checkpoint's ``state_dict`` to the HF layout.

    ``model.*`` -> ``ldm.*``, ``length_embedding.*`` -> ``length_encoder.length_embedding.*``,
    ``sec_encoder.*`` unchanged; other keys (e.g. the unused ``inst_conf_encoder.*``) are
    dropped, as the original's ``from_lightning_ckpt`` does."""
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith("model."):
            renamed["ldm." + key[len("model.") :]] = value
        elif key.startswith("length_embedding."):
            renamed["length_encoder." + key] = value
        elif key.startswith("sec_encoder."):
            renamed[key] = value
    return renamed


# --------------------------------------------------------------------------------------------
# Folders: config.json + model.safetensors (needs the ``safetensors`` package, torch extra).


def load_hf_checkpoint(folder: str | os.PathLike, **overrides) -> tuple[PhraseLDMConfig, dict]:
    """Reads an original PhraseLDM folder; returns (config, params)."""
    from safetensors.numpy import load_file

    config_path = os.path.join(folder, "config.json")
    weights_path = os.path.join(folder, "model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"PhraseLDM checkpoint: {path} does not exist")
    with open(config_path) as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    config = ldm_config_from_hf_config(hf_config, **overrides)
    try:
        params = ldm_params_from_state_dict(load_file(weights_path), config)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(
            f"{weights_path}", err.missing, err.unexpected, err.shape_mismatches
        ) from None
    return config, params


def save_hf_checkpoint(
    folder: str | os.PathLike, params: Mapping, config: PhraseLDMConfig, clip: str | None = None
) -> None:
    """Writes ``config.json`` and ``model.safetensors`` in the original's layout (atomically);
    ``clip``: the clip mode to record (``hf_config_from_ldm_config``; None: none)."""
    from safetensors.numpy import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    state_dict = ldm_state_dict_from_params(params, config)
    fileio.atomic_write(
        os.path.join(folder, "model.safetensors"), lambda p: save_file(state_dict, p)
    )
    text = json.dumps(hf_config_from_ldm_config(config, clip), indent=2)
    fileio.write_text(os.path.join(folder, "config.json"), text)
