"""PhraseLDM, length- and section-conditioned (the paper's recipe; ``:small`` / ``:tiny`` for CPU runs).

  python train_ldm.py --config configs/ldm_seccond.py --workdir runs/ldm_seccond
  python train_ldm.py --config configs/ldm_seccond.py:small --workdir ... \\
      --config.data.latent_dir data_cache/pop909_latents --config.vae.workdir ...
"""

from configs import ldm_common


def get_config(size: str = ""):
    return ldm_common.ldm_config(length_control=True, sec_control=True, size=size)
