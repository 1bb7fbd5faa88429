"""Claim (b): expert-choice routing matches or beats top-2 token choice at equal FLOPs.

  python -m experiments run --claims b --scale cpu --workdir runs/claims
  moe-jax sweep --config experiments/expert_choice_vs_top2.py:scale=cpu --workdir runs/expert_choice_vs_top2   (its runs, no verdict)

Expert choice (capacity factor 2, i.e. 2 experts per token on average) routes the tokens at one
position across the batch together (`group_by='position'`), which keeps the LM causal; GShard
top-2 (capacity factor 1.25, `priority='token'`: causal) routes each sequence. Both are sized to
the dense FFN's *active* FLOPs, the paper's convention: 2 expert FFNs per token for each (EC's
capacity factor 2 is 2 experts per token on average; top-2's capacity padding is not counted).
The claim is that expert choice *beats* top-2 (margin 0); whether it is non-inferior (worse by
less than NON_INFERIORITY_MARGIN nats/byte) is reported beside it, not as the verdict.
"""
from experiments import common

STATEMENT = ('Expert choice routing beats top-2 token choice (GShard) at equal FLOPs per token '
             '(lower held-out loss).')
SOURCE = 'Zhou et al. 2022, Mixture-of-Experts with Expert Choice Routing (sec. 4)'
NON_INFERIORITY_MARGIN = 0.01  # nats / byte


# The paired differences (member, baseline, metric) the verdict tests, each claimed < its margin.
COMPARISONS = [('expert_choice', 'gshard_top2', 'eval_loss')]

def get_config(arg: str | None = None):
  scale = common.scale_of(arg)
  return common.sweep_config('lm', scale, flops_match='active', members={
      'gshard_top2': {'moe': {'router': 'token_choice', 'k': 2, 'capacity_factor': 1.25}},
      'expert_choice': {'moe': {'router': 'expert_choice', 'capacity_factor': 2.0,
                                'group_by': 'position'}},
  })


def verdict(results) -> common.Verdict:
  beats = common.compare_lower(results, 'expert_choice', 'gshard_top2', 'eval_loss')
  matches = common.compare_lower(results, 'expert_choice', 'gshard_top2', 'eval_loss',
                                 margin=NON_INFERIORITY_MARGIN)
  note = (f'non-inferiority (worse by less than {NON_INFERIORITY_MARGIN} nats/byte), not the '
          f'claim: {matches.outcome}')
  return common.Verdict(beats.outcome, beats.line, common.member_rows(
      results, [('eval_loss', 'eval loss', 4), ('dropped', 'dropped', 3)]), (note,))
