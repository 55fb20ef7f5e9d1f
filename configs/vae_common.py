"""The PhraseVAE recipe shared by ``vae_stage1.py``, ``vae_stage2.py`` and ``vae_stage3.py``.

Default size: the paper's (SPEC section 4, FACTS 1.1): T5 d_model 512, d_ff 1024, 3+3 layers,
6 heads of 64, dropout 0.1, max length 128, batch 128; Adam lr 1e-4 (stages 1-2), AdamW lr 1e-4
weight decay 1e-3 (stage 3); KL weight 0.01; evaluation every 250 steps (the original's
pseudo-epoch); early stopping after 20 evaluations without improvement of ``val_loss``
(stage 2: of F1iopd, max). ``small`` is a CPU run on full POP909, ``tiny`` the tests' and the
synthetic corpus' size.

Layout (the LDM configs mirror it): ``model`` = ``PhraseVAEConfig`` fields (``t5`` =
``T5Config`` fields), ``data`` = input pipeline, ``optim`` / ``train`` / ``mesh`` =
``train_common.default_train_config()`` plus the VAE's own ``train`` fields, ``eval`` = evaluation.
"""

from __future__ import annotations

import ml_collections

from configs import paths, train_common
from phraseldm_jax.vae import STAGE_HEADS

SIZES = ("", "paper", "small", "tiny")
STAGE_DATASETS = {1: "bars", 2: "phrases", 3: "phrases"}
POP909_DATA_DIR = paths.POP909_SONGS


def t5_fields(d_model: int, d_ff: int, d_kv: int, num_heads: int, layers: int) -> dict:
    """``T5Config`` fields; ``layers`` encoder and decoder layers each."""
    return dict(
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv,
        num_heads=num_heads,
        num_layers=layers,
        num_decoder_layers=layers,
        vocab_size=1000,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        dtype="float32",  # compute dtype: "bfloat16" keeps weights, norms, softmax, loss float32
        remat=False,  # True: recompute each block's activations for the gradient (memory)
    )


def vae_config(stage: int, size: str = "") -> ml_collections.ConfigDict:
    """The full config of PhraseVAE training stage ``stage`` (1, 2, 3) at ``size`` (SIZES)."""
    if stage not in STAGE_HEADS:
        raise ValueError(f"unknown PhraseVAE stage {stage!r}; expected 1, 2 or 3")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; use one of {SIZES[1:]} (or nothing)")
    config = train_common.default_train_config()

    # PhraseVAEConfig fields (built as PhraseVAEConfig(**config.model)).
    config.model = ml_collections.ConfigDict()
    config.model.t5 = t5_fields(512, 1024, 64, 6, 3)
    config.model.head = STAGE_HEADS[stage]  # full_sequence | query | vae
    config.model.n_query_tokens = 4  # [C0]..[C3] at the start of the encoder input (stages 2-3)
    config.model.latent_dim = 64  # z width (stage 3)

    config.data = ml_collections.ConfigDict()
    config.data.data_dir = POP909_DATA_DIR  # built by phraseldm_jax.cli.prepare; "" = synthetic
    config.data.n_synthetic_songs = 48  # songs of the synthetic corpus (data_dir "")
    config.data.dataset = STAGE_DATASETS[stage]  # bars (stage 1) | phrases (stages 2-3)
    config.data.stage = stage  # input format: span-masked, no queries (1) | 4 queries (2-3)
    config.data.train_split = "train"
    config.data.batch_size = 128  # global batch
    config.data.max_length = 128  # encoder input and target are each cut to this many tokens
    # () = every batch is a random sample padded to max_length (the original pads to its
    # longest row, which in POP909 is mostly over 64 tokens). Lengths such as
    # (8, 16, 32, 48, 64, 128) group records of similar length into a batch (much less
    # padding, CPU runs), at a price: each batch's token-mean loss then weighs short records
    # more, e.g. many POP909 phrase batches then hold only [INST]/b-1/[SEP] lines.
    config.data.bucket_lengths = ()
    # Random batches as above, each cut to the smallest of these lengths that holds its
    # longest row: what the original does (it pads to the longest row), at a few compiled
    # shapes; the same loss as padding to max_length, in a fraction of the time (POP909's
    # median phrase is 22 tokens; docs/BENCHMARKS.md). () = pad every batch to max_length.
    config.data.pad_lengths = (16, 32, 48, 64, 96, 128)
    # Training batches with several phrases per row, each phrase seeing only itself (segment
    # masks): the same phrases and the same loss in about a third of the tokens
    # (docs/BENCHMARKS.md). Rows of max_length tokens (pad_lengths then apply to evaluation
    # only), at most pack_max_segments phrases a row, the row count a multiple of
    # pack_row_multiple and of the devices. Not with bucket_lengths. Evaluation is unpacked.
    config.data.pack_phrases = True
    config.data.pack_max_segments = 16
    config.data.pack_row_multiple = 4
    config.data.read_threads = 2
    config.data.worker_count = 0  # Grain worker processes (0 = in the training process)

    if stage == 3:
        config.optim.name = "adamw"
        config.optim.weight_decay = 1e-3
    else:
        config.optim.name = "adam"
        config.optim.weight_decay = 0.0
    config.optim.lr = 1e-4

    config.train.num_steps = 2_500_000 if stage == 1 else 250_000  # max_epochs x 250 steps
    config.train.log_every = 50
    config.train.eval_every = 250  # the original's pseudo-epoch
    config.train.ckpt_every = 1000
    config.train.seed = 42
    # Stage 2 keeps the checkpoint with the best F1iopd, stages 1 and 3 the lowest loss.
    config.train.best_metric = "eval/f1_iopd" if stage == 2 else "eval/loss"
    config.train.best_mode = "max" if stage == 2 else "min"
    config.train.patience = 20  # evaluations
    config.train.min_delta = 0.001 if stage == 1 else 0.0
    config.train.kl_weight = 0.01 if stage == 3 else 0.0  # weight of the per-dimension KL
    config.train.init_from = ""  # workdir of the previous stage ("" = fresh init)
    config.train.init_from_checkpoint = "best"  # which checkpoint of init_from: best | latest

    config.eval = ml_collections.ConfigDict()
    config.eval.split = "validation"  # evaluated every eval_every steps
    config.eval.test_split = "test"  # evaluated with the best checkpoint after training
    config.eval.batch_size = 128  # teacher-forced batches (a multiple of the device count)
    config.eval.max_examples = 0  # records of the split evaluated (evenly spread); 0 = all
    config.eval.max_f1_examples = 0  # of those, how many are decoded for F1; 0 = all
    config.eval.decode_batch_size = 1024  # rows decoded together
    config.eval.max_decode_length = 128  # greedy decoding positions, the start token included
    config.eval.num_text_examples = 4  # reconstructions shown as TensorBoard text
    config.eval.sample_latent = False  # True: val loss with a sampled z, as the original
    config.eval.reference_f1_quirks = False  # True: the original's F1 quirks (SPEC section 9.7)

    if size == "small":
        _small(config, stage)
    elif size == "tiny":
        _tiny(config, stage)
    return config


def _small(config: ml_collections.ConfigDict, stage: int) -> None:
    """About 0.9M parameters for a CPU run on full POP909 (its step time: docs/ARCHITECTURE.md).
    The learning rate is 10x the paper's: the run has ~2000 steps, not hundreds of thousands.
    Batches are packed (as the paper size). Evaluation reads 4096 validation records, 2048 of
    them decoded."""
    config.model.t5 = t5_fields(128, 256, 32, 4, 2)
    config.optim.lr = 1e-3
    config.train.num_steps = 2000
    config.train.log_every = 25
    config.train.eval_every = 250
    config.train.ckpt_every = 250
    config.train.patience = 8
    config.eval.max_examples = 4096
    config.eval.max_f1_examples = 2048


def _tiny(config: ml_collections.ConfigDict, stage: int) -> None:
    """Tests and the synthetic corpus: compiles and trains in seconds."""
    config.model.t5 = t5_fields(64, 128, 16, 4, 2)
    config.data.data_dir = ""  # the synthetic corpus
    config.data.batch_size = 32
    config.data.bucket_lengths = (16, 64, 128)
    config.data.pad_lengths = ()
    config.data.pack_phrases = False
    config.optim.lr = 1e-3
    config.train.num_steps = 300
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.ckpt_every = 100
    config.train.patience = 0
    config.train.progress = False
    config.eval.batch_size = 64
    config.eval.decode_batch_size = 256
    config.eval.num_text_examples = 2
