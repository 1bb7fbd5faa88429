"""Sparse upcycling (Komatsuzaki et al. 2023): the tiny LM's MoE variant started from a dense run.

  moe-jax train --config configs/lm_tiny.py --workdir runs/dense --config.model.moe_every=0
  moe-jax train --config configs/upcycle.py --workdir runs/upcycled \\
      --config.upcycle.from_workdir=runs/dense [--config.upcycle.noise_std=0.01]

The MoE run copies every weight of the dense run's latest checkpoint; in each MoE block (every
`model.moe_every`-th) the 8 experts start as copies of the block's dense FFN (same width,
`moe.d_ff = model.d_ff`), the routers fresh (moe_jax/run/upcycling.py). Top-2 with renormalized weights
and no capacity, so the upcycled model starts as exactly the dense model (the paper's decoder used
top-2 token choice; with a capacity, dropped tokens would change the first forward pass). The
optimizer and the step count start anew, with a short warmup.
"""
import ml_collections
from ml_collections import config_dict

from configs import lm_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = lm_tiny.get_config(arg)
  config.moe.update(k=2, capacity_factor=None, renormalize=True, d_ff=config.model.d_ff)
  config.upcycle = ml_collections.ConfigDict()
  config.upcycle.from_workdir = config_dict.placeholder(str)  # the dense run directory
  config.upcycle.noise_std = 0.0  # expert noise, in units of each dense weight's std
  return config
