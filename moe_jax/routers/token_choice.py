"""Token choice: each token picks its top-k experts (`routing.token_choice`).

k=1 is Switch, k=2 GShard / Mixtral; score='sigmoid' with bias_update_rate > 0 is DeepSeek-V3's
auxiliary-loss-free balancing, num_expert_groups/groups_per_token its group-limited routing.
"""
from __future__ import annotations

from moe_jax import routing
from moe_jax.routers.family import MOE, Family, Group, Spec, check_k


def route(spec: Spec, group: Group) -> routing.RouterOutput:
  return routing.token_choice(
      group.logits, k=spec.k, capacity_factor=spec.capacity_factor, score=spec.score,
      renormalize=spec.renormalize, priority=spec.priority, selection_bias=group.bias,
      noise_std=spec.noise_std if group.rng is not None else 0.0, rng=group.rng,
      num_groups=spec.num_expert_groups, groups_per_token=spec.groups_per_token)


def check(spec: Spec) -> None:
  check_k(spec)
  if spec.bias_update_rate > 0 and spec.score != 'sigmoid':
    MOE.fail('bias_update_rate', spec.bias_update_rate, 'auxiliary-loss-free balancing needs '
             "router='token_choice' and score='sigmoid'")


NAME = 'token_choice'  # config.moe.router
FAMILY = Family(
    route=route, couples_group=False, dropless=True, check=check,
    options=('k', 'capacity_factor', 'priority', 'score', 'renormalize', 'bias_update_rate',
             'noise_std', 'num_expert_groups', 'groups_per_token', 'balance_over'),
    cite='Switch (k=1), GShard / Mixtral (k=2), DeepSeek-V3 (score=sigmoid, aux-free bias, '
         'group-limited)')
