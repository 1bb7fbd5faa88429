"""The presets of the paper configs (configs/papers/*.py:scale=cpu|gpu, `common.cpu_scale`,
`common.gpu_scale`): every cpu member trains from another folder through the command line on a
simulated 8-device mesh; every gpu member fits one 80 GB GPU by `moe-jax plan`'s count and keeps
the paper config's routing and kind of model."""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from moe_jax.run import memory_plan, tasks
from tests.conftest import cli_main

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAMES = sorted({path.stem for path in (ROOT / 'configs' / 'papers').glob('*.py')}
               - {'__init__', 'common'})
# The cpu presets' mesh: 8 simulated devices, parameters and optimizer state sharded over fsdp=2.
MESH_ARGS = ['--config.mesh.data=4', '--config.mesh.fsdp=2']
ROUTING = ('router', 'k', 'capacity_factor', 'num_shared_experts', 'score', 'renormalize',
           'priority', 'group_by', 'slots_per_expert', 'dispatch', 'bias_update_rate',
           'balance_over', 'activation')
MODEL_KIND = ('activation', 'tie_embeddings', 'd_model', 'num_heads', 'num_kv_heads', 'd_ff',
              'head_dim', 'q_lora_rank', 'kv_lora_rank', 'rope_head_dim', 'moe_every', 'pool',
              'patch_size')

# One python process trains them all in turn (each start and import of JAX costs ~5 s).
DRIVER = '''
import json, sys
from moe_jax import cli
root, out, text_dir, image_dir, names, mesh = sys.argv[1:7]
codes = {}
for name in names.split(','):
  config = f'{root}/configs/papers/{name}.py'
  data_dir = image_dir if 'soft_moe' in name else text_dir
  codes[name] = cli.main(['moe-jax', 'train', '--config', f'{config}:scale=cpu', '--workdir',
                          f'{out}/{name}', f'--config.data.data_dir={data_dir}',
                          *mesh.split()])
print('CODES ' + json.dumps(codes))
'''


def moe_blocks(config) -> int:
  return sum(stack.moe_layers for stack in tasks.of(config).stacks(config))


def paper(name: str, arg: str | None = None):
  return importlib.import_module(f'configs.papers.{name}').get_config(arg)


def test_every_cpu_preset_trains_from_another_folder(tmp_path, data_dir, image_data_dir):
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  env.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  runs = tmp_path / 'runs'
  out = subprocess.run(
      [sys.executable, '-c', DRIVER, str(ROOT), str(runs), data_dir, image_data_dir,
       ','.join(NAMES), ' '.join(MESH_ARGS)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  codes = json.loads(out.stdout.split('CODES ')[-1])
  assert codes == dict.fromkeys(NAMES, 0), out.stderr[-4000:]
  for name in NAMES:
    summary = json.loads((runs / name / 'summary.json').read_text())
    assert summary['steps'] == 3, (name, summary)


@pytest.mark.parametrize('name', NAMES)
def test_cpu_preset_is_the_family_at_a_test_size(name):
  full, tiny = paper(name), paper(name, 'scale=cpu')
  model = tiny.model
  assert model.dtype == 'float32' and model.d_model <= 64 and model.num_heads == 2
  assert tiny.data.batch_size % 8 == 0 and tiny.train.steps == 3
  assert tiny.data.name == ('digits' if tiny.task == 'vit' else 'tiny_shakespeare')
  assert bool(model.first_dense_layers) == bool(full.model.first_dense_layers)
  assert model.get('tie_embeddings') == full.model.get('tie_embeddings')
  assert model.activation == full.model.activation
  if tiny.task == 'lm':
    assert model.vocab_size == 256 and 16 <= tiny.data.seq_len <= 32
    assert bool(model.encoder_layers) == bool(full.model.encoder_layers)
    assert bool(model.kv_lora_rank) == bool(full.model.kv_lora_rank)
    gqa = lambda m: 0 < m.num_kv_heads < m.num_heads
    assert gqa(model) == gqa(full.model)
  if 'moe' in full:
    moe = tiny.moe
    assert 0 < moe.num_experts <= 8 and moe.num_experts % moe.num_expert_groups == 0
    assert moe.k <= moe.num_experts and (moe.num_expert_groups > 1) == (
        full.moe.num_expert_groups > 1)
    assert {f: moe[f] for f in ROUTING if f != 'k'} == {f: full.moe[f] for f in ROUTING
                                                        if f != 'k'}
    assert moe_blocks(tiny) >= 1


@pytest.mark.parametrize('name', NAMES)
def test_gpu_preset_fits_one_80gb_gpu_with_the_paper_routing(name):
  full, big = paper(name), paper(name, 'scale=gpu')
  plan = memory_plan.make_plan(big, name)
  assert plan.mesh == (1, 1, 1, 1) and big.model.dtype == 'bfloat16'  # one device
  assert plan.fits()['H100'], memory_plan.render(plan)
  assert big.data.name == full.data.name
  assert {f: big.model.get(f) for f in MODEL_KIND} == {f: full.model.get(f) for f in MODEL_KIND}
  assert bool(big.model.first_dense_layers) == bool(full.model.first_dense_layers)
  assert bool(big.model.get('encoder_layers')) == bool(full.model.get('encoder_layers'))
  if 'moe' in full:
    assert {f: big.moe[f] for f in (*ROUTING, 'd_ff', 'num_expert_groups',
                                    'groups_per_token')} == {
        f: full.moe[f] for f in (*ROUTING, 'd_ff', 'num_expert_groups', 'groups_per_token')}
    assert moe_blocks(big) >= 1


def test_unknown_preset_is_one_line_naming_the_choices():
  with pytest.raises(ValueError, match=r"'size=big' is unknown: choose from \['scale'\]"):
    paper('switch_base', 'size=big')
  with pytest.raises(ValueError, match=r"scale='tpu' is invalid: choose one of \('cpu', 'gpu'\)"):
    paper('switch_base', 'scale=tpu')


def test_cpu_preset_trains_on_a_sentencepiece_vocabulary_from_another_folder(
    tmp_path, data_dir, sp_model, monkeypatch):
  """A paper LM takes `--config.data.tokenizer` like every LM: DeepSeekMoE's cpu preset streams a
  512-piece SentencePiece vocabulary of Tiny Shakespeare through the console script's code."""
  monkeypatch.chdir(tmp_path)
  assert cli_main(['moe-jax', 'train', '--config',
                   f'{ROOT}/configs/papers/deepseek_moe_2b.py:scale=cpu', '--workdir', 'run',
                   f'--config.data.data_dir={data_dir}', f'--config.data.tokenizer={sp_model}',
                   '--config.model.vocab_size=512', '--config.train.steps=2']) == 0
  summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  config = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert summary['steps'] == 2 and config['data']['tokenizer'] == sp_model
  assert summary['eval_bits_per_byte'] > 0  # held out in bits per byte, comparable to bytes
