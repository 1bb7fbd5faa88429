"""Equal-FLOPs sweeps (refusal before any work, an end-to-end tiny sweep) and reports."""
import csv
import json
import pathlib

import matplotlib.image
import pytest

from configs import compare_routers, router_zoo
from moe_jax import cli
from moe_jax.models import transformer
from moe_jax.moe import families, flops
from moe_jax.run import report, sweep

ROOT = pathlib.Path(__file__).resolve().parent.parent
compare_config = compare_routers.get_config


def test_default_sweep_members_are_equal_flops():
  config = compare_config()
  members = sweep.build_members(config)
  assert list(members)[0] == 'dense' and len(members) == 7
  assert config.flops_match == 'active'
  budget = transformer.model_flops_per_token(members['dense'], 'active')
  for name, member in members.items():
    active = transformer.model_flops_per_token(member, 'active')
    assert abs(active / budget - 1) <= config.flops_tolerance, name
  # Sizing really changed the expert widths: top-2 gets about half the dense width (its capacity
  # padding is not counted in the papers' convention, only in the executed FLOPs).
  gshard = members['gshard_top2']
  assert gshard.moe.d_ff == pytest.approx(config.base.model.d_ff / 2, abs=2)
  executed = transformer.model_flops_per_token(gshard, 'executed')
  assert executed > 1.05 * budget


def test_executed_flops_match_sizes_capacity_padding():
  config = compare_config()
  config.flops_match = 'executed'
  members = sweep.build_members(config)
  budget = transformer.model_flops_per_token(members['dense'], 'executed')
  for name, member in members.items():
    executed = transformer.model_flops_per_token(member, 'executed')
    assert abs(executed / budget - 1) <= config.flops_tolerance, name
  # Top-2 at cf 1.25 runs 2.5 expert slots per token: about 1/2.5 of the dense width.
  assert members['gshard_top2'].moe.d_ff == pytest.approx(config.base.model.d_ff / 2.5, abs=4)
  config.flops_match = 'useful'
  with pytest.raises(ValueError, match=r"config.flops_match='useful' is invalid"):
    sweep.build_members(config)


def test_unequal_member_is_refused_before_anything_is_written(tmp_path):
  config = compare_config()
  config.size_experts = False
  with pytest.raises(ValueError, match=r'unequal active FLOPs(.|\n)*gshard_top2: .* \(\+'):
    sweep.run_sweep(config, tmp_path / 'sweep')
  assert not (tmp_path / 'sweep').exists()


def test_bad_member_field_is_named():
  config = compare_config()
  config.members.switch_top1.moe.capacity_factr = 2.0
  with pytest.raises(ValueError, match=r'moe.capacity_factr is not a field'):
    sweep.build_members(config)


def test_flops_check_uses_the_tolerance():
  config = compare_config()
  members = sweep.build_members(config)
  values = {n: transformer.model_flops_per_token(c, 'active') for n, c in members.items()}
  budget = values['dense']
  values['switch_top1'] *= 1.05
  with pytest.raises(ValueError, match='switch_top1'):
    flops.check_equal_flops(values, budget, tolerance=0.02)
  flops.check_equal_flops(values, budget, tolerance=0.06)


def test_tiny_sweep_end_to_end_and_resume(tmp_path, capsys):
  workdir = tmp_path / 'sweep'
  args = ['moe-jax', 'sweep', '--config', str(ROOT / 'configs' / 'compare_routers.py'),
          '--workdir', str(workdir), '--only', 'dense,switch_top1',
          '--config.base.data.data_dir', str(tmp_path / 'tfds'),
          '--config.base.data.seq_len=16', '--config.base.data.batch_size=4',
          '--config.base.model.d_model=32', '--config.base.model.num_layers=2',
          '--config.base.model.num_heads=2', '--config.base.model.d_ff=64',
          '--config.base.train.steps=4', '--config.base.train.warmup_steps=1',
          '--config.base.train.log_every=2', '--config.base.train.eval_every=2',
          '--config.base.train.eval_batches=2', '--config.base.train.progress=False']
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert '| dense | dense f=64 |' in out and '| switch_top1 | token_choice k=1 cf=1.25' in out
  assert ('wrote results.md, results.csv, eval_loss.png, dropped.png, expert_load.png in '
          f'{workdir}') in out

  with open(workdir / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['run'] for r in rows] == ['dense', 'switch_top1']
  for row in rows:
    summary = json.loads((workdir / row['run'] / 'summary.json').read_text())
    assert float(row['eval_loss']) == summary['eval_loss']
  for plot in ('eval_loss.png', 'dropped.png', 'expert_load.png'):
    image = matplotlib.image.imread(workdir / plot)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0  # a real picture
  results = (workdir / 'results.md').read_text()
  assert '![eval_loss.png](eval_loss.png)' in results
  # The table's context: steps, tokens seen, seeds, FLOPs convention, determinism, 'dropped'.
  assert '4 steps of 4 x 16 tokens of `tiny_shakespeare` = 256 training tokens; seed(s) [0]' in results
  assert 'sized to equal *active* FLOPs' in results and 'deterministic=True' in results
  assert 'within seed noise' in results and "'dropped' is the share of tokens" in results
  assert '| flops_active | flops_executed |' in results

  runs = {p: p.read_bytes() for p in workdir.glob('*/*') if p.is_file()}
  assert cli.main(args) == 0  # a second run leaves finished members alone, rewrites the report
  assert {p: p.read_bytes() for p in workdir.glob('*/*') if p.is_file()} == runs
  assert '| dense | dense f=64 |' in capsys.readouterr().out


def test_report_needs_finished_runs(tmp_path):
  with pytest.raises(FileNotFoundError, match='no finished runs'):
    report.write_report(tmp_path)


def test_router_zoo_has_every_family_at_equal_flops():
  for scale in ('cpu', 'gpu'):
    config = router_zoo.get_config(f'scale={scale}')
    members = sweep.build_members(config)
    routers = {m.moe.router for m in members.values() if m.model.moe_every}
    assert routers == set(families.FAMILIES), scale
    budget = transformer.model_flops_per_token(members['dense'], 'active')
    for name, member in members.items():
      assert abs(transformer.model_flops_per_token(member, 'active') / budget - 1) <= 0.02, name
  assert router_zoo.get_config().base.data.name == 'english_mix'  # the GPU run's data


ZOO_NEW = ('dense', 'sinkhorn_top1', 'base_layers', 'hash')


def test_router_zoo_trains_on_cpu(tmp_path, capsys):
  """The zoo's members of the new routing families, at CPU scale made tiny: 2 steps, then the
  table. (Token-choice members train in the main job's test, cosine logits, group-limited routing
  and the balance scopes in tests/test_router_zoo.py and test_parallel.py; every member's LM runs
  in tests/test_causality.py.)"""
  workdir = tmp_path / 'zoo'
  args = ['moe-jax', 'sweep', '--config', str(ROOT / 'configs' / 'router_zoo.py') + ':scale=cpu',
          '--workdir', str(workdir), '--config.base.data.data_dir', str(tmp_path / 'tfds'),
          '--only', ','.join(ZOO_NEW), '--config.base.data.seq_len=16',
          '--config.base.data.batch_size=8', '--config.base.model.d_model=32',
          '--config.base.model.num_heads=2', '--config.base.model.d_ff=64',
          '--config.base.model.num_layers=1', '--config.base.model.moe_every=1',
          '--config.base.train.steps=2',
          '--config.base.train.warmup_steps=1', '--config.base.train.log_every=1',
          '--config.base.train.eval_every=2', '--config.base.train.eval_batches=1']
  assert cli.main(args) == 0
  with open(workdir / 'results.csv') as f:
    rows = {r['run']: r for r in csv.DictReader(f)}
  assert set(rows) == set(ZOO_NEW)
  for name, row in rows.items():
    assert 0 < float(row['eval_loss']) < 10, name
  assert float(rows['base_layers']['dropped'].rstrip('%')) == 0.0  # balanced: nobody dropped
  assert 'hash dropless' in rows['hash']['ffn'] and 'sinkhorn k=1' in rows['sinkhorn_top1']['ffn']
  capsys.readouterr()
