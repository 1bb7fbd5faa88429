"""Every router family the project has, against a dense LM at equal active FLOPs per token.

  moe-jax sweep --config configs/router_zoo.py --workdir runs/router_zoo           # GPU: English mix
  moe-jax sweep --config configs/router_zoo.py:scale=cpu --workdir runs/router_zoo  # CPU, small

The base LM is the paper claims' (`lm_tiny.py`, `at_scale`): at `scale=gpu` (the default) 4 blocks
of width 256 on English mix, 1,200 steps of 32 x 256 tokens (0.2 of one pass, so no byte is seen
twice); at `scale=cpu` 2 blocks of width 64 on Tiny Shakespeare, 200 steps. One seed: a survey of
the families (what each does to loss, load and drops), not a ranking; gaps of a few hundredths of a
nat are within seed noise (experiments/README.md). `compare_routers.py` stays the quick main job.

Members are sized to the dense model's FLOPs by the 'active' convention (k expert FFNs per token;
moe_jax/moe/flops.py) and the sweep checks it. Causality (moe_jax/moe/causality.py): families whose
decisions couple a group's tokens (expert choice, Soft MoE, Sinkhorn and BASE in training) route
the tokens at one position across the batch (`group_by='position'`); top-k and hash members route
each sequence with `priority='token'` (from lm_tiny.py) or dropless. Routers balanced by
construction or by their own rule (Sinkhorn, BASE, hash, aux-free) train without the Switch loss.
"""
import ml_collections

from configs import common, lm_tiny

BY_POSITION = {'group_by': 'position'}
NO_BALANCE_LOSS = {'load_balancing_coef': 0.0}
FINE_GRAINED = {'num_experts': 32, 'k': 4, 'num_shared_experts': 1}


def members() -> dict[str, dict]:
  """name: `config.moe` overrides (the dense member: `config.model.moe_every=0`)."""
  return {
      'switch_top1': {'k': 1, 'capacity_factor': 1.25},
      'gshard_top2': {'k': 2, 'capacity_factor': 1.25},
      'dropless_top2': {'k': 2, 'capacity_factor': None},
      'global_balance_top2': {'k': 2, 'capacity_factor': 1.25, 'balance_over': 'global'},
      'cosine_top2': {'k': 2, 'capacity_factor': 1.25, 'router_logits': 'cosine'},
      'expert_choice': {'router': 'expert_choice', 'capacity_factor': 2.0, **BY_POSITION},
      'soft_moe': {'router': 'soft', 'slots_per_expert': 2, **BY_POSITION},
      'sinkhorn_top1': {'router': 'sinkhorn', 'k': 1, 'capacity_factor': None, **BY_POSITION,
                        **NO_BALANCE_LOSS},
      'base_layers': {'router': 'base', 'capacity_factor': 1.0, **BY_POSITION, **NO_BALANCE_LOSS},
      'hash': {'router': 'hash', 'k': 1, 'capacity_factor': None, **NO_BALANCE_LOSS},
      'fine_grained_shared': {**FINE_GRAINED, 'capacity_factor': 1.25},
      'aux_loss_free': {'k': 2, 'capacity_factor': None, 'score': 'sigmoid',
                        'bias_update_rate': 1e-3, **NO_BALANCE_LOSS},
      # DeepSeek-V3's recipe: fine-grained + shared, sigmoid + aux-free bias, group-limited
      # top-k (4 of 32 experts from 2 of 4 groups), a small sequence-wise balance loss (alpha 1e-4)
      'deepseek_v3': {**FINE_GRAINED, 'capacity_factor': None, 'score': 'sigmoid',
                      'bias_update_rate': 1e-3, 'num_expert_groups': 4, 'groups_per_token': 2,
                      'balance_over': 'sequence', 'load_balancing_coef': 1e-4},
  }


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  scale = common.parse_arg(arg, scale='gpu').scale
  config = ml_collections.ConfigDict()
  config.base = lm_tiny.get_config(f'scale={common.check_scale(scale)}')
  config.base.train.eval_every = config.base.train.steps // 4
  config.size_experts = True
  config.flops_tolerance = 0.02
  config.flops_match = 'active'
  config.members = ml_collections.ConfigDict(sort_keys=False, initial_dictionary={
      'dense': {'model': {'moe_every': 0}},
      **{name: {'moe': moe} for name, moe in members().items()}})
  return config
