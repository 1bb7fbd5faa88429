"""Sparse upcycling (Komatsuzaki et al. 2023): an MoE run that starts from a dense run.

`config.upcycle.from_workdir` names a dense run directory (its config.json and checkpoints). The
MoE run's first state copies every parameter the two models share (embeddings, attention, norms,
dense FFNs, unembedding) from the dense run's latest checkpoint; each MoE block's experts are E
copies of that block's dense FFN (plus Gaussian noise of std `config.upcycle.noise_std` x the
weight's std, 0 = exact copies); routers start fresh. The optimizer state and the step start anew.

With identical experts and combine weights summing to 1 (top-k renormalized, nothing dropped),
the upcycled model computes exactly the dense model's function until training moves it.
"""
from __future__ import annotations

import json
import pathlib
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from moe_jax.validate import Section

UPCYCLE = Section('upcycle')
SAME_MODEL = ('d_model', 'num_layers', 'num_heads', 'activation', 'vocab_size')


def source(config) -> pathlib.Path | None:
  """The dense run directory of `config.upcycle.from_workdir`, or None when not upcycling."""
  section = config.get('upcycle')
  if section is None or section.get('from_workdir') is None:
    return None
  return pathlib.Path(section.from_workdir)


def check(config) -> pathlib.Path | None:
  """Raises a ValueError naming the field when `config` cannot upcycle its dense run: the run
  directory lacks a config or a checkpoint, it is not dense, the architectures differ, or the
  experts are not as wide as the dense FFN. Returns the dense run directory (None: no upcycling)."""
  workdir = source(config)
  if workdir is None:
    return None
  dense_config = workdir / 'config.json'
  if not dense_config.is_file() or latest_step(workdir) is None:
    UPCYCLE.fail('from_workdir', str(workdir), 'name a dense run directory with config.json and '
                 'a checkpoint (train it first: moe-jax train ... --config.model.moe_every=0)')
  dense = json.loads(dense_config.read_text())
  if dense['model'].get('moe_every', 0):
    UPCYCLE.fail('from_workdir', str(workdir), 'that run is an MoE model (moe_every='
                 f"{dense['model']['moe_every']}); upcycle from a dense one (moe_every=0)")
  for name in SAME_MODEL:
    if name in dense['model'] and dense['model'][name] != config.model.get(name):
      raise ValueError(f'config.model.{name}={config.model.get(name)!r} differs from the dense '
                       f"run's {dense['model'][name]!r} ({dense_config}): upcycling copies its "
                       'weights, so use the same architecture.')
  if config.moe.d_ff != dense['model']['d_ff']:
    raise ValueError(f'config.moe.d_ff={config.moe.d_ff} differs from the dense run\'s d_ff='
                     f"{dense['model']['d_ff']}: each expert is a copy of the dense FFN; set "
                     f"config.moe.d_ff={dense['model']['d_ff']}.")
  if config.moe.num_shared_experts:
    raise ValueError('config.moe.num_shared_experts must be 0 to upcycle: the dense FFN becomes '
                     'the routed experts, and a shared expert would add a second copy.')
  return workdir


def latest_step(workdir: pathlib.Path) -> int | None:
  checkpoints = workdir / 'checkpoints'
  if not checkpoints.is_dir():
    return None
  return ocp.CheckpointManager(checkpoints).latest_step()


def dense_params(workdir: pathlib.Path) -> dict:
  """The params of the dense run's latest checkpoint, as saved (host arrays)."""
  manager = ocp.CheckpointManager(workdir / 'checkpoints')
  return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())['params']


def upcycle_params(params: Any, dense: Any, rng: jax.Array, noise_std: float = 0.0) -> Any:
  """`params` (a freshly initialized MoE model's) with every weight taken from `dense`: shared
  weights copied, each MoE block's experts [E, ...] = its dense FFN (+ noise), routers kept.

  Raises ValueError naming a parameter that has no dense counterpart of the same shape.
  """
  def take(path, leaf):
    keys = [getattr(p, 'key', str(p)) for p in path]
    if 'router' in keys:
      return leaf  # fresh
    if 'experts' in keys:
      ffn = _lookup(dense, keys[:keys.index('moe')] + ['ffn', keys[-1]], keys)
      copies = jnp.broadcast_to(jnp.asarray(ffn, leaf.dtype), leaf.shape)
      if noise_std == 0:
        return copies
      key = jax.random.fold_in(rng, zlib.crc32('/'.join(keys).encode()) % (2**31))
      return copies + noise_std * jnp.std(ffn) * jax.random.normal(key, leaf.shape, leaf.dtype)
    value = _lookup(dense, keys, keys)
    if value.shape != leaf.shape:
      raise ValueError(f'parameter {"/".join(keys)} has shape {leaf.shape} here and '
                       f'{value.shape} in the dense run: the architectures differ.')
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(take, params)


def _lookup(tree: Any, keys: list[str], wanted: list[str]) -> Any:
  for key in keys:
    if not isinstance(tree, dict) or key not in tree:
      raise ValueError(f'parameter {"/".join(wanted)} has no counterpart '
                       f'{"/".join(keys)} in the dense run: the architectures differ.')
    tree = tree[key]
  return tree
