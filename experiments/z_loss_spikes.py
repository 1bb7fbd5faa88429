"""Claim (d): the router z-loss prevents the divergences that bfloat16 router logits cause.

  python -m experiments run --claims d --scale cpu --workdir runs/claims
  moe-jax sweep --config experiments/z_loss_spikes.py:scale=cpu --workdir runs/z_loss_spikes   (its runs, no verdict)

ST-MoE's regime: its z-loss targets the round-off of large router logits in bfloat16 ("a 0.5
round-off in logits near 128 alters the softmax output by 36%"), and it measures stability as the
fraction of runs that diverge (table 4: 4 of 6 baseline runs stable, 3 of 3 with the z-loss).
Both arms round the router logits to bfloat16 (`moe.router_dtype`) and train without gradient
clipping (clipping is itself a stabilizer) at LEARNING_RATE, found by the pilot as the positive
control: the lowest candidate rate at which the arm without z-loss diverged (experiments/PROTOCOL.md).
The metric is `common.divergences`: 1 for a run whose loss went non-finite or jumped lastingly
(the median of the next 20 logged losses > 1.1 x the median of the previous 20), else 0. The
claim holds if the z-loss arm diverges less (the paired interval below 0); the verdict is invalid
if the arm without z-loss diverged in fewer than half its seeds (the positive control failed).
"""
from experiments import common

STATEMENT = ('The router z-loss prevents divergence when router logits are rounded to bfloat16 '
             '(fewer runs diverge).')
SOURCE = 'Zoph et al. 2022, ST-MoE (sec. 3.1, fig. 2, table 4)'
METRIC = 'divergences'
Z_LOSS = 1e-3  # ST-MoE's c_z
# The positive control's rate at each scale, fixed by the pilot (PROTOCOL.md); None until it ran.
LEARNING_RATE = {'cpu': 3e-2, 'gpu': None}
PILOT_RATES = (3e-3, 1e-2, 3e-2)  # the candidates the pilot tries without z-loss

# The paired differences (member, baseline, metric) the verdict tests, each claimed < its margin.
COMPARISONS = [('z_loss', 'no_z_loss', 'divergences')]


def _regime(rate):
  def change(base) -> None:
    base.moe.router_dtype = 'bfloat16'
    base.train.update(log_every=1, clip_norm=0.0, learning_rate=rate)
  return change


def get_config(arg: str | None = None):
  scale = common.scale_of(arg)
  if LEARNING_RATE[scale] is None:
    raise ValueError(f'claim (d) has no regime at scale={scale} yet: run its pilot first '
                     f'(python -m experiments pilot --scale {scale} --claims d --seeds 1000 '
                     '--workdir DIR) and fix LEARNING_RATE from it, as experiments/PROTOCOL.md says.')
  # Both arms are the same model, so the FLOPs convention cannot matter; 'active' as (a)-(c).
  return common.sweep_config('lm', scale, flops_match='active', members={
      'no_z_loss': {'moe': {'z_loss_coef': 0.0}},
      'z_loss': {'moe': {'z_loss_coef': Z_LOSS}},
  }, base_changes=_regime(LEARNING_RATE[scale]), seeds=range(3) if scale == 'cpu' else range(6))


def pilot_config(arg: str | None = None):
  """The pilot's search for the positive control: no z-loss at each of PILOT_RATES."""
  scale = common.scale_of(arg)
  return common.sweep_config('lm', scale, flops_match='active', members={
      f'no_z_loss_lr{rate:g}'.replace('.', '_'): {'moe': {'z_loss_coef': 0.0}, 'train': {'learning_rate': rate}}
      for rate in PILOT_RATES}, base_changes=_regime(PILOT_RATES[0]))


def verdict(results) -> common.Verdict:
  rows = common.member_rows(results, [('divergences', 'diverged', 2),
                                      ('max_jump', 'max jump', 3), ('eval_loss', 'eval loss', 4)])
  control = common.values(results, 'no_z_loss', 'divergences')
  test = common.compare_lower(results, 'z_loss', 'no_z_loss', 'divergences', what='divergences')
  counts = ', '.join(f'{name} {int(sum(common.values(results, name, "divergences")))} of '
                     f'{len(results[name]["runs"])}' for name in results)
  if sum(control) < len(control) / 2:
    return common.Verdict('invalid', f'positive control failed: runs diverged: {counts}; without '
                          'z-loss fewer than half diverged, so this regime cannot show what '
                          'z-loss prevents', rows)
  return common.Verdict(test.outcome, f'runs diverged: {counts}; ' + test.line, rows)
