"""Cross-checks of the converter against PyTorch, through files on disk and the public API.

PyTorch references with the original's classes' constructors and keys (``torch_reference``:
transformers' T5ForConditionalGeneration, diffusers' StableAudioDiTModel, torch's
TransformerEncoder) get random weights at the paper's size and at a small size, and are saved
by ``PyTorchModelHubMixin.save_pretrained`` (config.json + model.safetensors via
``safetensors.torch``), exactly as the original's hub folders. We import those folders with
``import_phrase_vae`` / ``import_phrase_ldm`` and compare, in float32: the posterior mean and
logvar, teacher-forced logits, greedy tokens against ``generate``, the [INST] / [SEP] special
latents (FACTS section 3, mechanics only: no real weights here), noise predictions of the three
PhraseLDM variants with their conditions (section order fixed on both sides, given to us as the
original's ``sec_type_to_id`` / ``sec_len_to_id`` dicts), and one DDPM step. Then we export,
reload in PyTorch strictly and compare every tensor bitwise, and check that JAX -> PyTorch ->
JAX is bitwise. Run with ``-s`` to see the measured maxima and conversion times.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="cross-checks need the torch extra")
pytest.importorskip("transformers", reason="cross-checks need the torch extra")
pytest.importorskip("diffusers", reason="cross-checks need the torch extra")
pytest.importorskip("huggingface_hub", reason="cross-checks need the torch extra")

import safetensors.torch  # noqa: E402
import torch_reference as ref  # noqa: E402

from phraseldm_jax import diffusion  # noqa: E402
from phraseldm_jax.convert import api, original_layout, safetensors_io, vae_weights  # noqa: E402
from phraseldm_jax.vocab import BOS_ID, EOS_ID, INST_ID, QUERY_IDS, SEP_ID  # noqa: E402

pytestmark = pytest.mark.torch
TOLERANCE = 1e-4
# A scrambled section order, as one PyTorch process's set iteration gives (FACTS section 6).
TYPE_ORDER = ref.SEED0_TYPE_ORDER
LENGTH_ORDER = [9, 1, 8, 2, 3, 4, 5, 6, 7] + list(range(10, 33))
SONG_083_PLAN = "i-8 A-8 A-8 B-4 B-4 x-4 A-8 B-4 B-4 B-4 B-4 X-4"
OTHER_PLAN = "o-1 b-32 c-2 C-9 D-16 E-3 x-1"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with ref.one_torch_thread():
        yield


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _assert_torch_state_equal(got: torch.nn.Module, expected: torch.nn.Module):
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert got_state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        assert got_state[key].dtype == value.dtype, key
        assert torch.equal(got_state[key], value), key


def _assert_params_bitwise(a, b):
    flat_a, flat_b = _flat(a), _flat(b)
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_a.items():
        assert flat_b[key].dtype == value.dtype == np.float32, key
        np.testing.assert_array_equal(flat_b[key], value, err_msg=key)


def _flat(tree, prefix=""):
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{name}/"))
        else:
            out[prefix + name] = np.asarray(value)
    return out


def _same_files(ours: str, theirs: str):
    """Our export writes what PyTorchModelHubMixin writes: config.json, keys, tensors, metadata."""
    with (
        open(os.path.join(ours, "config.json")) as f,
        open(os.path.join(theirs, "config.json")) as g,
    ):
        assert json.load(f) == json.load(g)
    our_file, their_file = (os.path.join(d, "model.safetensors") for d in (ours, theirs))
    our_tensors = safetensors.torch.load_file(our_file)
    their_tensors = safetensors.torch.load_file(their_file)
    assert our_tensors.keys() == their_tensors.keys()
    for key, value in their_tensors.items():
        assert torch.equal(our_tensors[key], value), key
    assert safetensors_io.read_safetensors_metadata(our_file) == (
        safetensors_io.read_safetensors_metadata(their_file)
    )


# --------------------------------------------------------------------------------------------
# PhraseVAE


@dataclasses.dataclass
class VAECase:
    torch_model: ref.ReferencePhraseVAE
    folder: str
    loaded: api.LoadedPhraseVAE
    import_s: float


@pytest.fixture(scope="module")
def vae_case(tmp_path_factory):
    cases = {}

    def get(size: str) -> VAECase:
        if size not in cases:
            torch_model = ref.build_vae(size)
            folder = str(tmp_path_factory.mktemp(f"vae_{size}"))
            torch_model.save_pretrained(folder)
            start = time.perf_counter()
            loaded = api.import_phrase_vae(folder)
            cases[size] = VAECase(torch_model, folder, loaded, time.perf_counter() - start)
        return cases[size]

    return get


@pytest.mark.parametrize("size", ["paper", "small"])
def test_vae_posterior_logits_and_greedy_tokens_match(vae_case, size):
    case = vae_case(size)
    config = case.loaded.config
    if size == "paper":
        assert config.t5 == vae_weights.t5_lib.PAPER_T5 and config.latent_dim == 64
    ids, mask, decoder_ids = ref.encoder_inputs(batch=6, length=24)
    mean_t, logvar_t = case.torch_model.encode_numpy(ids, mask)
    mean, logvar = case.loaded.encode(ids, mask)
    z = mean_t + 0.5 * np.random.default_rng(2).normal(size=mean_t.shape).astype(np.float32)
    logits_t = case.torch_model.logits_numpy(z, decoder_ids)
    logits = case.loaded.decode_logits(z, decoder_ids)

    # Greedy: posterior means and random latents. The small decoder is deeper than its
    # encoder, which HF's generate cache cannot handle; uncached, it stops at 64 positions.
    asymmetric = config.t5.num_decoder_layers != config.t5.num_layers
    max_length = 64 if asymmetric else 128
    greedy_ids, greedy_mask, _ = ref.encoder_inputs(batch=6, seed=3)
    latents = np.concatenate(
        [
            case.torch_model.encode_numpy(greedy_ids, greedy_mask)[0],
            np.random.default_rng(4).normal(size=(2, config.latent_dim)).astype(np.float32),
        ]
    )
    tokens_t = case.torch_model.generate(latents, max_length, use_cache=not asymmetric)
    tokens = case.loaded.greedy_decode(latents, max_length=max_length)

    diffs = {
        "mean": _max_diff(mean, mean_t),
        "logvar": _max_diff(logvar, logvar_t),
        "logits": _max_diff(logits, logits_t),
    }
    stops = [list(row).index(EOS_ID) if EOS_ID in row else -1 for row in tokens_t]
    print(
        f"\n[vae {size}] max |ours - torch|: {diffs}; [EOS] at {stops}; import {case.import_s:.2f} s"
    )
    assert all(v <= TOLERANCE for v in diffs.values()), diffs
    assert np.abs(logits_t).max() > 1.0 and np.abs(mean_t).max() > 0.1  # not near-zero numbers
    np.testing.assert_array_equal(tokens, tokens_t)
    assert len(set(stops)) >= 3  # rows stop at different places (or run to the limit)


def test_special_latents_mechanics_match(vae_case):
    """FACTS section 3: the [INST] / [SEP] pad latents are the posterior means of
    ``[C0]..[C3] [BOS] [INST] [EOS]`` and ``... [SEP] [EOS]``. Without the real weights, check
    that both stacks give the same mean, logvar and greedy tokens for these inputs."""
    case = vae_case("paper")
    prefix = [*QUERY_IDS[:4], BOS_ID]
    ids = np.array([[*prefix, INST_ID, EOS_ID], [*prefix, SEP_ID, EOS_ID]])
    mask = np.ones_like(ids)
    mean_t, logvar_t = case.torch_model.encode_numpy(ids, mask)
    mean, logvar = case.loaded.encode(ids, mask)
    diffs = {"mean": _max_diff(mean, mean_t), "logvar": _max_diff(logvar, logvar_t)}
    print(f"\n[special latents, paper] max |ours - torch|: {diffs}")
    assert all(v <= TOLERANCE for v in diffs.values()), diffs
    assert _max_diff(mean[0], mean[1]) > 1e-2  # the two inputs give different latents
    np.testing.assert_array_equal(
        case.loaded.greedy_decode(mean, max_length=16),
        case.torch_model.generate(mean, max_length=16),
    )


@pytest.mark.parametrize("size", ["paper", "small"])
def test_vae_export_reloads_in_pytorch_and_round_trips_bitwise(vae_case, tmp_path, size):
    case = vae_case(size)
    start = time.perf_counter()
    api.export_phrase_vae(case.loaded, tmp_path / "ours")
    export_s = time.perf_counter() - start
    print(f"\n[vae {size}] import {case.import_s:.2f} s, export {export_s:.2f} s")
    _same_files(str(tmp_path / "ours"), case.folder)

    # The original's loading path (hub mixin, safetensors.torch.load_model, strict) ...
    reloaded = ref.ReferencePhraseVAE.from_pretrained(str(tmp_path / "ours"), strict=True)
    _assert_torch_state_equal(reloaded, case.torch_model)
    # ... and a plain strict load_state_dict with every tied alias spelled out.
    weights = str(tmp_path / "ours" / "model.safetensors")
    state = safetensors.torch.load_file(weights)
    kept = state["model.t5.decoder.embed_tokens.weight"]
    for alias in vae_weights.TIED_EMBEDDING_KEYS:
        state.setdefault("model." + alias, kept)
    fresh = ref.ReferencePhraseVAE(**ref.VAE_SIZES[size])
    fresh.load_state_dict(state, strict=True)
    _assert_torch_state_equal(fresh, case.torch_model)

    # JAX -> PyTorch -> JAX is bitwise.
    reloaded.save_pretrained(str(tmp_path / "torch_again"))
    again = api.import_phrase_vae(tmp_path / "torch_again")
    _assert_params_bitwise(case.loaded.params, again.params)
    assert again.config == case.loaded.config


# --------------------------------------------------------------------------------------------
# PhraseLDM


@dataclasses.dataclass
class LDMCase:
    torch_model: ref.ReferencePhraseLDM
    folder: str
    loaded: api.LoadedPhraseLDM
    import_s: float


def _model_config(size: str, sec_control: bool) -> dict:
    if size == "small":
        return ref.LDM_SMALL
    return ref.LDM_PAPER_SECTIONS if sec_control else ref.LDM_PAPER


@pytest.fixture(scope="module")
def ldm_case(tmp_path_factory):
    cases = {}

    def get(variant: str, size: str) -> LDMCase:
        if (variant, size) not in cases:
            length_control, sec_control = ref.LDM_VARIANTS[variant]
            model_config = _model_config(size, sec_control)
            torch_model = ref.build_ldm(model_config, length_control, sec_control)
            folder = str(tmp_path_factory.mktemp(f"ldm_{variant}_{size}"))
            torch_model.save_pretrained(folder)
            section_order = None
            if sec_control:  # the order both sides use, as the original's own dicts
                torch_model.set_section_order(TYPE_ORDER, LENGTH_ORDER)
                section_order = {
                    "sec_type_to_id": torch_model.sec_encoder.sec_type_to_id,
                    "sec_len_to_id": torch_model.sec_encoder.sec_len_to_id,
                }
            start = time.perf_counter()
            loaded = api.import_phrase_ldm(folder, section_order=section_order)
            cases[variant, size] = LDMCase(torch_model, folder, loaded, time.perf_counter() - start)
        return cases[variant, size]

    return get


def _ldm_inputs(case: LDMCase, length: int):
    config = case.loaded.config
    x = np.random.default_rng(0).normal(size=(2, length, config.dit.in_channels))
    kwargs = {}
    if config.length_control:
        kwargs["n_bars"] = np.array([64, 37])
    if config.sec_control:
        kwargs["sections"] = [SONG_083_PLAN, OTHER_PLAN]
    return x.astype(np.float32), np.array([999, 417]), kwargs


@pytest.mark.parametrize("size", ["paper", "small"])
@pytest.mark.parametrize("variant", list(ref.LDM_VARIANTS))
def test_ldm_noise_predictions_and_ddpm_step_match(ldm_case, variant, size):
    case = ldm_case(variant, size)
    config = case.loaded.config
    assert config.cross_bias_mode == "additive" and not config.train_encoders
    x, t, kwargs = _ldm_inputs(case, 512 if size == "paper" else 19)
    eps_t = case.torch_model.predict_noise(x, t, **kwargs)
    eps = case.loaded.predict_noise(x, t, **kwargs, dtype="float32")
    eps_diff = _max_diff(eps, eps_t)

    # One DDPM step of the original's scheduler (clip at clip_range) from each side's noise,
    # with the same step noise (diffusers draws it from the generator, row by row).
    scheduler = case.torch_model.scheduler()
    step_noise, prev_t = [], []
    for row in range(len(x)):
        out = scheduler.step(
            torch.from_numpy(eps_t[row : row + 1]),
            int(t[row]),
            torch.from_numpy(x[row : row + 1]),
            generator=torch.Generator().manual_seed(row),
        )
        prev_t.append(out.prev_sample.numpy()[0])
        step_noise.append(
            torch.randn(x[row : row + 1].shape, generator=torch.Generator().manual_seed(row))[0]
        )
    prev, _ = diffusion.ddpm_step(x, eps, t, np.stack(step_noise), clip_range=config.clip_range)
    step_diff = _max_diff(prev, np.stack(prev_t))
    print(
        f"\n[ldm {variant} {size}] max |ours - torch|: noise {eps_diff:.2e} (|noise| max "
        f"{np.abs(eps_t).max():.2f}), DDPM step {step_diff:.2e}; import {case.import_s:.2f} s"
    )
    assert eps.shape == x.shape and eps_diff <= TOLERANCE
    assert step_diff <= TOLERANCE
    assert _max_diff(eps[0], eps[1]) > 1e-2  # rows differ (timestep and conditions)


def test_section_order_matters_on_both_sides(ldm_case):
    """Same plan strings, torch with another order: the outputs differ, so the match above
    really depends on the order we were given."""
    case = ldm_case("seccond", "small")
    x, t, kwargs = _ldm_inputs(case, 19)
    torch_model = case.torch_model
    other = ref.build_ldm(ref.LDM_SMALL, True, True)  # same seed: same weights
    other.set_section_order(sorted(TYPE_ORDER), range(1, 33))
    _assert_torch_state_equal(other, torch_model)
    assert (
        _max_diff(other.predict_noise(x, t, **kwargs), case.loaded.predict_noise(x, t, **kwargs))
        > 1e-3
    )


@pytest.mark.parametrize("variant", list(ref.LDM_VARIANTS))
def test_ldm_export_reloads_in_pytorch_and_round_trips_bitwise(ldm_case, tmp_path, variant):
    case = ldm_case(variant, "paper")
    start = time.perf_counter()
    api.export_phrase_ldm(case.loaded, tmp_path / "ours")
    export_s = time.perf_counter() - start
    print(f"\n[ldm {variant} paper] import {case.import_s:.2f} s, export {export_s:.2f} s")
    reloaded = ref.ReferencePhraseLDM.from_pretrained(str(tmp_path / "ours"), strict=True)
    _assert_torch_state_equal(reloaded, case.torch_model)
    fresh = ref.ReferencePhraseLDM(**json.loads((tmp_path / "ours" / "config.json").read_text()))
    fresh.load_state_dict(safetensors.torch.load_file(tmp_path / "ours" / "model.safetensors"))
    _assert_torch_state_equal(fresh, case.torch_model)
    if case.loaded.config.sec_control:  # the order comes back in our metadata file
        order = json.loads((tmp_path / "ours" / original_layout.SECTION_VOCAB_JSON).read_text())
        assert order == {
            "sec_type_to_id": case.torch_model.sec_encoder.sec_type_to_id,
            "sec_len_to_id": case.torch_model.sec_encoder.sec_len_to_id,
        }
        os.remove(tmp_path / "ours" / original_layout.SECTION_VOCAB_JSON)
    _same_files(str(tmp_path / "ours"), case.folder)

    # JAX -> PyTorch -> JAX is bitwise (the section order travels in section_vocab.json).
    reloaded.save_pretrained(str(tmp_path / "torch_again"))
    again = api.import_phrase_ldm(tmp_path / "torch_again", section_order=case.loaded.section_vocab)
    _assert_params_bitwise(case.loaded.params, again.params)
    assert again.config == case.loaded.config
