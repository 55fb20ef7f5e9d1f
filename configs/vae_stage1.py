"""PhraseVAE stage 1: span-infill pretraining of the T5 on bar lines.

python train_vae.py --config configs/vae_stage1.py --workdir runs/vae_stage1
python train_vae.py --config configs/vae_stage1.py:small --workdir runs/vae_small_stage1
python train_vae.py --config configs/vae_stage1.py:tiny --workdir /tmp/vae_tiny  # synthetic data
"""

from configs import vae_common


def get_config(size: str = ""):
    return vae_common.vae_config(stage=1, size=size)
