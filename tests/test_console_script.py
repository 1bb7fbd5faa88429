"""The installed `moe-jax` console script as a user runs it: from a folder outside the repository,
without PYTHONPATH, with absolute config paths. Its mistakes end in one short message and exit
code 2, and a failed start writes nothing. Each command stops before training but for the
upcycling one, which trains 2 steps of a tiny LM.
"""
import os
import pathlib
import subprocess
import sys

import pytest

from moe_jax import cli
from moe_jax.data import text as text_data

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / 'configs'
MOE_JAX = pathlib.Path(sys.executable).parent / 'moe-jax'
TINY = ['--config.data.seq_len=32', '--config.data.batch_size=4', '--config.model.d_model=32',
        '--config.model.num_layers=2', '--config.model.num_heads=2', '--config.model.d_ff=64',
        '--config.moe.num_experts=4', '--config.moe.d_ff=64', '--config.train.steps=2',
        '--config.train.warmup_steps=0', '--config.train.eval_batches=1',
        '--config.train.progress=False']


def moe_jax(cwd, *args, xla_flags=True, timeout=300):
  """Runs the console script in `cwd` on CPU, without PYTHONPATH (xla_flags=False: without the
  tests' XLA_FLAGS either, so one CPU device). Returns the CompletedProcess."""
  assert MOE_JAX.is_file(), f'{MOE_JAX} is missing: pip install -e . into this environment'
  assert ROOT not in pathlib.Path(cwd).resolve().parents
  env = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
  env['JAX_PLATFORMS'] = 'cpu'
  if not xla_flags:
    env.pop('XLA_FLAGS', None)
  return subprocess.run([str(MOE_JAX), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def assert_one_message(result, *parts):
  """Exit code 2 and a short stderr without a traceback, holding every one of `parts`."""
  err = result.stderr
  assert result.returncode == 2, (result.returncode, err[-3000:])
  assert 'Traceback' not in err and len(err.strip().splitlines()) <= 4, err[-3000:]
  for part in parts:
    assert part in err, (part, err)


# --- Configs inside a package, from any folder ---------------------------------------------------


def test_paper_configs_load_from_another_folder(tmp_path):
  """configs/papers/*.py import `configs.papers.common`: the folder above the top package (the
  repository root) goes on sys.path, not configs/."""
  result = moe_jax(tmp_path, 'config', '--config', CONFIGS / 'papers' / 'deepseek_moe_2b.py')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'num_shared_experts: 1' in result.stdout
  result = moe_jax(tmp_path, 'plan', '--config', CONFIGS / 'papers' / 'switch_base.py',
                   '--config.mesh.data=32', '--config.mesh.expert=8')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'fits' in result.stdout and 'ModuleNotFoundError' not in result.stderr


# --- Upcycling: relative source, nothing written by a failed start ------------------------------


def test_upcycle_from_a_relative_workdir_and_a_failed_start_writes_nothing(data_dir, tmp_path):
  assert cli.main(['moe-jax', 'train', '--config', str(CONFIGS / 'lm_tiny.py'), '--workdir',
                   str(tmp_path / 'runs' / 'dense'), f'--config.data.data_dir={data_dir}', *TINY,
                   '--config.model.moe_every=0']) == 0
  command = ['train', '--config', CONFIGS / 'upcycle.py', f'--config.data.data_dir={data_dir}',
             *TINY]
  typo = moe_jax(tmp_path, *command, '--workdir', 'runs/up',
                 '--config.upcycle.from_workdir=runs/dens')
  assert_one_message(typo, f"config.upcycle.from_workdir='{tmp_path / 'runs' / 'dens'}'")
  assert not (tmp_path / 'runs' / 'up').exists()
  (tmp_path / 'runs' / 'empty').mkdir()  # an existing workdir stays as it was
  typo = moe_jax(tmp_path, *command, '--workdir', 'runs/empty',
                 '--config.upcycle.from_workdir=runs/dens')
  assert typo.returncode == 2 and not any((tmp_path / 'runs' / 'empty').iterdir())

  corrected = moe_jax(tmp_path, *command, '--workdir', 'runs/up',
                      '--config.upcycle.from_workdir=runs/dense')
  assert corrected.returncode == 0, corrected.stderr[-3000:]
  assert 'upcycled the dense run' in corrected.stderr
  assert (tmp_path / 'runs' / 'up' / 'summary.json').is_file()


# --- Short errors -------------------------------------------------------------------------------


def test_config_file_with_a_syntax_error_is_one_message(tmp_path):
  config = tmp_path / 'broken.py'
  config.write_text('import ml_collections\n\ndef get_config()\n  return None\n')
  assert_one_message(moe_jax(tmp_path, 'config', '--config', config),
                     f'config file {config}, line 3', 'fix the Python syntax')


def test_unknown_data_set_fails_at_once_naming_the_offline_ones(data_dir, tmp_path):
  result = moe_jax(tmp_path, 'train', '--config', CONFIGS / 'lm_tiny.py', '--workdir', 'run',
                   '--config.data.name=wikitext', f'--config.data.data_dir={data_dir}', *TINY)
  assert_one_message(result, "config.data.name='wikitext'", "'tiny_shakespeare'", "'english_mix'",
                     'network', 'config.data.data_dir')
  assert len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / 'run').exists()


def test_a_stock_data_set_that_fails_to_load_is_one_line(tmp_path, monkeypatch):
  """A name TFDS knows goes to stock TFDS (the network); its failure is a one-line
  FileNotFoundError that the CLI prints without a traceback."""
  import tensorflow_datasets as tfds

  def offline(*args, **kwargs):
    raise RuntimeError('Failed to resolve storage.googleapis.com\nand more lines')

  monkeypatch.setattr(tfds, 'data_source', offline)
  with pytest.raises(FileNotFoundError) as raised:
    text_data.load_text_splits('imdb_reviews', data_dir=tmp_path)
  message = str(raised.value)
  assert len(message.splitlines()) == 1
  for part in ("'imdb_reviews'", 'RuntimeError: Failed to resolve', 'network',
               "'tiny_shakespeare'"):
    assert part in message, (part, message)


def test_a_sweep_override_outside_base_names_the_base_path(tmp_path):
  result = moe_jax(tmp_path, 'sweep', '--config', CONFIGS / 'compare_routers.py', '--workdir',
                   'sweep', '--config.train.steps=10')
  assert_one_message(result, "a sweep's fields live under base.", '--config.base.train.steps=10')
  assert not (tmp_path / 'sweep').exists()


# --- None for optional fields; `config` refuses what train refuses -------------------------------


def test_capacity_factor_none_parses(tmp_path):
  for none in (['--config.moe.capacity_factor=None'], ['--config.moe.capacity_factor', 'none']):
    result = moe_jax(tmp_path, 'config', '--config', CONFIGS / 'lm_tiny.py', *none)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'capacity_factor: null' in result.stdout


@pytest.mark.parametrize('overrides, value', [
    (['--config.moe.capacity_factor=None', '--config.moe.capacity_factor=2'], 2.0),
    (['--config.moe.capacity_factor=2', '--config.moe.capacity_factor=none'], None),
    (['--config.moe.renormalize=None'], None),
    (['--config.data.manual_dir=None'], None),
], ids=['later_value_wins', 'later_none_wins', 'optional_bool', 'placeholder'])
def test_none_override_order_and_fields(monkeypatch, overrides, value):
  seen = {}
  monkeypatch.setitem(cli.COMMANDS, 'config', cli.Command(
      'capture', cli._config_flag, lambda fv: seen.update(config=fv.config)))
  assert cli.main(['moe-jax', 'config', '--config', str(CONFIGS / 'lm_tiny.py'),
                   *overrides]) == 0
  field = overrides[-1].split('=')[0].removeprefix('--config.')
  section, name = field.split('.')
  assert seen['config'][section][name] == value


def test_none_for_a_field_that_cannot_be_none_is_one_message(capsys):
  assert cli.main(['moe-jax', 'config', '--config', str(CONFIGS / 'lm_tiny.py'),
                   '--config.moe.k=None']) == 2
  err = capsys.readouterr().err
  assert 'Traceback' not in err and 'config.moe.k cannot be None' in err


def test_config_command_refuses_what_train_refuses(tmp_path):
  result = moe_jax(tmp_path, 'config', '--config', CONFIGS / 'lm_tiny.py', '--config.moe.k=16')
  assert_one_message(result, 'config.moe.k=16', 'num_experts=8')
  assert result.stdout == ''


# --- A mesh larger than the machine ------------------------------------------------------------


def test_a_mesh_needing_more_devices_names_the_xla_flag(tmp_path):
  result = moe_jax(tmp_path, 'train', '--config', CONFIGS / 'lm_tiny.py', '--workdir', 'ep',
                   '--config.mesh.data=2', '--config.mesh.expert=4', xla_flags=False)
  assert_one_message(result, 'config.mesh.data=2 * config.mesh.expert=4 = 8',
                     'XLA_FLAGS=--xla_force_host_platform_device_count=8')
  assert not (tmp_path / 'ep').exists()
