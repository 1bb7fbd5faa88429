"""Expert-choice routing on GLaM 8B/64E, capacity factor 2 (Zhou et al. 2022, Table 1, "EC-CF2").

Table 1: 8B/64E, 143B parameters, 9.8B activated (`common.glam_8b_64e`). Each expert takes the
n * 2 / 64 tokens of a group that score highest for it, so a token is processed by two experts on
average: the activated count is that of two experts.

Deviation: the paper's groups span the batch, which lets a token's routing depend on later
tokens; here a group is one position across the batch (group_by='position'), which keeps the
decoder causal (moe_jax/moe/causality.py) at the price of coupling the sequences of a batch.

Presets (`common.cpu_scale`, `common.gpu_scale`): scale=cpu, the family at a test's size; scale=gpu,
one 80 GB GPU: 2 blocks, 4 experts, batch 8 (42.5 GiB planned).
"""
from configs.papers import common


def get_config(arg=None):
  return common.glam_8b_64e(dict(router='expert_choice', capacity_factor=2.0,
                                 group_by='position', load_balancing_coef=0.0), arg)
