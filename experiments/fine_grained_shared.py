"""Claim (c): fine-grained + shared experts beat GShard top-2 at equal total params and FLOPs.

  python -m experiments run --claims c --scale cpu --workdir runs/claims
  moe-jax sweep --config experiments/fine_grained_shared.py:scale=cpu --workdir runs/fine_grained_shared   (its runs, no verdict)

DeepSeekMoE's recipe applied to GShard top-2 over 8 experts: split every expert into m = 4
narrower ones (32 experts of a quarter of the width, 8 active per token) and make one of them a
shared, always-on expert: 31 routed experts, k = 7, plus 1 shared. Both members are sized to the
dense FFN's *active* FLOPs (DeepSeekMoE compares at equal activated parameters: 8 expert-quarters
against 2 whole experts); total parameters then agree to within the router and rounding, which
the verdict checks (PARAMS_TOLERANCE) rather than assumes.
"""
from experiments import common

STATEMENT = ('Fine-grained experts plus a shared expert (DeepSeekMoE) beat GShard top-2 at equal '
             'total parameters and FLOPs per token.')
SOURCE = 'Dai et al. 2024, DeepSeekMoE (sec. 3, table 1)'
PARAMS_TOLERANCE = 0.05


# The paired differences (member, baseline, metric) the verdict tests, each claimed < its margin.
COMPARISONS = [('fine_grained_shared', 'gshard_top2', 'eval_loss')]

def get_config(arg: str | None = None):
  scale = common.scale_of(arg)
  return common.sweep_config('lm', scale, flops_match='active', members={
      'gshard_top2': {'moe': {'router': 'token_choice', 'num_experts': 8, 'k': 2,
                              'capacity_factor': 1.25}},
      'fine_grained_shared': {'moe': {'router': 'token_choice', 'num_experts': 31, 'k': 7,
                                      'capacity_factor': 1.25, 'num_shared_experts': 1}},
  })


def verdict(results) -> common.Verdict:
  test = common.compare_lower(results, 'fine_grained_shared', 'gshard_top2', 'eval_loss')
  outcome, line = test.outcome, test.line
  params = {name: r['runs'][0]['params_total'] for name, r in results.items()}
  gap = params['fine_grained_shared'] / params['gshard_top2'] - 1
  notes = (f'total params fine_grained_shared / gshard_top2 - 1 = {gap:+.2%} '
           f'(tolerance {PARAMS_TOLERANCE:.0%})',)
  if abs(gap) > PARAMS_TOLERANCE:
    outcome, line = 'invalid', line + f'; INVALID comparison: total params differ by {gap:+.1%}'
  return common.Verdict(outcome, line, common.member_rows(
      results, [('eval_loss', 'eval loss', 4), ('dropped', 'dropped', 3)]), notes)
