"""Lightning ``.ckpt`` import (needs torch to unpickle): PhraseVAE stages 1-3 and PhraseLDM,
keys as the original's training modules hold them, against the same torch weights imported
from the Hugging Face layout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="reading .ckpt files needs the torch extra")
pytest.importorskip("transformers", reason="the references need the torch extra")
pytest.importorskip("diffusers", reason="the references need the torch extra")

import torch_reference as ref  # noqa: E402

from phraseldm_jax.cli import convert as cli  # noqa: E402
from phraseldm_jax.convert import api, lightning  # noqa: E402

pytestmark = pytest.mark.torch
SMALL_VAE = ref.VAE_SIZES["small"]
TYPE_ORDER, LENGTH_ORDER = ref.SEED0_TYPE_ORDER, [9, 1, 8, 2, 3, 4, 5, 6, 7, *range(10, 33)]


@dataclasses.dataclass
class TrainingRecipe:
    """A non-tensor object in ``hyper_parameters``: weights_only=True refuses to unpickle it."""

    name: str = "pop909"


def _flat(tree, prefix=""):
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{name}/"))
        else:
            out[prefix + name] = np.asarray(value)
    return out


def _assert_same(a, b):
    flat_a, flat_b = _flat(a), _flat(b)
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_a.items():
        np.testing.assert_array_equal(flat_b[key], value, err_msg=key)


def _save_ckpt(path, state_dict, hparams):
    torch.save(
        {
            "state_dict": dict(state_dict),
            "hyper_parameters": hparams,
            "epoch": 3,
            "global_step": 1200,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
        },
        path,
    )
    return str(path)


@pytest.fixture(scope="module")
def small_vae(tmp_path_factory):
    model = ref.build_vae("small")
    folder = tmp_path_factory.mktemp("vae_small")
    model.save_pretrained(folder)
    return model, api.import_phrase_vae(folder)


def test_stage3_vae_ckpt_matches_the_hub_folder(tmp_path, small_vae):
    torch_model, from_folder = small_vae
    hparams = {**SMALL_VAE, "compress_style": "first_n_tokens", "lr": 1e-4, "kl_weight": 0.01}
    # A Lightning state dict holds every tied alias (and bfloat16 / float16 would be upcast).
    path = _save_ckpt(tmp_path / "stage3.ckpt", torch_model.state_dict(), hparams)
    loaded = api.import_phrase_vae(path)
    assert loaded.config == from_folder.config and loaded.config.head == "vae"
    _assert_same(from_folder.params, loaded.params)
    assert loaded.original_config["t5_config"] == SMALL_VAE["t5_config"]
    ids, mask, _ = ref.encoder_inputs(batch=3, length=12)
    np.testing.assert_allclose(
        loaded.encode(ids, mask)[0], torch_model.encode_numpy(ids, mask)[0], atol=1e-5
    )


@pytest.mark.parametrize("stage, head", [(1, "full_sequence"), (2, "query")])
def test_stage1_and_stage2_ckpts_skip_the_unused_vq(tmp_path, small_vae, stage, head):
    torch_model, from_folder = small_vae
    state = {k: v for k, v in torch_model.state_dict().items() if k.startswith("model.t5.")}
    state["model.vq.embedding.weight"] = torch.zeros(512, 64).uniform_(-1 / 512, 1 / 512)
    if stage == 2:
        state["model.pre_vq_proj.weight"] = torch.randn(64, 64)
    hparams = {  # LitPhraseAE's arguments; stage 1 keeps its defaults (n_compress_tokens 0)
        "t5_model_name": None,
        "t5_config": SMALL_VAE["t5_config"],
        "compress_style": "full_sequence" if stage == 1 else "first_n_tokens",
        "n_compress_tokens": 0 if stage == 1 else 4,
        "quantize_enc_out": False,
        "lr_vq": 1e-3,
    }
    loaded = api.import_phrase_vae(_save_ckpt(tmp_path / f"stage{stage}.ckpt", state, hparams))
    assert loaded.config.head == head
    assert set(loaded.params) == {"t5"}
    _assert_same(from_folder.params["t5"], loaded.params["t5"])
    with pytest.raises(ValueError, match="needs head vae"):
        loaded.encode(*ref.encoder_inputs(batch=1, length=8)[:2])


def test_ldm_ckpt_maps_keys_as_the_original_and_matches_the_hub_folder(tmp_path):
    torch_model = ref.build_ldm(ref.LDM_SMALL, length_control=True, sec_control=True)
    torch_model.set_section_order(TYPE_ORDER, LENGTH_ORDER)
    order = {
        "sec_type_to_id": torch_model.sec_encoder.sec_type_to_id,
        "sec_len_to_id": torch_model.sec_encoder.sec_len_to_id,
    }
    torch_model.save_pretrained(tmp_path / "hub")
    from_folder = api.import_phrase_ldm(tmp_path / "hub", section_order=order)

    # LitPhraseLDM's attributes: model (the DiT), length_embedding, sec_encoder, and an unused
    # instrument-configuration encoder that the original's loader drops too.
    state = {f"model.{k}": v for k, v in torch_model.ldm.state_dict().items()}
    state["length_embedding.weight"] = torch_model.length_encoder.length_embedding.weight
    state.update({f"sec_encoder.{k}": v for k, v in torch_model.sec_encoder.state_dict().items()})
    state["inst_conf_encoder.inst_embed.weight"] = torch.randn(5, 32)
    hparams = {
        "model_config": ref.LDM_SMALL,
        "scale_factor": 0.75,
        "diffusion_steps": 1000,
        "clip_range": 3.0,
        "length_condition": True,
        "length_bucket_size": 10,
        "sec_condition": True,
        "mode": "phr",
        "lr": 5e-4,
    }
    path = _save_ckpt(tmp_path / "ldm.ckpt", state, hparams)
    loaded = api.import_phrase_ldm(path, section_order=order)
    assert loaded.config.length_control and loaded.config.sec_control
    assert (loaded.config.scale_factor, loaded.config.clip_range) == (0.75, 3.0)
    assert loaded.config.dit == from_folder.config.dit
    _assert_same(from_folder.params, loaded.params)
    x = np.random.default_rng(0).normal(size=(1, 8, 12)).astype(np.float32)
    kwargs = dict(n_bars=[40], sections=["i-4 A-8 x-9"])
    np.testing.assert_allclose(
        loaded.predict_noise(x, [300], **kwargs, dtype="float32"),
        torch_model.predict_noise(x, [300], **kwargs),
        atol=1e-5,
    )

    # Without the length condition the original never loads (or has) the length table.
    uncond = ref.build_ldm(ref.LDM_SMALL, length_control=False, sec_control=False)
    state = {f"model.{k}": v for k, v in uncond.ldm.state_dict().items()}
    path = _save_ckpt(tmp_path / "uncond.ckpt", state, {**hparams, "length_condition": False})
    loaded = api.import_phrase_ldm(path)
    assert not loaded.config.length_control and not loaded.config.sec_control
    assert set(loaded.params) == {"dit"}


def test_pickled_objects_need_trust(tmp_path, small_vae, capsys):
    torch_model, from_folder = small_vae
    hparams = {**SMALL_VAE, "recipe": TrainingRecipe()}
    path = _save_ckpt(tmp_path / "old.ckpt", torch_model.state_dict(), hparams)
    with pytest.raises(ValueError, match=r"old.ckpt: torch.load\(weights_only=True\) refused"):
        api.import_phrase_vae(path)
    _assert_same(from_folder.params, api.import_phrase_vae(path, trust_pickle=True).params)
    # The CLI says the same and exits with status 1; --trust_pickle converts.
    workdir = tmp_path / "workdir"
    argv = ["import", "--kind", "vae", "--src", path, "--workdir", str(workdir)]
    assert cli.main(argv) == 1
    assert "--trust_pickle" in capsys.readouterr().err
    assert cli.main([*argv, "--trust_pickle"]) == 0
    _assert_same(from_folder.params, api.load_workdir(workdir).params)


def test_files_that_are_not_lightning_checkpoints_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=r"plain.ckpt: not a Lightning checkpoint.*weights"):
        lightning.read_lightning_checkpoint(tmp_path / "plain.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.ckpt: not a readable PyTorch checkpoint"):
        api.import_phrase_ldm(tmp_path / "empty.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text.ckpt: torch.load\(weights_only=True\) refused"):
        api.import_phrase_ldm(tmp_path / "text.ckpt")
    torch.save({"state_dict": {"ldm.x": torch.zeros(1)}}, tmp_path / "keys.ckpt")
    with pytest.raises(ValueError, match="no 'model.\\*' tensors"):
        api.import_phrase_ldm(tmp_path / "keys.ckpt")
