"""The original's training steps in PyTorch: batches, losses, optimisers, clipping, freezing.

What ``benchmarks/train_parity.py`` (and ``tests/test_train_parity.py``) compare our training
step against, written from SPEC sections 4-5 and FACTS sections 1.1-1.5, 2.11, 4 and 6, on
transformers' T5 and diffusers' StableAudio DiT (``torch_reference.py``):

- batches (FACTS 4): tokens = the line split on spaces; stage 1 replaces spans by ``[MASK]``
  (``span_infill``: Poisson(3) lengths, uniform starts over the current length, until the
  sampled lengths reach 30% of the original length); input ``[C0..C3]`` (stages 2-3) ``[BOS]
  tokens [EOS]``, target ``tokens [EOS]``, each cut to 128 and padded with ``[PAD]`` to the
  longest row, labels = target ids with ``[PAD]`` -> -100; the decoder input is T5's own shift
  of the labels;
- stages 1-2 (``S2SVQAE``): memory = every encoder state with the input mask (stage 1) or the
  first 4 states, all visible (stage 2); loss = T5's token-mean cross-entropy (the VQ loss is
  0, the VQ codebook gets no gradient, so its own Adam step is a no-op and is left out);
  ``torch.optim.Adam`` lr 1e-4;
- stage 3 (``S2SVAE3``): z = mean + eps * exp(logvar / 2); loss = CE + 0.01 * per-dimension KL
  + 0.0 * mean(mean^2); ``torch.optim.AdamW`` over every parameter, lr 1e-4, weight decay 1e-3;
- LDM (``LitPhraseLDM``): x0 = raw latents / scale factor, padded to 512 rows with the
  *unscaled* ``[SEP]`` latent; x_t = ``DDPMScheduler.add_noise`` (cosine betas); loss =
  ``F.mse_loss`` over every position; ``AdamW(ldm.parameters(), lr=5e-4, eps=1e-8)`` (torch's
  default weight decay 0.01) after ``clip_grad_norm_(ldm.parameters(), 0.5)``, so the length
  embedding and the section encoder are never optimised (and ``time_proj`` has
  ``requires_grad=False``); the section mask is the float mask the DiT adds to its logits.

Randomness (span masks' generators, the stage-3 eps, the LDM's timesteps and noise) is given
by the caller, so both sides can be fed the same draws. Dropout is off (``eval()``): the
exact comparison needs it. Import only after ``pytest.importorskip("torch")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch_reference as ref
import transformers
from diffusers.models.embeddings import get_1d_rotary_pos_embed

from phraseldm_jax import vocab

MAX_LENGTH = 128
IGNORE = -100
VAE_LR = 1e-4
VAE_STAGE3_WEIGHT_DECAY = 1e-3
KL_WEIGHT, L2_WEIGHT = 0.01, 0.0
LDM_LR, LDM_EPS, LDM_CLIP = 5e-4, 1e-8, 0.5
MASK_RATIO, MEAN_SPAN = 0.3, 3.0


# --------------------------------------------------------------------------------------------
# VAE batches (POP909Dataset + its collate function).


def span_infill(tokens: Sequence[str], rng) -> list[str]:
    """Stage-1 masking of one line as the original does it; ``rng`` has numpy's
    ``poisson``/``integers`` (the original drew from numpy's global RNG)."""
    masked = list(tokens)
    budget, sampled = MASK_RATIO * len(masked), 0
    while sampled < budget:
        length = rng.poisson(MEAN_SPAN)
        sampled += length
        start = rng.integers(0, len(masked))
        masked = masked[:start] + ["[MASK]"] + masked[min(start + length, len(masked)) :]
    return masked


def _tokenize(lines: Sequence[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokenizer with padding=True, truncation=True, max_length=128: (ids, mask)."""
    rows = [[vocab.PHRASE_VOCAB.id_of(t) for t in line][:MAX_LENGTH] for line in lines]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), vocab.PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def vae_batch(texts: Sequence[str], stage: int, span_rngs=None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` of phrase lines (stage 1: ``span_rngs``,
    one generator per line)."""
    queries = [f"[C{i}]" for i in range(4)] if stage > 1 else []
    inputs, targets = [], []
    for i, text in enumerate(texts):
        tokens = text.split(" ")
        encoder_tokens = span_infill(tokens, span_rngs[i]) if stage == 1 else tokens
        inputs.append([*queries, "[BOS]", *encoder_tokens, "[EOS]"])
        targets.append([*tokens, "[EOS]"])
    input_ids, attention_mask = _tokenize(inputs)
    labels, _ = _tokenize(targets)
    labels[labels == vocab.PAD_ID] = IGNORE
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------------------------
# VAE models and losses.


class ReferencePhraseAE(torch.nn.Module):
    """The original's stage 1-2 model (``S2SVQAE`` without its unused VQ parts)."""

    def __init__(self, t5_config: dict, compress_style: str, n_query_tokens: int = 4):
        super().__init__()
        self.t5 = transformers.T5ForConditionalGeneration(
            transformers.T5Config(dropout_rate=0.1, **t5_config)
        )
        self.compress_style, self.n_query_tokens = compress_style, n_query_tokens

    def training_loss(self, batch: dict[str, torch.Tensor], latent_noise=None) -> torch.Tensor:
        del latent_noise
        states = self.t5.encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )[0]
        if self.compress_style == "full_sequence":
            memory, mask = states, batch["attention_mask"]
        else:
            memory = states[:, : self.n_query_tokens]
            mask = torch.ones(memory.shape[:2], dtype=torch.long)
        out = self.t5(encoder_outputs=(memory,), attention_mask=mask, labels=batch["labels"])
        return out.loss


class ReferencePhraseVAETraining(ref.ReferenceVAEModules):
    """The original's stage-3 model (``S2SVAE3``) with its training loss."""

    def training_loss(self, batch: dict[str, torch.Tensor], latent_noise) -> torch.Tensor:
        mean, logvar = self.encode(batch["input_ids"], batch["attention_mask"])
        z = mean + latent_noise * torch.exp(0.5 * logvar)
        out = self.t5(
            encoder_outputs=(self.memory(z),),
            attention_mask=torch.ones(z.shape[0], 1, dtype=torch.long),
            labels=batch["labels"],
        )
        kl = (-0.5 * torch.sum(1 + logvar - mean**2 - logvar.exp(), dim=-1)).mean()
        kl = kl / self.latent_dim
        return 1.0 * out.loss + KL_WEIGHT * kl + L2_WEIGHT * torch.mean(mean**2)


def vae_model(stage: int, t5_config: dict, n_query_tokens: int = 4, latent_dim: int = 64):
    """The stage's torch model (eval mode: dropout off)."""
    if stage == 3:
        model = ReferencePhraseVAETraining(t5_config, n_query_tokens, latent_dim)
    else:
        style = "full_sequence" if stage == 1 else "first_n_tokens"
        model = ReferencePhraseAE(t5_config, style, n_query_tokens)
    return model.eval()


def vae_optimizer(stage: int, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam lr 1e-4 (stages 1-2); AdamW lr 1e-4, weight decay 1e-3 over everything (stage 3)."""
    if stage == 3:
        return torch.optim.AdamW(
            model.parameters(), lr=VAE_LR, weight_decay=VAE_STAGE3_WEIGHT_DECAY
        )
    return torch.optim.Adam(model.parameters(), lr=VAE_LR)


# --------------------------------------------------------------------------------------------
# LDM batches, loss, optimiser.


def ldm_latents(
    raw_latents: Sequence[np.ndarray], scale_factor: float, sep_latent: np.ndarray, rows: int
) -> torch.Tensor:
    """[batch, rows, C]: each song's raw latents / scale factor, then the unscaled pad."""
    out = torch.empty(len(raw_latents), rows, len(sep_latent))
    for i, song in enumerate(raw_latents):
        out[i, : len(song)] = torch.from_numpy(np.asarray(song, np.float32)) / scale_factor
        out[i, len(song) :] = torch.from_numpy(np.asarray(sep_latent, np.float32))
    return out


def ldm_training_loss(
    model: ref.ReferencePhraseLDM,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    n_bars: torch.Tensor | None = None,
    plans: Sequence[str] | None = None,
) -> torch.Tensor:
    """``LitPhraseLDM``'s loss: MSE(eps_hat, eps) over every position; x0, noise [B, L, C]."""
    cfg = model.ldm.config
    batch, length, _ = x0.shape
    x_t = model.scheduler().add_noise(x0, noise, t)
    if hasattr(model, "length_encoder"):
        global_states = model.length_encoder(n_bars)
    else:
        global_states = torch.zeros(batch, 1, cfg.global_states_input_dim, dtype=x0.dtype)
    mask = None
    if hasattr(model, "sec_encoder"):
        context, mask = model.sec_encoder(*model.sec_encoder.ids(list(plans)))
        mask = mask.to(x0.dtype)  # the float mask in the model's dtype (a float64 copy too)
    else:
        context = torch.zeros(batch, 7, cfg.cross_attention_input_dim, dtype=x0.dtype)
    rotary = get_1d_rotary_pos_embed(
        cfg.attention_head_dim // 2, length + 1, use_real=True, repeat_interleave_real=False
    )
    pred = model.ldm(
        x_t.transpose(1, 2),
        t,
        encoder_hidden_states=context,
        global_hidden_states=global_states,
        rotary_embedding=rotary,
        encoder_attention_mask=mask,
    ).sample
    return torch.nn.functional.mse_loss(pred.transpose(1, 2), noise)


def ldm_optimizer(model: ref.ReferencePhraseLDM) -> torch.optim.Optimizer:
    """AdamW over the DiT only (the encoders stay at their initial values)."""
    return torch.optim.AdamW(model.ldm.parameters(), lr=LDM_LR, eps=LDM_EPS)


# --------------------------------------------------------------------------------------------
# One step.


class Trainer:
    """zero_grad -> loss -> backward -> (clip_grad_norm_) -> step, keeping the pre-clip
    gradients of the optimised parameters for comparison (Lightning clips the optimiser's
    parameters; those without a gradient are skipped by both the clip and the step)."""

    def __init__(self, model: torch.nn.Module, optimizer, clip_norm: float = 0.0):
        self.model, self.optimizer, self.clip_norm = model, optimizer, clip_norm
        optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.names = {  # in the optimiser and trainable (time_proj is in it, but fixed)
            id(p): name
            for name, p in model.named_parameters()
            if id(p) in optimised and p.requires_grad
        }

    def optimised(self) -> dict[str, torch.nn.Parameter]:
        by_id = {id(p): p for p in self.model.parameters()}
        return {name: by_id[i] for i, name in self.names.items()}

    def step(self, loss_fn) -> tuple[float, dict[str, np.ndarray]]:
        """(loss, pre-clip gradients by parameter name) of one update with ``loss_fn()``."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.model.parameters():  # the encoders' grads too (never stepped)
            p.grad = None
        loss = loss_fn()
        loss.backward()
        grads = {
            name: p.grad.detach().numpy().copy()
            for name, p in self.optimised().items()
            if p.grad is not None
        }
        if self.clip_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
        self.optimizer.step()
        return float(loss.detach()), grads

    def moments(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(exp_avg, exp_avg_sq) of every optimised parameter that has optimiser state."""
        out = {}
        for name, p in self.optimised().items():
            state = self.optimizer.state.get(p)
            if state:
                out[name] = (state["exp_avg"].numpy().copy(), state["exp_avg_sq"].numpy().copy())
        return out


def parameters(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter by name (tied ones once), numpy copies."""
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}
