"""Equal-FLOPs sweeps: build every member's config, size and check FLOPs, train each, report.

A sweep config has `base` (a full experiment config of any task, `moe_jax.tasks`), `members`
({name: overrides of base}), `size_experts`, `flops_tolerance` and `flops_match`: the FLOPs
convention members are sized and checked by, 'active' (the papers': k experts per token) or
'executed' (capacity padding counts; see moe_jax/flops.py). Absent, 'active'. Nothing is trained
until every member is built, validated and found within tolerance of the dense budget; a crashed
sweep resumes where it stopped (finished members are left as they are, an unfinished one resumes
from its last checkpoint, and a member whose run directory holds a different config is refused).
"""
from __future__ import annotations

import json
import pathlib
import time

import ml_collections

from moe_jax import flops, models, report, reproducibility, tasks


def member_config(base: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """A deep copy of `base` with `overrides` ({'moe': {...}, 'model': {...}, ...}) applied."""
  config = ml_collections.ConfigDict(base.to_dict())
  for section, values in overrides.items():
    if section not in config:
      raise ValueError(f'config.members override section {section!r} is not in config.base; '
                       f'known sections: {sorted(config)}.')
    if isinstance(values, (dict, ml_collections.ConfigDict)):
      for field, value in values.items():
        if field not in config[section]:
          raise ValueError(f'config.members override {section}.{field} is not a field of '
                           f'config.base.{section}.')
        config[section][field] = value
    else:
      config[section] = values
  return config


def build_members(sweep: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """Every member's config, sized to the dense FLOP budget when `size_experts`, and checked
  (`train.check_config`).

  Each MoE layer's budget is one dense FFN of width config.model.d_ff, in the sweep's
  `flops_match` convention.

  Raises:
    ValueError: a member's config is invalid, or its model FLOPs/token differ from the dense
      model's by more than `flops_tolerance` (every offending member is named).
  """
  from moe_jax import train  # heavy imports only when building a sweep

  convention = flops_match(sweep)
  task = tasks.of(sweep.base)
  members = {}
  for name, overrides in sweep.members.items():
    config = member_config(sweep.base, overrides)
    train.check_config(config)
    model, spec = task.from_config(config)
    if spec is not None and sweep.size_experts:
      budget = flops.ffn_flops(model.d_model, model.d_ff, model.activation)
      config.moe.d_ff = flops.size_to_budget(spec, model.d_model, task.token_shape(config),
                                             budget, convention).d_ff
    members[name] = config
  dense = member_config(sweep.base, {'model': {'moe_every': 0}})
  member_flops = {name: task.flops_per_token(c, convention) for name, c in members.items()}
  flops.check_equal_flops(member_flops,
                          budget=task.flops_per_token(dense, convention),
                          tolerance=sweep.flops_tolerance, convention=convention)
  return members


def flops_match(sweep: ml_collections.ConfigDict) -> str:
  """The sweep's FLOPs convention, `config.flops_match` ('active' when absent), checked."""
  return flops.check_convention(sweep.get('flops_match', 'active'))


def describe(config: ml_collections.ConfigDict) -> str:
  """A short human label of a member's FFN, e.g. 'token_choice k=2 cf=1.25 E=8 f=204'
  (`models.describe_ffn`, short)."""
  return models.describe_ffn(*tasks.of(config).from_config(config), short=True)


def run_sweep(sweep: ml_collections.ConfigDict, workdir: str | pathlib.Path,
              only: list[str] | None = None) -> str:
  """Trains every member into `workdir/<name>`, then writes and returns the results table."""
  from moe_jax import train

  workdir = pathlib.Path(workdir)
  reproducibility.configure_from(sweep.base)  # before building members starts JAX's backends
  members = build_members(sweep)
  if only:
    unknown = sorted(set(only) - set(members))
    if unknown:
      raise ValueError(f'--only names unknown member(s) {unknown}; members: {sorted(members)}.')
    members = {name: members[name] for name in only}
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'sweep.json').write_text(json.dumps(
      {name: {'description': describe(c), 'config': c.to_dict(), 'flops_match': flops_match(sweep)}
       for name, c in members.items()}, indent=2, default=str))
  start = time.time()
  for i, (name, config) in enumerate(members.items()):
    print(f'[{i + 1}/{len(members)}] {name}: {describe(config)}', flush=True)
    train.train(config, workdir / name)  # resumes an unfinished run, returns a finished one
  print(f'sweep finished in {time.time() - start:.0f} s')
  return report.write_report(workdir)
