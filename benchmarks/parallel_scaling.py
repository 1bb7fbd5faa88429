"""Expert parallelism on real devices: sharded == unsharded, and weak scaling of an MoE layer.

  PYTHONPATH=. python benchmarks/parallel_scaling.py --out results.json

1. Equality: on every mesh (1, n) and (n, 1) of the n devices present, each router family's
   sharded layer (jax.shard_map + all_to_all) against the single-device layer on the same batch,
   float32: max |difference| of the output and of the gradients w.r.t. params and inputs.
2. Weak scaling: tokens per device fixed, experts sharded over all devices (mesh (1, m) for
   m = 1, 2, 4, ... <= n), bf16, forward + backward; tokens/s per device and the efficiency
   (tokens/s at m devices) / (m * tokens/s at 1 device).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from moe_jax import parallel
from moe_jax.layers import MoELayer
from moe_jax.spec import MoESpec

FAMILIES = {  # group_by='sequence' everywhere: the sharded layer equals the whole-batch one
    'switch_top1': MoESpec(num_experts=8, d_ff=256, k=1, capacity_factor=1.25),
    'gshard_top2': MoESpec(num_experts=8, d_ff=256, k=2, capacity_factor=1.25),
    'expert_choice': MoESpec(router='expert_choice', num_experts=8, d_ff=256, capacity_factor=2.0),
    'soft_moe': MoESpec(router='soft', num_experts=8, d_ff=256, slots_per_expert=4),
    'fine_grained_shared': MoESpec(num_experts=32, d_ff=64, k=4, capacity_factor=1.25,
                                   num_shared_experts=1),
    'aux_loss_free': MoESpec(num_experts=8, d_ff=256, k=2, capacity_factor=1.25, score='sigmoid',
                             bias_update_rate=1e-3),
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
  for name, spec in FAMILIES.items():
    layer = MoELayer(spec)
    variables = layer.init(jax.random.key(0), x)
    ref_apply = lambda v, x: layer.apply(v, x)
    ref_y = ref_apply(variables, x)[0]
    ref_g = jax.grad(loss_fn(ref_apply), argnums=(0, 1))(variables, x)
    for shape in sorted({(1, n), (n, 1)}):
      mesh = parallel.make_mesh(*shape)
      apply = jax.jit(parallel.shard_module(layer, mesh))
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


def time_it(fn, *args, iters=10) -> float:
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def weak_scaling(n: int, tokens_per_device: int, d: int, f: int, experts: int, k: int) -> list:
  rows = []
  spec = MoESpec(num_experts=experts, d_ff=f, k=k, capacity_factor=1.25)
  seq = 1024
  m = 1
  while m <= n:
    mesh = parallel.make_mesh(1, m, devices=jax.devices()[:m])
    layer = MoELayer(spec, dtype=jnp.bfloat16)
    batch = m * tokens_per_device // seq
    x = jax.random.normal(jax.random.key(1), (batch, seq, d), jnp.bfloat16)
    x = jax.device_put(x, parallel.batch_sharding(mesh))
    variables = parallel.init_variables(layer, mesh, jax.random.key(0), x[:1])
    step = jax.jit(jax.grad(loss_fn(parallel.shard_module(layer, mesh)), argnums=(0, 1)))
    seconds = time_it(step, variables, x)
    rows.append({'devices': m, 'tokens': batch * seq, 'seconds': seconds,
                 'tokens_per_s_per_device': batch * seq / seconds / m})
    print(rows[-1], flush=True)
    m *= 2
  base = rows[0]['tokens_per_s_per_device']
  for row in rows:
    row['efficiency'] = row['tokens_per_s_per_device'] / base
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='parallel_scaling.json')
  parser.add_argument('--tokens-per-device', type=int, default=16384)
  parser.add_argument('--d-model', type=int, default=2048)
  parser.add_argument('--d-ff', type=int, default=2048)
  parser.add_argument('--experts', type=int, default=8)
  parser.add_argument('--k', type=int, default=2)
  parser.add_argument('--skip-equality', action='store_true')
  args = parser.parse_args()
  n = jax.device_count()
  print(f'jax {jax.__version__}, {n} x {jax.devices()[0].device_kind}', flush=True)
  with jax.default_matmul_precision('highest'):
    eq = [] if args.skip_equality else equality(n)
  scaling = weak_scaling(n, args.tokens_per_device, args.d_model, args.d_ff, args.experts, args.k)
  result = {'jax': jax.__version__, 'devices': n, 'device_kind': jax.devices()[0].device_kind,
            'equality': eq, 'weak_scaling': scaling, 'args': vars(args)}
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=2)
  print('\n| router | mesh | max abs diff output | max abs output | max abs diff grads | '
        'max abs grad |')
  print('|---|---|---|---|---|---|')
  for r in eq:
    print(f"| {r['router']} | {r['mesh']} | {r['max_abs_diff_output']:.2e} | "
          f"{r['output_scale']:.2e} | {r['max_abs_diff_grads']:.2e} | {r['grad_scale']:.2e} |")
  print('\n| devices | tokens | fwd+bwd s | tokens/s per device | efficiency |')
  print('|---|---|---|---|---|')
  for r in scaling:
    print(f"| {r['devices']} | {r['tokens']} | {r['seconds'] * 1e3:.2f} ms | "
          f"{r['tokens_per_s_per_device']:,.0f} | {r['efficiency']:.2f} |")


if __name__ == '__main__':
  main()
