"""The paper-claim reproductions (experiments/): configs, statistics, and one claim end to end.

Every claim's sweep builds at both scales with the FLOPs it promises; the interval and spike
arithmetic is checked by hand; claim (a) runs for real at cpu scale with 2 seeds through the
`python -m experiments` entry point and writes claims.md, and a rerun reuses the finished runs.
"""
import importlib
import json

import numpy as np
import pytest

from configs.common import SCALES
from experiments import CLAIMS, common
from experiments.__main__ import main, prepare_data
from moe_jax.models import transformer
from moe_jax.run import sweep, tasks


@pytest.mark.parametrize('scale', SCALES)
@pytest.mark.parametrize('key', sorted(CLAIMS))
def test_every_claim_builds_with_its_flops(key, scale):
  module = importlib.import_module(f'experiments.{CLAIMS[key]}')
  if getattr(module, 'LEARNING_RATE', {}).get(scale, 1.0) is None:  # (d) before its pilot
    with pytest.raises(ValueError, match='run its pilot first'):
      module.get_config(f'scale={scale}')
    config = module.pilot_config(f'scale={scale}')  # the pilot builds instead
  else:
    config = module.get_config(f'scale={scale}')
  assert module.STATEMENT and module.SOURCE and len(config.seeds) >= 3
  assert tasks.of(config.base) is tasks.get(config.task)  # the base config says its task
  members = sweep.build_members(config)
  flops_of = tasks.get(config.task).flops_per_token
  assert len(members) >= 2
  assert config.flops_match in ('active', 'executed')
  flops = [flops_of(c, config.flops_match) for c in members.values()]
  if config.size_experts:  # equal-FLOPs claims
    assert max(flops) / min(flops) - 1 < 0.02
  else:  # (e): the same expert width, so FLOPs grow with the capacity factor
    assert flops == sorted(flops) and flops[-1] > flops[0]


@pytest.mark.parametrize('scale', SCALES)
def test_a_pilot_prepares_its_pilot_sweeps_data(scale, monkeypatch):
  """`pilot --jobs N` prepares the data of the pilot's sweep, which exists before the claim's
  final regime is fixed ((d)'s get_config refuses until then)."""
  from moe_jax.data import text
  prepared = []
  monkeypatch.setattr(text, 'load_text_splits', lambda name, **kw: prepared.append(name))
  prepare_data(['d'], scale, None, pilot=True)
  pilot_sweep = importlib.import_module(f'experiments.{CLAIMS["d"]}').pilot_config(f'scale={scale}')
  assert prepared == [pilot_sweep.base.data.name]


def test_fine_grained_member_has_gshards_total_params():
  from experiments import fine_grained_shared
  members = sweep.build_members(fine_grained_shared.get_config('scale=cpu'))
  total = {name: transformer.param_counts(c)[0] for name, c in members.items()}
  assert abs(total['fine_grained_shared'] / total['gshard_top2'] - 1) < 0.05


def test_interval_by_hand():
  interval = common.Interval.of([1.0, 2.0, 3.0])
  assert interval.mean == 2.0
  assert interval.half_width == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-6)  # t(0.975, 2)


def test_spike_count_by_hand():
  flat = [2.0] * 12
  assert common.spike_count(flat) == 0
  assert common.spike_count(flat[:11] + [2.3] + [2.0] * 3) == 1  # +15% over the median
  assert common.spike_count(flat[:11] + [2.1] + [2.0] * 3) == 0  # +5%: noise


def test_outcomes_need_the_whole_interval_on_one_side_of_the_margin():
  runs = lambda losses: {'description': '', 'runs': [{'eval_loss': x} for x in losses]}
  clear = {'moe': runs([1.0, 1.1, 1.2]), 'dense': runs([1.5, 1.6, 1.7])}
  assert common.compare_lower(clear, 'moe', 'dense', 'eval_loss').outcome == 'reproduced'
  assert common.compare_lower(clear, 'dense', 'moe', 'eval_loss').outcome == 'refuted'
  # Differences -0.5, +0.1, -0.1: the interval straddles 0, and the line says how large an effect
  # three such seeds could detect instead of calling either direction.
  noisy = {'moe': runs([1.0, 1.7, 1.2]), 'dense': runs([1.5, 1.6, 1.3])}
  test = common.compare_lower(noisy, 'moe', 'dense', 'eval_loss')
  assert test.outcome == 'inconclusive' and 'opposite' not in test.line
  sd = np.std([-0.5, 0.1, -0.1], ddof=1)
  assert test.mde == pytest.approx((4.302653 + 1.060660) * sd / np.sqrt(3), rel=1e-5)
  assert f'minimum detectable effect {test.mde:.4f}' in test.line
  assert 'per seed -0.5000, +0.1000, -0.1000' in test.line
  # A margin moves the line the interval is read against: -0.5 +- ... is below 0.3 wholly.
  assert common.compare_lower(clear, 'dense', 'moe', 'eval_loss', margin=0.6).outcome == 'reproduced'


def test_minimum_detectable_effect_by_hand():
  # (t(0.975, 4) + t(0.8, 4)) * sd / sqrt(5) = (2.776445 + 0.940965) * 0.01 / 2.236068
  assert common.minimum_detectable_effect(0.01, 5) == pytest.approx(0.016625, rel=1e-4)
  assert common.minimum_detectable_effect(0.01, 1) == np.inf


def test_combined_outcome_needs_every_part():
  assert common.combined(['reproduced', 'reproduced']) == 'reproduced'
  assert common.combined(['reproduced', 'inconclusive']) == 'inconclusive'
  assert common.combined(['inconclusive', 'refuted']) == 'refuted'


def test_claims_end_to_end_at_cpu_scale_in_parallel(tmp_path, capsys, monkeypatch):
  # The claims' processes train for minutes: one device, as on a laptop, and XLA's default
  # optimization (conftest.py's cheaper compile would slow their 200-step runs by ~30%).
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  workdir = tmp_path / 'claims'
  argv = ['run', '--scale', 'cpu', '--claims', 'a,b', '--seeds', '2', '--jobs', '2', '--workdir',
          str(workdir), '--data_dir', str(tmp_path / 'tfds')]
  main(argv)
  out = capsys.readouterr().out
  for key, claim in (('a', 'moe_vs_dense'), ('b', 'expert_choice_vs_top2')):
    for member in (('dense', 'switch_top1') if key == 'a' else ('gshard_top2', 'expert_choice')):
      for seed in (0, 1):  # each run trained in its own process...
        assert f'({key}) {member} seed {seed}: finished' in out
        assert 'trained in' in (workdir / f'{key}_{claim}' / member / f'seed_{seed}.log').read_text()
  assert 'trained in' not in out  # ...and the table pass only read the finished runs
  text = (workdir / 'claims.md').read_text()
  assert '| (a) moe_vs_dense |' in text and '| (b) expert_choice_vs_top2 |' in text
  rows = [line for line in text.splitlines() if line.startswith('| (')]
  assert len(rows) == 2 and all(any(f'| **{o}** |' in row for o in common.OUTCOMES) for row in rows)
  assert text.count('Outcome: **') == 2  # each claim's section
  assert 'eval_loss per seed:' in text and '| seed 0 | seed 1 |' in text
  assert text.count('| 2 |') == 2  # the seeds that ran, in each claim's row
  assert '| dense | dense f=256 |' in text and '| switch_top1 | token_choice k=1' in text
  assert '--jobs 2' in text
  runs = sorted(p.parent.relative_to(workdir / 'a_moe_vs_dense').as_posix()
                for p in (workdir / 'a_moe_vs_dense').glob('*/*/summary.json'))
  assert runs == ['dense/seed_0', 'dense/seed_1', 'switch_top1/seed_0', 'switch_top1/seed_1']
  seeds = [json.loads((workdir / 'a_moe_vs_dense' / r / 'config.json').read_text())['seed']
           for r in runs]
  assert seeds == [0, 1, 0, 1]
  train_minutes = [float(line.rsplit('|', 2)[1].split()[0]) for line in text.splitlines()
                   if line.startswith('| (')]
  assert len(train_minutes) == 2 and all(m > 0 for m in train_minutes)

  jobs = argv.index('--jobs')
  main(argv[:jobs] + argv[jobs + 2:])  # in this process: every run is finished, none trains again
  assert 'trained in' not in capsys.readouterr().out
  rerun = (workdir / 'claims.md').read_text()
  assert rerun.split('\n', 4)[4] == text.split('\n', 4)[4]  # the same table (wall time aside)


def test_overfit_runs_invalidate_a_verdict():
  runs = lambda rises: {'description': '', 'runs': [{'overfit': r} for r in rises]}
  verdict = common.Verdict('reproduced', 'moe beats dense', {})
  fine = common.check_not_overfit(verdict, {'moe': runs([0.0, 0.004]), 'dense': runs([0.0, 0.0])})
  assert fine.outcome == 'reproduced' and fine.summary == 'moe beats dense'
  assert 'moe +0.4%' in fine.notes[-1]
  bad = common.check_not_overfit(verdict, {'moe': runs([0.0, 0.002]), 'dense': runs([0.05, 0.0])})
  assert bad.outcome == 'invalid' and 'INVALID' in bad.summary and 'dense' in bad.summary
  assert 'moe' not in bad.summary.split('INVALID')[1]


def test_run_numbers_measures_the_rise_of_the_held_out_loss(tmp_path):
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text('{}')
  (run / 'summary.json').write_text(json.dumps({'steps': 3, 'eval_loss': 1.1}))
  records = [{'step': 1, 'train_loss': 2.0, 'eval_loss': 1.2}, {'step': 2, 'train_loss': 1.5,
             'eval_loss': 1.0}, {'step': 3, 'train_loss': 1.0, 'eval_loss': 1.1}]
  (run / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  assert common.run_numbers(run)['overfit'] == pytest.approx(0.1)


def test_a_claim_is_a_sweep_with_seeds(tmp_path, capsys):
  # One experiment shape: `moe-jax config` reads a claim module like any config, and the sweep
  # machinery plans its runs, member x seed, seed-major.
  from moe_jax import cli
  assert cli.main(['moe-jax', 'config', '--config',
                   str(common.REPO / 'experiments' / 'moe_vs_dense.py') + ':scale=cpu']) == 0
  assert 'switch_top1' in capsys.readouterr().out
  runs = sweep.plan_runs(importlib.import_module('experiments.moe_vs_dense').get_config(),
                         tmp_path, seeds=[3, 4])
  assert [(r.member, r.seed, r.directory.relative_to(tmp_path).as_posix()) for r in runs] == [
      ('dense', 3, 'dense/seed_3'), ('switch_top1', 3, 'switch_top1/seed_3'),
      ('dense', 4, 'dense/seed_4'), ('switch_top1', 4, 'switch_top1/seed_4')]
  assert [r.config.seed for r in runs] == [3, 3, 4, 4]
