"""The MoE ViT, its offline image data set (real 8x8 digits shipped by scikit-learn) and training.

Covers: the TFDS builder's splits hold the real images, disjoint, and a missing file is a clear
error; patchify; parameter counts equal the model's and FLOPs match a hand count; config errors
name the field; training lowers the loss for Soft MoE, writes the LM's run-directory format that
`report` reads, and resumes exactly (also a run whose config.json predates config.mesh); a ViT
sweep is sized to equal FLOPs.
"""
import gzip
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import vit_digits
from moe_jax.data import images as image_data
from moe_jax.models import vit
from moe_jax.run import report, run_dir, sweep, train


def tiny_config(data_dir, **overrides):
  """vit_digits shrunk: d_model 32, 2 blocks (block 1 MoE, 4 experts), 2x2 patches (16 tokens)."""
  config = vit_digits.get_config()
  config.data.data_dir, config.data.batch_size = data_dir, 32
  config.model.update(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_every=2)
  config.moe.update(num_experts=4, d_ff=64, slots_per_expert=4)
  config.train.update(steps=8, warmup_steps=2, log_every=1, eval_every=4, checkpoint_every=4,
                      progress=False)
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def test_splits_are_the_real_digits_disjoint(image_data_dir):
  splits = image_data.load_image_splits('digits', data_dir=image_data_dir)
  (train_x, train_y), (test_x, test_y) = splits['train'], splits['test']
  assert train_x.shape == (1437, 8, 8, 1) and test_x.shape == (360, 8, 8, 1)
  assert train_x.dtype == np.float32 and 0 <= train_x.min() and train_x.max() == 1.0
  assert set(np.unique(train_y)) == set(np.unique(test_y)) == set(range(10))
  as_rows = lambda x, y: {(*np.round(a.ravel() * 16).astype(int), int(b)) for a, b in zip(x, y)}
  shipped = image_data.read_digits_csv(
      image_data.find_manual_dir('digits') / 'digits.csv.gz')
  assert as_rows(train_x, train_y) | as_rows(test_x, test_y) == set(map(tuple, shipped))
  assert not as_rows(train_x, train_y) & as_rows(test_x, test_y)  # no image in both splits


def test_missing_data_set_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'(?s)no digits\.csv\.gz in any of.*Fix: pip install scikit-learn'):
    image_data.load_image_splits('digits', data_dir=tmp_path / 'tfds', manual_dir=tmp_path)
  with pytest.raises(ValueError, match=r"config\.data\.name='mnist'.*choose one of "
                                       r"\['digits', 'fashion_mnist'\]"):
    image_data.load_image_splits('mnist', data_dir=tmp_path)


def test_manual_dir_file_is_read(tmp_path):
  shipped = image_data.find_manual_dir('digits') / 'digits.csv.gz'
  rows = gzip.open(shipped, 'rt').read().splitlines()[:400]
  (tmp_path / 'digits.csv.gz').write_bytes(gzip.compress('\n'.join(rows).encode()))
  splits = image_data.load_image_splits('digits', data_dir=tmp_path / 'tfds',
                                            manual_dir=tmp_path)
  assert len(splits['train'][1]) == 40 and len(splits['test'][1]) == 360


def test_patchify_row_major():
  images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  patches = vit.patchify(images, 2)
  assert patches.shape == (2, 4, 12)
  np.testing.assert_array_equal(patches[1, 2], images[1, 2:4, 0:2].reshape(-1))  # patch (1, 0)


@pytest.mark.parametrize('moe', [None, {'router': 'soft'}, {'router': 'token_choice', 'k': 2},
                                 {'router': 'expert_choice', 'capacity_factor': 2.0}])
@pytest.mark.parametrize('pool', ['mean', 'cls'])
def test_param_counts_match_the_model(image_data_dir, moe, pool):
  config = tiny_config(image_data_dir, **{'model.pool': pool, 'model.activation': 'swiglu'})
  if moe is None:
    config.model.moe_every = 0
  else:
    config.moe.update(**moe)
  model = train.check_config(config).model
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1))))
  counted, _ = vit.param_counts(config)
  assert counted == sum(x.size for x in jax.tree.leaves(variables['params']))
  logits, aux = jax.eval_shape(lambda v: model.apply(v, jnp.ones((3, 8, 8, 1))), variables)
  assert logits.shape == (3, 10) and set(aux['layers']) == ({'block_1'} if moe else set())


def test_flops_by_hand(image_data_dir):
  config = tiny_config(image_data_dir, **{'moe.router': 'soft', 'moe.slots_per_expert': 4})
  d, n, f, e = 32, 16, 64, 4
  attention = 8 * d * d + 4 * n * d
  dense = 2 * d * f * 2  # GELU: 2 matrices
  soft = 2 * d * e * 4 * 3 + e * 4 / n * 2 * d * f * 2  # logits, dispatch, combine; E*S slots
  expected = 2 * 4 * d + 2 * (attention) + dense + soft + 2 * d * 10 / n
  assert vit.model_flops_per_token(config) == pytest.approx(expected)


def test_config_errors_name_the_field(image_data_dir):
  with pytest.raises(ValueError, match=r'config\.model\.patch_size=3 .*divide the image size 8x8'):
    train.check_config(tiny_config(image_data_dir, **{'model.patch_size': 3}))
  with pytest.raises(ValueError, match=r"config\.model\.pool='max'"):
    train.check_config(tiny_config(image_data_dir, **{'model.pool': 'max'}))


@pytest.fixture(scope='module')
def short_run(image_data_dir, tmp_path_factory):
  config = tiny_config(image_data_dir, **{'train.steps': 80, 'train.warmup_steps': 5,
                                    'train.log_every': 10, 'train.eval_every': 40,
                                    'train.checkpoint_every': 40, 'train.learning_rate': 1e-2})
  workdir = tmp_path_factory.mktemp('vit_run')
  return config, workdir, train.train(config, workdir)


def test_soft_moe_vit_learns_the_digits(short_run):
  _, workdir, summary = short_run
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert records[-1]['train_loss'] < np.log(10) - 1.0  # from chance level
  assert summary['eval_accuracy'] > 0.6  # chance is 0.1
  assert {'eval_loss', 'eval_accuracy', 'moe/block_1/tokens_per_expert'} <= set(records[-1])


def test_run_directory_reads_like_an_lm_run(short_run):
  config, workdir, summary = short_run
  names = {p.name for p in workdir.iterdir() if not p.name.startswith('events.out.tfevents.')}
  assert names == {'config.json', 'metrics.jsonl', 'checkpoints', 'timing.json', 'summary.json',
                   'run.lock'}
  assert json.loads((workdir / 'config.json').read_text()) == config.to_dict()
  assert summary['router'].startswith('soft (num_experts=4')
  table = report.write_report(workdir)
  assert f"{summary['eval_loss']:.4f}" in table


def test_kill_and_resume_matches_uninterrupted_run(image_data_dir, tmp_path, monkeypatch):
  config = tiny_config(image_data_dir, **{'moe.router': 'token_choice', 'moe.jitter': 0.1})
  train.train(config, tmp_path / 'straight')
  real_batch = image_data.train_batch

  class Killed(Exception):
    pass

  def killed_at_6(images, labels, step, *args):
    if step == 6:
      raise Killed
    return real_batch(images, labels, step, *args)

  monkeypatch.setattr(image_data, 'train_batch', killed_at_6)
  with pytest.raises(Killed):
    train.train(config, tmp_path / 'resumed')
  monkeypatch.setattr(image_data, 'train_batch', real_batch)
  summary = train.train(config, tmp_path / 'resumed')
  assert summary['resumed_from_step'] == 4
  read = lambda name: [json.loads(line) for line in
                       (tmp_path / name / 'metrics.jsonl').read_text().splitlines()]
  got, expected = read('resumed'), read('straight')
  assert [r['step'] for r in got] == list(range(1, 9))
  for mine, theirs in zip(got, expected):
    for key in set(mine) - {'tokens_per_s'}:
      np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-6, err_msg=key)


def test_run_written_without_a_mesh_section_resumes(tmp_path):
  """Runs of the ViT (the claims' too) from before config.mesh existed: an absent mesh is 1x1,
  and the mesh may differ on resume."""
  config = vit_digits.get_config()
  before_mesh = ml_collections.ConfigDict(config.to_dict())
  del before_mesh['mesh']
  assert run_dir.write_config(before_mesh, tmp_path) is None
  found = run_dir.write_config(config, tmp_path, may_differ=train.MESH_FIELDS)
  assert found == run_dir.flatten(before_mesh.to_dict())  # config.json keeps the first call's
  config.train.steps += 1
  with pytest.raises(ValueError, match=r'train\.steps: 300 in config\.json, 301 now'):
    run_dir.write_config(config, tmp_path, may_differ=train.MESH_FIELDS)


def test_sweep_members_are_sized_to_equal_flops(image_data_dir):
  config = ml_collections.ConfigDict()
  config.base = tiny_config(image_data_dir)
  config.size_experts, config.flops_tolerance, config.flops_match = True, 0.02, 'executed'
  config.members = {'dense': {'model': {'moe_every': 0}}, 'soft': {'moe': {'router': 'soft'}},
                    'top2': {'moe': {'router': 'token_choice', 'k': 2}},
                    'ec': {'moe': {'router': 'expert_choice', 'capacity_factor': 2.0}}}
  members = sweep.build_members(config)
  budget = vit.model_flops_per_token(members['dense'])
  for name, member in members.items():
    assert vit.model_flops_per_token(member) == pytest.approx(budget, rel=0.02), name
  config.size_experts = False
  with pytest.raises(ValueError, match='unequal executed FLOPs'):
    sweep.build_members(config)
