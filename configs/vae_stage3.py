"""PhraseVAE stage 3: the 64-d VAE on phrase lines, T5 from stage 2.

  python train_vae.py --config configs/vae_stage3.py --workdir runs/vae_stage3 \\
      --config.train.init_from runs/vae_stage2
  python train_vae.py --config configs/vae_stage3.py:small --workdir runs/vae_small_stage3 \\
      --config.train.init_from runs/vae_small_stage2
  python train_vae.py --config configs/vae_stage3.py:tiny --workdir /tmp/vae_tiny  # synthetic data
"""

from configs import vae_common


def get_config(size: str = ""):
    return vae_common.vae_config(stage=3, size=size)
