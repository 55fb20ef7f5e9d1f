"""PhraseLDM, length-conditioned (the paper's recipe; ``:small`` / ``:tiny`` for CPU runs).

  python train_ldm.py --config configs/ldm_lencond.py --workdir runs/ldm_lencond
  python train_ldm.py --config configs/ldm_lencond.py:small --workdir ... \\
      --config.data.latent_dir data_cache/pop909_latents --config.vae.workdir ...
"""

from configs import ldm_common


def get_config(size: str = ""):
    return ldm_common.ldm_config(length_control=True, sec_control=False, size=size)
