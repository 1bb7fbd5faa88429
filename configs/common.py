"""What the configs share: the mesh and train sections, and their presets: `with_presets` reads
the argument of `get_config(arg)` (`--config configs/lm_tiny.py:scale=cpu,dropless`) with
`parse_arg`, as big_vision's configs do.
"""
from __future__ import annotations

import ml_collections

# The scales of the paper claims (experiments/), each config's `scale=` preset:
# cpu: tiny, for CI and a laptop, on Tiny Shakespeare and the 8x8 digits: one run of a member
#   takes ~10-20 s on 2 CPU cores after a ~10 s compile that the seeds of a member share. A smoke
#   test of the machinery: at this size the claims cannot resolve.
# gpu: sized so that the whole table takes ~10-15 min of one H200 with `--jobs 6`, on data big
#   enough that no run sees a byte twice: LM claims on English mix (50 MB; each run reads 0.2 of
#   one pass), claim (f) on Fashion-MNIST (60,000 images; 2.1 epochs). Sized before any result of
#   this data was seen; the overfitting guard (`experiments.common.check_not_overfit`) still
#   applies.
SCALES = ('cpu', 'gpu')


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`arg` ('name=value,flag,...') as a ConfigDict of `defaults`' fields: 'name=value' sets a
  field, converted to its default's type; a bare 'flag' sets a bool field to True. A name that
  `defaults` lacks is a ValueError naming the known ones."""
  values = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    name, has_value, value = item.partition('=')
    if name not in defaults:
      raise ValueError(f'config argument {item!r} is unknown: choose from {sorted(defaults)}.')
    if isinstance(defaults[name], bool):
      values[name] = not has_value or value.lower() == 'true'
    elif has_value:
      values[name] = type(defaults[name])(value)
    else:
      raise ValueError(f'config argument {name!r} needs a value: {name}=...')
  return values


def check_scale(scale: str) -> str:
  """`scale` if it is one of SCALES, else a ValueError."""
  if scale not in SCALES:
    raise ValueError(f'scale={scale!r} is invalid: choose one of {SCALES}.')
  return scale


def with_presets(config: ml_collections.ConfigDict, arg: str | None,
                 at_scale) -> ml_collections.ConfigDict:
  """`config` with the presets that `arg` names: `scale=cpu` or `scale=gpu` applies
  at_scale(config, scale); `dropless` sets moe.capacity_factor=None (token choice without a
  capacity)."""
  arg = parse_arg(arg, scale='', dropless=False)
  if arg.scale:
    at_scale(config, arg.scale)
  if arg.dropless:
    config.moe.capacity_factor = None
  return config


def mesh() -> ml_collections.ConfigDict:
  """`config.mesh` (docs/parallelism.md, moe_jax/parallel/rules.py): all 1, one device."""
  config = ml_collections.ConfigDict()
  config.data = 1  # data * fsdp * expert * tensor = the device count, or all 1 = one device
  config.fsdp = 1  # parameters and optimizer state sharded over it (ZeRO-3), and the batch
  config.expert = 1  # divides moe.num_experts; expert weights are sharded over it
  config.tensor = 1  # attention heads and dense FFN width (Megatron); the batch is not split
  return config


def train(**overrides) -> ml_collections.ConfigDict:
  """`config.train`: every `moe_jax.run.train.TrainConfig` field at its default (the schedule every
  config starts from; the dataclass documents the fields), but for `overrides`."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from moe_jax.run.train import TrainConfig  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(
      {field.name: field.default for field in dataclasses.fields(TrainConfig)})
  config.update(overrides)
  return config
