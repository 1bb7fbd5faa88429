"""Expert parallelism on real devices: sharded == unsharded; weak scaling, dropless and capacity.

  PYTHONPATH=. python benchmarks/parallel_scaling.py --out parallel_scaling.json   # GPUs
  PYTHONPATH=. python benchmarks/parallel_scaling.py --small                       # CPU smoke run

1. Equality: on every mesh (1, n) and (n, 1) of the n devices present, each router family's
   sharded layer (jax.shard_map) against the single-device layer on the same batch, float32:
   max |difference| of the output and of the gradients w.r.t. params and inputs.
2. Weak scaling, tokens per device fixed, experts sharded over m = 1, 2, 4, ... <= n devices (mesh
   (1, m)), bf16, of a Mixtral-like layer (d 4096, E=8 of f 14336, top-2) and a DeepSeek-like one
   (d 2048, 64 experts of f 1408, top-6, 2 shared, sigmoid scores with the aux-free bias), each
   dropless (dispatch 'blocked': ragged all-to-all + grouped matmuls; also in `--chunks` chunks,
   the exchange of one overlapping the experts of another) and with capacity 1.25 (dispatch
   'gather': capacity buffers by all_to_all):
   * 'layer': the MoE layer forward + backward;
   * 'train': a full training step (`moe_jax.run.train.train_step`: forward, backward, AdamW) of a
     2-block LM with that MoE FFN in both blocks.
   efficiency = (one-device time) / (m-device time) at equal tokens per device: 1.0 is perfect.
   The one-device time runs the layer without shard_map; m = 1 also times the sharded path on a
   one-device mesh (path 'sharded'): shard_map around the one-device dispatcher, since an expert
   axis of one shard exchanges nothing (docs/parallelism.md has the times of the exchange path
   on one GPU). The exchange itself is timed from m = 2 on.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from moe_jax.models.transformer import Transformer, TransformerConfig
from moe_jax.moe import ragged_exchange
from moe_jax.moe.layer import MoELayer
from moe_jax.moe.spec import MoESpec
from moe_jax.parallel import sharding
from moe_jax.run import tasks, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_layer  # noqa: E402  (kernel times from a jax.profiler trace)

EQUALITY = {  # group_by='sequence' everywhere: the sharded layer equals the whole-batch one
    'switch_top1': MoESpec(num_experts=8, d_ff=256, k=1, capacity_factor=1.25),
    'gshard_top2': MoESpec(num_experts=8, d_ff=256, k=2, capacity_factor=1.25),
    'dropless_top2': MoESpec(num_experts=8, d_ff=256, k=2, capacity_factor=None,
                             dispatch='blocked'),
    'expert_choice': MoESpec(router='expert_choice', num_experts=8, d_ff=256, capacity_factor=2.0),
    'soft_moe': MoESpec(router='soft', num_experts=8, d_ff=256, slots_per_expert=4),
    'fine_grained_shared': MoESpec(num_experts=32, d_ff=64, k=4, capacity_factor=1.25,
                                   num_shared_experts=1),
    'aux_loss_free': MoESpec(num_experts=8, d_ff=256, k=2, capacity_factor=1.25, score='sigmoid',
                             bias_update_rate=1e-3),
}


@dataclasses.dataclass(frozen=True)
class Family:
  """An MoE FFN of width d_model, and the LM of `layers` blocks around it for the train step."""
  d_model: int
  spec: MoESpec
  num_heads: int = 16
  layers: int = 2


FAMILIES = {
    # Mixtral-8x7B's block (d 4096, 32 heads, 8 experts of f 14336, top-2), as train_step.py's.
    'mixtral': Family(4096, MoESpec(num_experts=8, k=2, d_ff=14336), num_heads=32),
    # DeepSeekMoE-16B's (d 2048, 64 experts of f 1408, top-6, 2 shared), routed as DeepSeek-V3:
    # sigmoid scores and the aux-loss-free bias.
    'deepseek': Family(2048, MoESpec(num_experts=64, k=6, d_ff=1408, num_shared_experts=2,
                                     score='sigmoid', bias_update_rate=1e-3)),
}
SMALL = {
    'mixtral': Family(32, MoESpec(num_experts=8, k=2, d_ff=64), num_heads=2, layers=1),
    'deepseek': Family(32, MoESpec(num_experts=16, k=4, d_ff=32, num_shared_experts=2,
                                   score='sigmoid', bias_update_rate=1e-3), num_heads=2, layers=1),
}
ROUTINGS = {
    'dropless': dict(capacity_factor=None, dispatch='blocked'),
    'capacity': dict(capacity_factor=1.25, dispatch='gather', priority='token'),  # causal
}


def loss_fn(apply):
  def loss(variables, x):
    y, aux = apply(variables, x)
    return jnp.sum(y.astype(jnp.float32) ** 2) + aux['loss']
  return loss


def equality(n: int) -> list[dict]:
  rows = []
  batch, seq, d = 4 * n, 64, 128
  x = jax.random.normal(jax.random.key(1), (batch, seq, d))
  for name, spec in EQUALITY.items():
    layer = MoELayer(spec)
    variables = layer.init(jax.random.key(0), x)
    ref_apply = lambda v, x: layer.apply(v, x)
    ref_y = ref_apply(variables, x)[0]
    ref_g = jax.grad(loss_fn(ref_apply), argnums=(0, 1))(variables, x)
    for shape in sorted({(1, n), (n, 1)}):
      mesh = sharding.make_mesh(*shape)
      apply = jax.jit(sharding.shard_module(layer, mesh))
      y = apply(variables, x)[0]
      g = jax.grad(loss_fn(apply), argnums=(0, 1))(variables, x)
      grad_diff = max(float(jnp.max(jnp.abs(a - b)))
                      for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)))
      grad_scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref_g))
      rows.append({'router': name, 'mesh': f'{shape[0]}x{shape[1]}',
                   'max_abs_diff_output': float(jnp.max(jnp.abs(y - ref_y))),
                   'max_abs_diff_grads': grad_diff,
                   'output_scale': float(jnp.max(jnp.abs(ref_y))), 'grad_scale': grad_scale})
      print(rows[-1], flush=True)
  return rows


def time_it(fn, *args, iters: int) -> float:
  """Median seconds of fn(*args) over `iters` calls, after two warm-up calls."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def layer_step(family: Family, spec: MoESpec, mesh, tokens: int, seq: int, sharded: bool):
  """(fn, args): forward + backward of the layer on `tokens` bf16 tokens over `mesh`."""
  layer = MoELayer(spec, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (tokens // seq, seq, family.d_model), jnp.bfloat16)
  x = jax.device_put(x, sharding.batch_sharding(mesh))
  variables = sharding.init_variables(layer, mesh, jax.random.key(0), x[:1])
  apply = sharding.shard_module(layer, mesh, always_shard=sharded)
  return jax.jit(jax.grad(loss_fn(apply), argnums=(0, 1))), (variables, x)


def train_step(family: Family, spec: MoESpec, mesh, tokens: int, seq: int, sharded: bool):
  """(fn, args): one `train.train_step` of the family's LM on `tokens` random tokens."""
  del sharded  # m = 1: `shard_module` runs one device without shard_map
  model = Transformer(TransformerConfig(d_model=family.d_model, num_layers=family.layers,
                                        num_heads=family.num_heads, d_ff=4 * family.d_model,
                                        moe_every=1, dtype='bfloat16'), spec)
  cfg = train.TrainConfig()
  batch = jax.random.randint(jax.random.key(1), (tokens // seq, seq + 1), 0, 256, jnp.int32)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  state = train.init_state(model, cfg, jax.random.key(0),
                           jax.ShapeDtypeStruct((1, seq), jnp.int32), mesh)
  # Inside this jit the step does not donate its state: every timed call reuses the same one.
  step = jax.jit(lambda state, batch: train.train_step(state, batch, jax.random.key(2),
                                                       task=tasks.LM, model=model, cfg=cfg,
                                                       mesh=mesh))
  return step, (state, batch)


BENCHES = {'layer': layer_step, 'train': train_step}


def weak_scaling(args, families: dict[str, Family]) -> list[dict]:
  """Rows {bench, family, routing, chunks, devices, path, ms, tokens_per_s_per_device,
  efficiency} for every bench, family, routing, chunk count and m = 1, 2, 4, ... <= n."""
  n = min(jax.device_count(), args.max_devices or jax.device_count())
  rows = []
  for bench in args.benches:
    for name in args.families:
      family = families[name]
      for routing in args.routings:
        spec = family.spec.replace(**ROUTINGS[routing])
        base = None
        m = 1
        while m <= n:
          mesh = sharding.make_mesh(1, m, devices=jax.devices()[:m])
          chunk_counts = args.chunks if routing == 'dropless' else [1]
          paths = ['one-device', 'sharded'] if m == 1 and bench == 'layer' else [
              'one-device' if m == 1 else 'sharded']
          for path in paths:
            for chunks in chunk_counts if path == 'sharded' else [1]:
              fn, fn_args = BENCHES[bench](family, spec.replace(num_chunks=chunks), mesh,
                                           m * args.tokens_per_device, args.seq,
                                           sharded=path == 'sharded')
              seconds = time_it(fn, *fn_args, iters=args.iters)
              base = seconds if base is None else base
              rows.append({'bench': bench, 'family': name, 'routing': routing, 'chunks': chunks,
                           'devices': m, 'path': path, 'ms': seconds * 1e3,
                           'tokens_per_s_per_device': args.tokens_per_device / seconds,
                           'efficiency': base / seconds})
              print(rows[-1], flush=True)
              del fn, fn_args
          m *= 2
  return rows


def profile_paths(args, families: dict[str, Family]) -> list[dict]:
  """Where the sharded path's time goes: kernel times of the layer's forward + backward, one
  device (no shard_map) against the sharded path on a one-device mesh, per family and routing."""
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  summaries = []
  for name in args.families:
    for routing in args.routings:
      spec = families[name].spec.replace(**ROUTINGS[routing])
      for path in ('one-device', 'sharded'):
        fn, fn_args = layer_step(families[name], spec, mesh, args.tokens_per_device, args.seq,
                                 sharded=path == 'sharded')
        per_call = profile_layer.profile(fn, fn_args, iters=3)
        summaries.append(profile_layer.summarize(f'layer {name} {routing} {path}', per_call,
                                                 top=args.profile_top))
        del fn, fn_args
  return summaries


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='parallel_scaling.json')
  parser.add_argument('--tokens-per-device', type=int, default=16384)
  parser.add_argument('--seq', type=int, default=2048, help='tokens per sequence')
  parser.add_argument('--benches', type=lambda s: s.split(','), default=list(BENCHES))
  parser.add_argument('--families', type=lambda s: s.split(','), default=list(FAMILIES))
  parser.add_argument('--routings', type=lambda s: s.split(','), default=list(ROUTINGS))
  parser.add_argument('--chunks', type=lambda s: [int(c) for c in s.split(',')], default=[1, 2, 4],
                      help='chunk counts of the dropless exchange (moe.num_chunks) to time')
  parser.add_argument('--max-devices', type=int, default=None)
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--skip-equality', action='store_true')
  parser.add_argument('--exchange', default='auto', choices=('auto', *ragged_exchange.IMPLS),
                      help="the dropless exchange: 'auto' (ragged_exchange.default_impl), or force "
                           "the collective ('ragged') or the stand-in ('padded'). XLA's own choice "
                           'of ragged all-to-all kernel follows XLA_FLAGS (docs/parallelism.md)')
  parser.add_argument('--profile', action='store_true',
                      help='instead of timing: kernel times of the layer, one device against the '
                           'sharded path on a one-device mesh (where shard_map costs go)')
  parser.add_argument('--profile-top', type=int, default=15, help='kernels listed per profile')
  parser.add_argument('--small', action='store_true',
                      help='tiny shapes, 2 devices at most, 2 iterations, no equality: a CPU smoke '
                           'run (the simulated CPU devices share cores: times mean nothing)')
  args = parser.parse_args(argv)
  families = FAMILIES
  if args.small:
    families = SMALL
    args.tokens_per_device, args.seq, args.iters, args.skip_equality = 64, 16, 2, True
    args.max_devices = min(args.max_devices or 2, 2)
  n = jax.device_count()
  print(f'jax {jax.__version__}, {n} x {jax.devices()[0].device_kind}, exchange {args.exchange}, '
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  with (contextlib.nullcontext() if args.exchange == 'auto' else
        ragged_exchange.force(args.exchange)):
    return run(args, families, n)


def run(args, families: dict[str, Family], n: int) -> int:
  if args.profile:
    with open(args.out, 'w') as f:
      json.dump({'jax': jax.__version__, 'device_kind': jax.devices()[0].device_kind,
                 'profiles': profile_paths(args, families), 'args': vars(args)}, f, indent=2)
    return 0
  with jax.default_matmul_precision('highest'):
    eq = [] if args.skip_equality else equality(n)
  scaling = weak_scaling(args, families)
  result = {'jax': jax.__version__, 'devices': n, 'device_kind': jax.devices()[0].device_kind,
            'xla_flags': os.environ.get('XLA_FLAGS', ''), 'equality': eq, 'weak_scaling': scaling,
            'args': vars(args),
            'families': {name: repr(families[name]) for name in args.families}}
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=2)
  if eq:
    print('\n| router | mesh | max abs diff output | max abs output | max abs diff grads | '
          'max abs grad |')
    print('|---|---|---|---|---|---|')
    for r in eq:
      print(f"| {r['router']} | {r['mesh']} | {r['max_abs_diff_output']:.2e} | "
            f"{r['output_scale']:.2e} | {r['max_abs_diff_grads']:.2e} | {r['grad_scale']:.2e} |")
  print(f'\nWeak scaling, {args.tokens_per_device} tokens per device:')
  print('| bench | family | routing | chunks | devices | path | time | tokens/s per device | '
        'efficiency |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in scaling:
    print(f"| {r['bench']} | {r['family']} | {r['routing']} | {r['chunks']} | {r['devices']} | "
          f"{r['path']} | {r['ms']:.2f} ms | {r['tokens_per_s_per_device']:,.0f} | "
          f"{r['efficiency']:.2f} |")
  return 0


if __name__ == '__main__':
  sys.exit(main())
