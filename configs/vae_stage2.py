"""PhraseVAE stage 2: query autoencoder on phrase lines, T5 from stage 1.

  python train_vae.py --config configs/vae_stage2.py --workdir runs/vae_stage2 \\
      --config.train.init_from runs/vae_stage1
  python train_vae.py --config configs/vae_stage2.py:small --workdir runs/vae_small_stage2 \\
      [--config.train.init_from runs/vae_small_stage1]  # without it: a fresh T5
  python train_vae.py --config configs/vae_stage2.py:tiny --workdir /tmp/vae_tiny  # synthetic data
"""

from configs import vae_common


def get_config(size: str = ""):
    return vae_common.vae_config(stage=2, size=size)
