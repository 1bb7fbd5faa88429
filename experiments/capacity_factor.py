"""Claim (e): a larger capacity factor lowers the token drop rate and the loss.

  python -m experiments run --claims e --scale cpu --workdir runs/claims

Switch top-1 at capacity factors 1.0, 1.25 and 2.0 with the SAME expert width: this claim is
about the capacity factor itself, so FLOPs are not equalized: active FLOPs (one expert per
token) are equal, executed FLOPs grow with the factor (more expert slots; `flops_tolerance` is
opened to let them; the table shows both). Metrics:
the fraction of tokens dropped at the end of training and the held-out loss; the claim holds if
the mean drop rate falls as the factor grows and cf 2.0 beats cf 1.0 on loss.
"""
from experiments import common

STATEMENT = ('A larger capacity factor lowers the fraction of dropped tokens and the loss '
             '(same expert width, so more FLOPs).')
SOURCE = 'Fedus et al. 2021, Switch Transformers (table 1, sec. 2.2)'
FACTORS = {'cf_1': 1.0, 'cf_1_25': 1.25, 'cf_2': 2.0}


def get_config(scale: str = 'cpu'):
  members = {name: {'moe': {'router': 'token_choice', 'k': 1, 'capacity_factor': cf}}
             for name, cf in FACTORS.items()}
  return common.sweep_config('lm', scale, members, flops_match='executed', size_experts=False,
                             flops_tolerance=1.0, seeds=range(3) if scale == 'cpu' else range(4))


def verdict(results) -> common.Verdict:
  drops = [common.Interval.of(common.values(results, name, 'dropped')).mean for name in FACTORS]
  falling = all(a > b for a, b in zip(drops, drops[1:]))
  ok, line = common.lower_is_reproduced(results, 'cf_2', 'cf_1', 'eval_loss')
  line = (f"mean drop rate {' > '.join(f'{d:.1%}' for d in drops)} "
          f"({'falls' if falling else 'does NOT fall'} with the factor); " + line)
  return common.Verdict(ok and falling, line, common.member_rows(
      results, [('dropped', 'dropped', 3), ('eval_loss', 'eval loss', 4)]))
