"""The main job: every router family against a dense LM at equal FLOPs per token, on Tiny Shakespeare.

  moe-jax sweep --config configs/compare_routers.py --workdir runs/compare_routers

Members override the base LM (`lm_tiny.py`). With `size_experts=True` the sweep sets every MoE
member's expert width `moe.d_ff` so its FLOPs per token match the dense model's by the
`flops_match` convention, then checks all members against the dense budget and refuses to start
if any misses it by more than `flops_tolerance`. 'active' is the papers' convention (k expert FFNs
per token for token choice, capacity padding not counted; see moe_jax/moe/flops.py); the results table
shows each member's active and executed FLOPs.

Causality (moe_jax/moe/causality.py, checked when each member's model is built): expert choice and
Soft MoE route the tokens at one position across the batch (`group_by='position'`), at the price of
coupling the sequences of a batch; token-choice members route each sequence with
`priority='token'` (from lm_tiny.py), so no token can take an earlier token's slot.
"""
import ml_collections

from configs import common, lm_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  common.parse_arg(arg)  # no presets: one scale, the README's main job
  config = ml_collections.ConfigDict()
  config.base = lm_tiny.get_config()
  config.base.train.eval_every = 50  # six points on the eval-loss plot
  config.base.deterministic = True  # bitwise-repeatable on GPU too (moe_jax/reproducibility.py)
  config.size_experts = True
  config.flops_tolerance = 0.02
  config.flops_match = 'active'
  config.members = ml_collections.ConfigDict(sort_keys=False, initial_dictionary={
      'dense': {'model': {'moe_every': 0}},
      'switch_top1': {'moe': {'router': 'token_choice', 'k': 1, 'capacity_factor': 1.25}},
      'gshard_top2': {'moe': {'router': 'token_choice', 'k': 2, 'capacity_factor': 1.25}},
      'expert_choice': {'moe': {'router': 'expert_choice', 'capacity_factor': 2.0,
                                'group_by': 'position'}},
      'soft_moe': {'moe': {'router': 'soft', 'slots_per_expert': 2, 'group_by': 'position'}},
      'fine_grained_shared': {'moe': {'router': 'token_choice', 'num_experts': 32, 'k': 4,
                                      'capacity_factor': 1.25, 'num_shared_experts': 1}},
      'aux_loss_free': {'moe': {'router': 'token_choice', 'k': 2, 'capacity_factor': None,
                                'dispatch': 'ragged', 'score': 'sigmoid',
                                'bias_update_rate': 1e-3, 'load_balancing_coef': 0.0}},
  })
  return config
