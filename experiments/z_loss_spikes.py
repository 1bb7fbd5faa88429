"""Claim (d): the router z-loss reduces training-loss spikes.

  python -m experiments run --claims d --scale cpu --workdir runs/claims

Switch top-1 with the ST-MoE router z-loss (coefficient 1e-3) against the same model without it.
The training loss is logged at every step; the spike metric is `common.spike_count`: the number of
steps whose loss exceeds the median of the 10 previous steps' losses by more than 10% (minibatch
noise at these batch sizes stays under ~5%). The regime is chosen to invite instability, before
and independently of any comparison: a 3x higher peak learning rate than the other claims and no
gradient clipping (clipping is itself a stabilizer that would hide what z-loss is claimed to fix).
The claim holds if the z-loss arm has fewer spikes (the 95% interval of the paired difference
below 0); if neither arm spikes, it is not reproduced at this scale.
"""
from experiments import common

STATEMENT = ('The router z-loss reduces loss spikes (steps whose training loss jumps > 10% over '
             'the median of the previous 10 steps).')
SOURCE = 'Zoph et al. 2022, ST-MoE (sec. 3.1, table 4)'


def _unstable(base) -> None:
  base.train.update(log_every=1, clip_norm=0.0,
                    learning_rate=3 * base.train.learning_rate)


# The paired differences (member, baseline, metric) the verdict tests, each claimed < its margin.
COMPARISONS = [('z_loss', 'no_z_loss', 'spikes')]

def get_config(scale: str = 'cpu'):
  # Both arms are the same model, so the FLOPs convention cannot matter; 'active' as (a)-(c).
  return common.sweep_config('lm', scale, flops_match='active', members={
      'no_z_loss': {'moe': {'z_loss_coef': 0.0}},
      'z_loss': {'moe': {'z_loss_coef': 1e-3}},
  }, base_changes=_unstable, seeds=range(3) if scale == 'cpu' else range(4))


def verdict(results) -> common.Verdict:
  rows = common.member_rows(results, [('spikes', 'spikes', 2), ('max_jump', 'max jump', 3),
                                      ('eval_loss', 'eval loss', 4)])
  total = sum(common.values(results, name, 'spikes')[i]
              for name in results for i in range(len(results[name]['runs'])))
  if total == 0:
    jumps = {name: common.Interval.of(common.values(results, name, 'max_jump')).mean
             for name in results}
    return common.Verdict('inconclusive', 'no spikes in either arm, so nothing for z-loss to reduce at '
                          'this scale (mean largest jump: ' + ', '.join(
                              f'{name} {jump:+.1%}' for name, jump in jumps.items()) + ')', rows)
  test = common.compare_lower(results, 'z_loss', 'no_z_loss', 'spikes', what='spikes')
  return common.Verdict(test.outcome, test.line, rows)
