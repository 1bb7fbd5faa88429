"""Claim (a): a sparse MoE LM beats a dense LM of equal active FLOPs per token.

  python -m experiments run --claims a --scale cpu --workdir runs/claims
  moe-jax sweep --config experiments/moe_vs_dense.py:scale=cpu --workdir runs/moe_vs_dense   (its runs, no verdict)

Switch top-1 (capacity factor 1.25) with its expert width sized so that the model's *active*
FLOPs per token (one expert FFN per token, the Switch paper's convention: its Switch-Base is
"FLOP-matched" to T5-Base with experts as wide as T5's FFN) equal the dense model's; capacity
padding makes its executed FLOPs ~1.25x the expert share (both are in the table). Metric:
held-out loss.
"""
from experiments import common

STATEMENT = ('An MoE model beats a dense model of equal active FLOPs per token (lower held-out '
             'loss at the same training steps).')
SOURCE = 'Fedus et al. 2021, Switch Transformers (fig. 1, sec. 3); Shazeer et al. 2017'


# The paired differences (member, baseline, metric) the verdict tests, each claimed < its margin.
COMPARISONS = [('switch_top1', 'dense', 'eval_loss')]

def get_config(arg: str | None = None):
  scale = common.scale_of(arg)
  return common.sweep_config('lm', scale, flops_match='active', members={
      'dense': {'model': {'moe_every': 0}},
      'switch_top1': {'moe': {'router': 'token_choice', 'k': 1, 'capacity_factor': 1.25}},
  })


def verdict(results) -> common.Verdict:
  test = common.compare_lower(results, 'switch_top1', 'dense', 'eval_loss')
  return common.Verdict(test.outcome, test.line,
                        common.member_rows(results, [('eval_loss', 'eval loss', 4)]))
