"""Claim (e): a larger capacity factor lowers the token drop rate and the loss.

  python -m experiments run --claims e --scale cpu --workdir runs/claims
  moe-jax sweep --config experiments/capacity_factor.py:scale=cpu --workdir runs/capacity_factor   (its runs, no verdict)

Switch top-1 at capacity factors 1.0, 1.25 and 2.0 with the SAME expert width: this claim is
about the capacity factor itself, so FLOPs are not equalized: active FLOPs (one expert per
token) are equal, executed FLOPs grow with the factor (more expert slots; `flops_tolerance` is
opened to let them; the table shows both). Metrics:
the fraction of tokens dropped at the end of training and the held-out loss; the claim holds if
the mean drop rate falls as the factor grows and cf 2.0 beats cf 1.0 on loss. The loss half
compares members of UNEQUAL executed FLOPs (cf 2.0 executes more expert slots per token than cf
1.0), as the Switch paper's table 1 does: it says what the larger factor buys, not that it is the
better use of equal compute.
"""
from experiments import common

STATEMENT = ('A larger capacity factor lowers the fraction of dropped tokens and the loss '
             '(same expert width, so more FLOPs).')
SOURCE = 'Fedus et al. 2021, Switch Transformers (table 1, sec. 2.2)'
FACTORS = {'cf_1': 1.0, 'cf_1_25': 1.25, 'cf_2': 2.0}


# The paired differences (member, baseline, metric) the verdict tests, each claimed < its margin.
COMPARISONS = [('cf_2', 'cf_1', 'eval_loss')]

def get_config(arg: str | None = None):
  scale = common.scale_of(arg)
  members = {name: {'moe': {'router': 'token_choice', 'k': 1, 'capacity_factor': cf}}
             for name, cf in FACTORS.items()}
  return common.sweep_config('lm', scale, members, flops_match='executed', size_experts=False,
                             flops_tolerance=1.0, seeds=range(3) if scale == 'cpu' else range(12))  # PROTOCOL.md


def verdict(results) -> common.Verdict:
  drops = [common.Interval.of(common.values(results, name, 'dropped')).mean for name in FACTORS]
  falling = all(a > b for a, b in zip(drops, drops[1:]))
  test = common.compare_lower(results, 'cf_2', 'cf_1', 'eval_loss')
  line = (f"mean drop rate {' > '.join(f'{d:.1%}' for d in drops)} "
          f"({'falls' if falling else 'does NOT fall'} with the factor); " + test.line +
          ' (at unequal executed FLOPs: cf 2 executes more expert slots)')
  outcome = common.combined([test.outcome, 'reproduced' if falling else 'refuted'])
  return common.Verdict(outcome, line, common.member_rows(
      results, [('dropped', 'dropped', 3), ('eval_loss', 'eval loss', 4)]))
