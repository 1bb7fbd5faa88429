"""GShard top-2 routing on GLaM 8B/64E: the token-choice baseline of Zhou et al. 2022 (Table 1).

Table 1 (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"; the model is Du et
al. 2022's GLaM 8B/64E): 143B parameters, 9.8B activated; 32 blocks, d 4,096, FFN 16,384, 32
heads of 128, 64 experts in every other block. GShard's router (Lepikhin et al. 2021): top-2 of
64, softmax weights of the two renormalized, expert capacity 2 N / E (capacity factor 1 per
choice), load-balancing loss 0.01 (`common.glam_8b_64e`).

Counts: every weight, the tied 256K x 4,096 embedding once (1.05B); active: two experts per
token. Deviations: GShard sends a token's second choice with probability proportional to its
weight, and routes the whole batch as one group; here both choices go, and each sequence is
routed in token order (causal).

Presets (`common.cpu_scale`, `common.gpu_scale`): scale=cpu, the family at a test's size; scale=gpu,
one 80 GB GPU: 2 blocks, 4 experts, batch 8 (42.5 GiB planned).
"""
from configs.papers import common


def get_config(arg=None):
  return common.glam_8b_64e(dict(router='token_choice', k=2, capacity_factor=1.0,
                                 renormalize=True, priority='token', load_balancing_coef=0.01),
                            arg)
