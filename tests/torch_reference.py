"""PyTorch references of the original PhraseVAE and PhraseLDM, shared by the parity tests and
the converter cross-checks.

The module trees have the original's state-dict keys: ``ReferencePhraseVAE`` nests the stage-3
modules under ``model`` (``model.t5.<HF T5>``, ``model.layer_norm``, ``model.proj``,
``model.post_proj``) and ``ReferencePhraseLDM`` holds ``ldm`` (diffusers'
``StableAudioDiTModel``), ``length_encoder.length_embedding`` and ``sec_encoder`` (the original
SecEncoder's tensors). Both are ``PyTorchModelHubMixin`` classes whose constructors take the
original's arguments, so ``save_pretrained`` writes exactly the original's Hugging Face layout
(config.json + model.safetensors through ``safetensors.torch``) and ``from_pretrained`` reads
folders the same way the original does. Forward passes follow the original's wrapper
semantics (SPEC sections 4-5, FACTS section 6). Weights are random; ``build_*`` make them
"lively" so that a wrong mapping cannot hide behind default values.

Import this module only after ``pytest.importorskip("torch")``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import transformers
from diffusers import DDPMScheduler, StableAudioDiTModel
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from huggingface_hub import PyTorchModelHubMixin

from phraseldm_jax import vocab

TOKENIZER_REPO_ID = "LongshenOu/phrase-vae-tokenizer"
PAPER_T5 = dict(d_model=512, d_ff=1024, num_layers=3, num_heads=6)
# name -> the original PhraseVAE's config.json arguments.
VAE_SIZES = {
    "paper": dict(
        t5_config={**PAPER_T5, "vocab_size": 1000, "decoder_start_token_id": 1},
        n_compress_tokens=4,
        bottleneck_dim=64,
    ),
    # Deeper decoder than encoder, d_kv not d_model / heads: catches mix-ups of both.
    "small": dict(
        t5_config=dict(
            d_model=64,
            d_ff=96,
            d_kv=20,
            num_layers=2,
            num_decoder_layers=3,
            num_heads=4,
            vocab_size=1000,
            decoder_start_token_id=1,
        ),
        n_compress_tokens=4,
        bottleneck_dim=16,
    ),
}
LDM_PAPER = {
    "sample_size": 512,
    "in_channels": 64,
    "num_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 16,
    "num_key_value_attention_heads": 8,
    "out_channels": 64,
    "cross_attention_dim": 128,
    "time_proj_dim": 128,
    "global_states_input_dim": 128,
    "cross_attention_input_dim": 128,
}
LDM_PAPER_SECTIONS = {**LDM_PAPER, "cross_attention_dim": 256, "cross_attention_input_dim": 256}
LDM_SMALL = {
    "sample_size": 24,
    "in_channels": 12,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "num_key_value_attention_heads": 2,
    "out_channels": 12,
    "cross_attention_dim": 24,
    "time_proj_dim": 16,
    "global_states_input_dim": 20,
    "cross_attention_input_dim": 32,
}
LDM_VARIANTS = {  # name: (length_control, sec_control)
    "uncond": (False, False),
    "lencond": (True, False),
    "seccond": (True, True),
}
REFERENCE_SCALE_FACTOR = 0.7590118646621704
REFERENCE_CLIP_RANGE = 3.064450740814209
# One of the orders the original's set iteration produces (PYTHONHASHSEED=0, FACTS section 6).
SEED0_TYPE_ORDER = "xXAEbiBcDoC"


@contextlib.contextmanager
def one_torch_thread():
    """On a busy machine torch's thread pool oversubscribes the cores and slows these small
    models down; one thread avoids that."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every tensor of ``module.state_dict()`` as a numpy copy (tied aliases included)."""
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------
# PhraseVAE


class ReferenceVAEModules(torch.nn.Module):
    """The original stage-3 model (S2SVAE3): T5 plus LayerNorm -> proj -> (mean, logvar) on the
    four query states, and post_proj from z to the decoder's 4-vector memory."""

    def __init__(self, t5_config: dict, n_query_tokens: int, latent_dim: int):
        super().__init__()
        self.t5 = transformers.T5ForConditionalGeneration(
            transformers.T5Config(dropout_rate=0.1, **t5_config)
        )
        width = n_query_tokens * self.t5.config.d_model
        self.layer_norm = torch.nn.LayerNorm(width)
        self.proj = torch.nn.Linear(width, 2 * latent_dim)
        self.post_proj = torch.nn.Linear(latent_dim, width)
        self.n_query_tokens, self.latent_dim = n_query_tokens, latent_dim

    def encode(self, input_ids, attention_mask):
        """Posterior (mean, logvar) of [batch, length] inputs."""
        states = self.t5.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        flat = states[:, : self.n_query_tokens].reshape(states.shape[0], -1)
        stats = self.proj(self.layer_norm(flat))
        return stats[:, : self.latent_dim], stats[:, self.latent_dim :]

    def memory(self, z):
        return self.post_proj(z).reshape(z.shape[0], self.n_query_tokens, -1)

    def logits(self, z, decoder_input_ids):
        """Teacher-forced logits from latents (all 4 memory vectors visible)."""
        return self.t5(
            encoder_outputs=(self.memory(z),), decoder_input_ids=decoder_input_ids
        ).logits


class ReferencePhraseVAE(torch.nn.Module, PyTorchModelHubMixin):
    """The original hub class's constructor and key layout (``model.t5.*`` ...)."""

    def __init__(
        self,
        tokenizer_repo_id: str = TOKENIZER_REPO_ID,
        t5_config: dict | None = None,
        compress_style: str = "first_n_tokens",
        n_compress_tokens: int = 4,
        bottleneck_dim: int = 64,
        vocab_size: int = 1000,
    ):
        super().__init__()
        if t5_config is None:
            t5_config = {**PAPER_T5, "vocab_size": vocab_size, "decoder_start_token_id": 1}
        self.model = ReferenceVAEModules(t5_config, n_compress_tokens, bottleneck_dim)
        self.eval()

    def encode_numpy(self, input_ids, attention_mask):
        with torch.no_grad():
            mean, logvar = self.model.encode(
                torch.from_numpy(np.asarray(input_ids, np.int64)),
                torch.from_numpy(np.asarray(attention_mask, np.int64)),
            )
        return mean.numpy(), logvar.numpy()

    def logits_numpy(self, latents, decoder_input_ids):
        with torch.no_grad():
            return self.model.logits(
                torch.from_numpy(np.asarray(latents, np.float32)),
                torch.from_numpy(np.asarray(decoder_input_ids, np.int64)),
            ).numpy()

    def generate(self, latents, max_length: int = 128, use_cache: bool = True) -> np.ndarray:
        """HF greedy generation from latents with the original's settings, padded with [PAD]
        to [N, max_length] (generate stops early when every row has ended)."""
        with torch.no_grad():
            memory = self.model.memory(torch.from_numpy(np.asarray(latents, np.float32)))
            out = self.model.t5.generate(
                encoder_outputs=transformers.modeling_outputs.BaseModelOutput(
                    last_hidden_state=memory
                ),
                max_length=max_length,
                do_sample=False,
                num_beams=1,
                decoder_start_token_id=vocab.BOS_ID,
                pad_token_id=vocab.PAD_ID,
                eos_token_id=vocab.EOS_ID,
                use_cache=use_cache,
            ).numpy()
        padded = np.full((len(out), max_length), vocab.PAD_ID, np.int64)
        padded[:, : out.shape[1]] = out
        return padded


def liven_vae(model: ReferencePhraseVAE, eos_scale: float = 2.5, seed: int = 1) -> None:
    """Random T5s mostly repeat their input token and never stop; amplify the residual branches
    (outputs then depend on position and memory) and enlarge the [EOS] embedding so rows stop
    at varied positions. Norm weights are randomised so a mix-up of norms cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".o.weight", ".wo.weight")):
                param.mul_(10.0)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            elif "norm" in name and name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        model.model.t5.shared.weight[vocab.EOS_ID].mul_(eos_scale)


def build_vae(size: str, seed: int = 0) -> ReferencePhraseVAE:
    """A lively random ReferencePhraseVAE of ``VAE_SIZES[size]`` (eval mode)."""
    torch.manual_seed(seed)
    model = ReferencePhraseVAE(**VAE_SIZES[size]).eval()
    liven_vae(model)
    return model


def encoder_inputs(batch: int = 6, length: int = 24, seed: int = 0):
    """Random encoder inputs ``[C0..C3] [BOS] tokens [EOS] [PAD]...`` (varied lengths, row 0
    full) and decoder inputs starting with [BOS]: (ids, mask, decoder_ids), int64 numpy."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, length + 1, batch)
    lengths[0] = length
    ids = np.full((batch, length), vocab.PAD_ID, np.int64)
    for row, n in enumerate(lengths):
        ids[row, :4] = vocab.QUERY_IDS[:4]
        ids[row, 4] = vocab.BOS_ID
        ids[row, 5 : n - 1] = rng.integers(vocab.BAR_ID, 1000, n - 6)
        ids[row, n - 1] = vocab.EOS_ID
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    decoder_ids = rng.integers(vocab.BAR_ID, 1000, (batch, 20))
    decoder_ids[:, 0] = vocab.BOS_ID
    return ids, mask, decoder_ids


# --------------------------------------------------------------------------------------------
# PhraseLDM


class ReferenceSectionEncoder(torch.nn.Module):
    """The original SecEncoder's tensors and forward: [type | length] embeddings, a 3-layer
    post-norm encoder (8 heads, ff 4C, ReLU) with no padding mask, and the float mask (1 real,
    0 pad). ``sec_type_to_id`` / ``sec_len_to_id`` are explicit (the original's came from set
    order)."""

    def __init__(self, width: int, type_order: str = SEED0_TYPE_ORDER, length_order=None):
        super().__init__()
        self.type_embed = torch.nn.Embedding(12, width // 2)
        self.len_embed = torch.nn.Embedding(33, width // 2)
        layer = torch.nn.TransformerEncoderLayer(
            d_model=width, nhead=8, dim_feedforward=4 * width, batch_first=True
        )
        self.sec_encoder = torch.nn.TransformerEncoder(layer, num_layers=3)
        length_order = length_order or list(range(1, 33))
        self.sec_type_to_id = {t: i + 1 for i, t in enumerate(type_order)}
        self.sec_len_to_id = {str(n): i + 1 for i, n in enumerate(length_order)}
        self.max_len = 30

    def ids(self, plans: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, 30] type and length ids of ``"i-8 A-8 ..."`` strings, 0-padded."""
        types = torch.zeros(len(plans), self.max_len, dtype=torch.long)
        lengths = torch.zeros(len(plans), self.max_len, dtype=torch.long)
        for row, plan in enumerate(plans):
            for col, item in enumerate(plan.split(" ")):
                kind, n = item.split("-")
                types[row, col] = self.sec_type_to_id[kind]
                lengths[row, col] = self.sec_len_to_id[n]
        return types, lengths

    def forward(self, type_ids, length_ids):
        x = torch.cat([self.type_embed(type_ids), self.len_embed(length_ids)], dim=-1)
        return self.sec_encoder(x), (type_ids != 0).float()


class ReferenceLengthEncoder(torch.nn.Module):
    """The original LengthEncoder: one row per bucket trunc(n_bars / bucket_size)."""

    def __init__(self, dim: int, bucket_size: int = 10):
        super().__init__()
        self.length_embedding = torch.nn.Embedding(128, dim)
        self.bucket_size = bucket_size

    def forward(self, n_bars):
        return self.length_embedding((n_bars / self.bucket_size).long()).unsqueeze(1)


class ReferencePhraseLDM(torch.nn.Module, PyTorchModelHubMixin):
    """The original hub PhraseLDM's constructor, keys (``ldm.*``, ``length_encoder.*``,
    ``sec_encoder.*``) and forward semantics."""

    def __init__(
        self,
        model_config: dict | None = None,
        scale_factor: float = REFERENCE_SCALE_FACTOR,
        diffusion_steps: int = 1000,
        clip_range: float = REFERENCE_CLIP_RANGE,
        length_control: bool = False,
        length_bucket_size: int = 10,
        sec_control: bool = False,
    ):
        super().__init__()
        if model_config is None:
            model_config = LDM_PAPER_SECTIONS if sec_control else LDM_PAPER
        self.diffusion_steps, self.clip_range = diffusion_steps, clip_range
        self.ldm = StableAudioDiTModel(**model_config)
        if length_control:  # the hub class sizes it by time_proj_dim: equal in every config
            self.length_encoder = ReferenceLengthEncoder(
                model_config["global_states_input_dim"], length_bucket_size
            )
        if sec_control:
            self.sec_encoder = ReferenceSectionEncoder(model_config["cross_attention_input_dim"])
        self.eval()

    def set_section_order(self, type_order: str, length_order) -> None:
        self.sec_encoder.sec_type_to_id = {t: i + 1 for i, t in enumerate(type_order)}
        self.sec_encoder.sec_len_to_id = {str(n): i + 1 for i, n in enumerate(length_order)}

    def scheduler(self) -> DDPMScheduler:
        """The original's sampler: DDPM, cosine betas, x0 clipped to clip_range."""
        return DDPMScheduler(
            num_train_timesteps=self.diffusion_steps,
            beta_schedule="squaredcos_cap_v2",
            clip_sample=True,
            clip_sample_range=self.clip_range,
        )

    def predict_noise(self, x, t, n_bars=None, sections=None, bool_mask=False) -> np.ndarray:
        """Noise [batch, length, C] numpy of x [batch, length, C] (channels last, as ours).

        sections: plan strings (ids through ``sec_encoder``'s dicts) or (type_ids, length_ids).
        bool_mask: give the DiT a boolean section mask instead of the original's float one."""
        cfg = self.ldm.config
        x = torch.from_numpy(np.asarray(x, np.float32))
        batch, length, _ = x.shape
        t = torch.from_numpy(np.broadcast_to(np.asarray(t, np.int64), (batch,)).copy())
        with torch.no_grad():
            if hasattr(self, "length_encoder"):
                n_bars = np.broadcast_to(np.asarray(n_bars, np.int64), (batch,)).copy()
                global_states = self.length_encoder(torch.from_numpy(n_bars))
            else:
                global_states = torch.zeros(batch, 1, cfg.global_states_input_dim)
            mask = None
            if hasattr(self, "sec_encoder"):
                if isinstance(sections[0], str):
                    ids = self.sec_encoder.ids(list(sections))
                else:
                    ids = tuple(torch.from_numpy(np.asarray(s, np.int64)) for s in sections)
                context, mask = self.sec_encoder(*ids)
                if bool_mask:
                    mask = mask > 0
            else:
                context = torch.zeros(batch, 7, cfg.cross_attention_input_dim)
            rotary = get_1d_rotary_pos_embed(
                cfg.attention_head_dim // 2, length + 1, use_real=True, repeat_interleave_real=False
            )
            out = self.ldm(
                x.transpose(1, 2),
                t,
                encoder_hidden_states=context,
                global_hidden_states=global_states,
                rotary_embedding=rotary,
                encoder_attention_mask=mask,
            ).sample
        return out.transpose(1, 2).numpy()


def randomize_ldm(model: torch.nn.Module) -> None:
    """Norms start at (1, 0), biases at small values and the section encoder's layers are deep
    copies of each other: randomise them so that a wrong mapping cannot go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(
                    0.1 * torch.randn_like(p)
                    + (1.0 if "norm" in name and "weight" in name else 0.0)
                )
            elif "sec_encoder.layers" in name:
                p.add_(0.02 * torch.randn_like(p))


def build_ldm(
    model_config: dict, length_control: bool, sec_control: bool, seed: int = 0
) -> ReferencePhraseLDM:
    """A random ReferencePhraseLDM (eval mode) of one variant."""
    torch.manual_seed(seed)
    model = ReferencePhraseLDM(
        model_config=dict(model_config), length_control=length_control, sec_control=sec_control
    )
    randomize_ldm(model)
    return model.eval()


def ldm_section_inputs(batch: int):
    """(type_ids, length_ids) [batch, 30] int64 in raw ids: varied plans, one of 30 sections."""
    types = np.zeros((batch, 30), np.int64)
    lengths = np.zeros((batch, 30), np.int64)
    plans = [([1, 4, 4, 5, 4, 2], [8, 8, 8, 4, 8, 8]), ([7] * 30, list(range(1, 31)))]
    plans += [([11], [32]), ([3, 9], [16, 2])]
    for i, (ty, ln) in enumerate(plans[:batch]):
        types[i, : len(ty)], lengths[i, : len(ln)] = ty, ln
    return types, lengths
