"""The `moe-jax` command line in daily use: short errors for a user's mistakes, Ctrl-C,
the non-finite loss guard, TensorBoard events, `moe-jax config` (presets, configs/ as a package).

Every run is the same tiny LM (8 steps), so the compiled steps are shared by all tests here.
"""
import json
import os
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm_tiny
from moe_jax import cli
from moe_jax.data import text
from moe_jax.moe import families, spec
from moe_jax.run import memory_plan, train
from tests import tensorboard_reader

TINY = ['--config.data.seq_len=32', '--config.data.batch_size=4', '--config.model.d_model=32',
        '--config.model.num_layers=2', '--config.model.num_heads=2', '--config.model.d_ff=64',
        '--config.moe.num_experts=4', '--config.moe.d_ff=64', '--config.train.steps=8',
        '--config.train.warmup_steps=2', '--config.train.log_every=1',
        '--config.train.eval_every=4', '--config.train.eval_batches=2',
        '--config.train.checkpoint_every=4', '--config.train.progress=False']


def train_args(data_dir, workdir, *extra):
  return ['moe-jax', 'train', '--config', lm_tiny.__file__, '--workdir', str(workdir),
          f'--config.data.data_dir={data_dir}', *TINY, *extra]


def read_metrics(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def checkpoints(workdir):
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def assert_short_error(err, *parts):
  assert 'Traceback' not in err and len(err.strip().splitlines()) <= 8, err
  for part in parts:
    assert part in err, (part, err)


@pytest.fixture(scope='module')
def straight_run(data_dir, tmp_path_factory):
  """The run directory of an uninterrupted tiny run through the CLI."""
  workdir = tmp_path_factory.mktemp('straight')
  assert cli.main(train_args(data_dir, workdir)) == 0
  return workdir


# --- Short errors -------------------------------------------------------------------------------


@pytest.mark.parametrize('extra, parts', [
    (['--config.moe.router=foo'], ["config.moe.router='foo'", 'token_choice']),
    (['--config.moe.capacity_factor=-1.0'], ['config.moe.capacity_factor=-1.0']),
    (['--config.train.warmup_steps=8'], ['config.train.warmup_steps=8', 'steps=8']),
], ids=['unknown_router', 'negative_capacity', 'warmup_not_below_steps'])
def test_bad_field_value_is_one_message(data_dir, tmp_path, capsys, extra, parts):
  assert cli.main(train_args(data_dir, tmp_path / 'run', *extra)) == 2
  assert_short_error(capsys.readouterr().err, 'moe-jax train: ', *parts)
  assert not (tmp_path / 'run').exists()


def test_missing_config_file_is_one_message(tmp_path, capsys):
  args = ['moe-jax', 'train', '--config', str(tmp_path / 'nope.py'), '--workdir',
          str(tmp_path / 'run'), '--config.moe.k=2']
  assert cli.main(args) == 2
  assert_short_error(capsys.readouterr().err, f'config file {tmp_path / "nope.py"} not found')


@pytest.mark.parametrize('arg, message', [
    ('nope', "config argument 'nope' is unknown: choose from ['dropless', 'scale']"),
    ('scale=tpu', "scale='tpu' is invalid: choose one of ('cpu', 'gpu')"),
])
def test_bad_config_argument_is_one_message(capsys, arg, message):
  assert cli.main(['moe-jax', 'config', '--config', f'{lm_tiny.__file__}:{arg}']) == 2
  assert_short_error(capsys.readouterr().err, message)


def test_workdir_that_is_a_file_is_one_message(data_dir, tmp_path, capsys):
  (tmp_path / 'file').write_text('')
  assert cli.main(train_args(data_dir, tmp_path / 'file')) == 2
  assert_short_error(capsys.readouterr().err, 'is a file')


def test_report_without_runs_is_one_message(tmp_path, capsys):
  assert cli.main(['moe-jax', 'report', '--workdir', str(tmp_path)]) == 2
  assert_short_error(capsys.readouterr().err, 'no finished runs')


def test_missing_data_is_one_message_and_writes_no_config(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv(text.DATA_DIR_ENV, str(tmp_path))  # holds no tiny_shakespeare/
  workdir = tmp_path / 'run'
  assert cli.main(train_args(tmp_path / 'tfds', workdir)) == 2
  assert_short_error(capsys.readouterr().err, "Data set 'tiny_shakespeare' not found",
                     '--config.data.manual_dir')
  assert not (workdir / 'config.json').exists()  # so the corrected rerun is no 'different config'


def test_a_bug_in_the_step_keeps_its_traceback(data_dir, tmp_path, monkeypatch):
  """A ValueError from the model's code is no user mistake: the CLI does not shorten it."""
  def broken_step(*args, **kwargs):
    raise ValueError('shapes do not match')

  broken_step.lower = train.train_step.lower  # the trainer's memory analysis compiles through it
  monkeypatch.setattr(train, 'train_step', broken_step)
  with pytest.raises(RuntimeError, match='training failed at step 1: shapes do not match'):
    cli.main(train_args(data_dir, tmp_path / 'run'))


# --- Ctrl-C, non-finite loss --------------------------------------------------------------------


def step_patched(monkeypatch, at_call, change, before=False):
  """Makes train.train_step's `at_call`-th call (from 1) return change(state, metrics), or, with
  `before`, change(*args, **kwargs) in place of the step."""
  real_step, calls = train.train_step, []

  def step(*args, **kwargs):
    calls.append(None)
    if len(calls) == at_call:
      return change(*args, **kwargs) if before else change(*real_step(*args, **kwargs))
    return real_step(*args, **kwargs)

  step.lower = real_step.lower  # the trainer's memory analysis compiles through it
  monkeypatch.setattr(train, 'train_step', step)


def interrupt_before(monkeypatch, at_call):
  """Ctrl-C as train.train_step's `at_call`-th call (from 1) starts, before it takes the state."""
  def interrupt(*args, **kwargs):
    raise KeyboardInterrupt

  step_patched(monkeypatch, at_call, interrupt, before=True)


def test_ctrl_c_inside_a_step_keeps_the_last_checkpoint(data_dir, tmp_path, capsys,
                                                         monkeypatch):
  """A KeyboardInterrupt raised after step 6 took (was donated) the state of step 5: that state is
  gone, so the run stops at its last checkpoint (step 4) and says so."""
  def interrupt(state, metrics):
    raise KeyboardInterrupt

  step_patched(monkeypatch, 6, interrupt)
  workdir = tmp_path / 'run'
  assert cli.main(train_args(data_dir, workdir)) == 130
  assert_short_error(capsys.readouterr().err,
                     'interrupted at step 4; rerun the same command to resume')
  assert checkpoints(workdir) == [4]


def test_ctrl_c_checkpoints_then_resume_matches_an_uninterrupted_run(
    straight_run, data_dir, tmp_path, capsys, monkeypatch):
  interrupt_before(monkeypatch, 6)  # as step 6 starts: steps 1-5 are done
  workdir = tmp_path / 'run'
  assert cli.main(train_args(data_dir, workdir)) == 130
  assert_short_error(capsys.readouterr().err,
                     'interrupted at step 5; rerun the same command to resume')
  assert checkpoints(workdir) == [4, 5]
  assert [r['step'] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5]
  first_call = json.loads((workdir / 'timing.json').read_text())

  monkeypatch.undo()
  assert cli.main(train_args(data_dir, workdir)) == 0
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['resumed_from_step'] == 5
  memory = summary['step_memory_bytes']  # XLA's analysis of the resumed call's step
  assert memory['argument'] > 0 and memory['output'] > 0, memory
  assert memory['total'] >= max(memory['argument'], memory['output']), memory
  assert summary['wall_s'] > first_call['wall_s'] > 0  # the whole run, both calls
  assert json.loads((workdir / 'timing.json').read_text())['timed_steps'] == 4 + 2
  got, expected = read_metrics(workdir), read_metrics(straight_run)
  assert [set(r) for r in got] == [set(r) for r in expected]
  for mine, theirs in zip(got, expected):
    for key in set(mine) - {'tokens_per_s'}:
      np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-6, err_msg=key)
  # TensorBoard shows each step once: the points past step 5 of the first call are gone.
  def points(run):  # tokens/s is absent right after each call's first (compiling) step
    return [(step, tag) for step, tag, _ in tensorboard_reader.read_events(run)
            if tag != 'train/tokens_per_s']

  assert points(workdir) == points(straight_run)


def test_non_finite_loss_stops_before_saving(data_dir, tmp_path, capsys, monkeypatch):
  step_patched(monkeypatch, 8, lambda state, metrics: (state, {**metrics, 'train_loss': jnp.nan}))
  workdir = tmp_path / 'run'
  assert cli.main(train_args(data_dir, workdir)) == 1
  err = capsys.readouterr().err
  assert_short_error(err, 'train loss nan', 'at step 8', 'last good checkpoint, step 4',
                     # the knobs that would change something, with the run's values
                     'a lower config.train.learning_rate (now 0.003, e.g. 0.001)',
                     'a longer config.train.warmup_steps (now 2 of 8 steps, e.g. 4)',
                     'a smaller config.train.clip_norm (now 1.0, e.g. 0.25)',
                     'a larger config.moe.z_loss_coef (now 0.001, e.g. 0.01')
  assert 'clip_norm > 0' not in err  # clipping is on by default: no advice to turn it on
  assert checkpoints(workdir) == [4]  # the final step's state was not saved
  assert [r['step'] for r in read_metrics(workdir)] == list(range(1, 8))
  assert not (workdir / 'summary.json').exists()


# --- TensorBoard, moe-jax config ----------------------------------------------------------------


def test_run_writes_tensorboard_events(straight_run):
  events = tensorboard_reader.read_events(straight_run)
  steps = {}
  for step, tag, value in events:
    steps.setdefault(tag, []).append(step)
  assert steps['train/loss'] == steps['train/learning_rate'] == list(range(1, 9))
  assert steps['eval/loss'] == [4, 8]
  assert steps['train/tokens_per_s'] == list(range(2, 9))  # none right after the compiling step
  for metric in ('fraction_dropped', 'router_entropy', 'max_over_mean_load', 'tokens_per_expert'):
    assert steps[f'moe/block_1/{metric}'] == list(range(1, 9)), metric
  last = {tag: value for step, tag, value in events if step == 8}
  record = read_metrics(straight_run)[-1]
  assert last['eval/loss'] == pytest.approx(record['eval_loss'])
  assert last['moe/block_1/tokens_per_expert'] == record['moe/block_1/tokens_per_expert']


def test_config_command_prints_resolved_config_and_router_options(capsys):
  assert cli.main(['moe-jax', 'config', '--config', f'{lm_tiny.__file__}:dropless',
                   '--config.moe.router=hash']) == 0
  out = capsys.readouterr().out
  assert 'router: hash' in out and 'capacity_factor: null' in out and 'learning_rate:' in out
  for choice in (*families.names(), *spec.GROUPINGS, *spec.PRIORITIES, 'dispatch:', 'z_loss_coef'):
    assert choice in out
  assert cli.main(['moe-jax', 'train', '--help']) == 0
  assert 'moe-jax config' in capsys.readouterr().out
  # What train would refuse (Soft MoE has slots, not a dropless capacity), config refuses too.
  assert cli.main(['moe-jax', 'config', '--config', f'{lm_tiny.__file__}:dropless',
                   '--config.moe.router=soft']) == 2
  out, err = capsys.readouterr()
  assert out == '' and 'config.moe.capacity_factor=None is invalid: soft routing' in err


@pytest.mark.parametrize('config, printed', [('compare_routers.py', 'switch_top1'),
                                             ('papers/switch_base.py', 'num_experts: 128')])
def test_a_config_imports_its_package_however_moe_jax_started(monkeypatch, capsys, config,
                                                              printed):
  """compare_routers.py imports configs.lm_tiny, papers/switch_base.py configs.papers.common; a
  console script's sys.path lacks the repository root, so moe-jax puts the folder above a config
  file's top-most package there."""
  root = pathlib.Path(lm_tiny.__file__).resolve().parents[1]
  monkeypatch.setattr(sys, 'path', [p for p in sys.path
                                    if pathlib.Path(os.path.abspath(p or '.')).resolve() != root])
  for name in [name for name in sys.modules if name.split('.')[0] == 'configs']:
    monkeypatch.delitem(sys.modules, name)
  assert cli.main(['moe-jax', 'config', '--config', str(root / 'configs' / config)]) == 0
  assert str(root) in sys.path and printed in capsys.readouterr().out


@pytest.mark.parametrize('user_value', [None, '0.5'])
def test_train_lets_jax_take_the_share_of_gpu_memory_the_plan_counts(user_value, data_dir,
                                                                    tmp_path, monkeypatch):
  """`moe-jax train` sets XLA_PYTHON_CLIENT_MEM_FRACTION to the plan's HEADROOM before JAX starts
  its backend (JAX's default, 75%, would not hold a scale=gpu preset the plan fits in 90%); a
  value the user set stands."""
  monkeypatch.setenv(memory_plan.MEMORY_FRACTION, 'restored after the test')
  if user_value is None:
    monkeypatch.delenv(memory_plan.MEMORY_FRACTION)
  else:
    monkeypatch.setenv(memory_plan.MEMORY_FRACTION, user_value)
  seen = []
  monkeypatch.setattr(train, 'train', lambda config, workdir: seen.append(
      os.environ.get(memory_plan.MEMORY_FRACTION)) or {})
  assert cli.main(train_args(data_dir, tmp_path / 'run')) == 0
  assert seen == [user_value or str(memory_plan.HEADROOM)] and memory_plan.HEADROOM == 0.9
