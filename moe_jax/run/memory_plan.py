"""`moe-jax plan`: a config's size and its memory per device on its mesh, before any device is used.

Counts come from the project's analytic code (`Task.param_counts`, `Task.flops_per_token`), the
mesh from `config.mesh` as an `AbstractMesh`: nothing is allocated, so a laptop can plan a pod.
Memory per device follows the trainer's layout (the logical rules of moe_jax/parallel/rules.py):
the routed experts' weights are sharded over expert * fsdp * tensor, every other weight over
fsdp * tensor (its d_model dim over fsdp, its heads / FFN width / vocabulary over tensor; norm
scales and the router, < 0.1% of a paper config, are counted as if they were too), and the batch is
split over data * fsdp * expert (the tensor axis repeats it). Bytes per device:

  parameters     4 per weight held (float32 whatever config.model.dtype, the compute dtype)
  optimizer      AdamW's two float32 moments, 8 per weight held. The train step donates its
                 state (`train.train_step`): the new parameters and moments are written into the
                 old ones' buffers, so there is one state, not two
  gradients      sharded as the parameters. GPU: one per weight held in the compute dtype (its
                 bytes): XLA:GPU fuses their float32 cast into the clipping norm and the update
                 (`WEIGHT_WORKING_BYTES`). TPU (as XLA:CPU does, the TPU column's check): float32
                 gradients, 4 per weight held. Both + 4 with config.train.microbatches > 1 (the
                 float32 sum the microbatches accumulate into)
  compute copies TPU (as XLA:CPU does), with a compute dtype narrower than float32: the weights
                 cast to it and their gradients in it, 2 x its bytes per weight held; GPU: none
                 (XLA:GPU fuses the casts into their consumers)
  activations    what the backward pass keeps of one microbatch (the local batch / config.train.
                 microbatches) (`activation_bytes`): an estimate. On TPU (and CPU) attention
                 keeps its float32 score matrices; on GPU the LM's attention is cuDNN's fused
                 kernel where 'auto' picks it (`fused_attention_on_gpu`), which keeps none.
                 config.model.remat (`REMAT_KEEPS`): 'full' keeps each block's input, and the
                 block the backward pass recomputes holds its activations and their gradients
                 (2 blocks' worth); the policies that save matmuls without batch dimensions keep
                 all but the attention scores (one block's, twice, at a time); other policies
                 are counted as no remat. XLA:CPU's memory analysis of a dense 8-block LM's step
                 (d_model 128, 8 x 256 tokens, float32; with
                 --xla_cpu_enable_concurrency_optimized_scheduler=false, without which XLA:CPU
                 keeps nearly all activations whatever the remat): plan / XLA for gradients +
                 activations 1.14 without remat, 0.58 with 'full', 0.90 with
                 'dots_with_no_batch_dims_saveable', 1.21 with 2 microbatches: the remat figures
                 are the low side of the estimate.
                 With tensor > 1 the attention heads, the dense FFN's hidden units and the
                 logits are split over it; the residual stream and the MoE layer (which runs
                 whole on every tensor shard) are not.
FSDP also gathers each block's weights for its use: one block's weights more at the peak, not
counted (a note says so).

`tests/test_paper_configs.py` checks the state against a real run's arrays, and the rest and the
whole against XLA's memory analysis of the compiled train step on CPU.
"""
from __future__ import annotations

import dataclasses
import math

from moe_jax.moe import families, flops
from moe_jax.moe.spec import resolve_dispatch
from moe_jax.parallel import sharding
from moe_jax.run import tasks, train

GiB = 2 ** 30
# (gradients, compute copies) in bytes per weight held, by accelerator kind, from the compute
# dtype's bytes. Measured with XLA's memory analysis of the donated bf16 train step (H100, jax
# 0.11.2, 2026-12-07, `benchmarks/paper_scale.py`): XLA:GPU's temporaries hold 2 bytes per weight
# and the activations, the float32 gradient never whole; XLA:CPU's hold float32 gradients and the
# weights and gradients in a narrower compute dtype besides. The TPU column keeps the XLA:CPU
# count: no TPU has measured it.
WEIGHT_WORKING_BYTES = {
    'gpu': lambda compute_bytes: (float(compute_bytes), 0.0),
    'tpu': lambda compute_bytes: (4.0, 2.0 * compute_bytes if compute_bytes < 4 else 0.0),
}
# HBM per chip (vendor figures): TPU v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e (Trillium) 32 GiB;
# NVIDIA H100 SXM 80 GB (nvidia-smi: 81,559 MiB), H200 141 GB (nvidia-smi: 143,771 MiB).
ACCELERATORS = {'TPU v4': ('tpu', 32 * GiB), 'TPU v5e': ('tpu', 16 * GiB),
                'TPU v5p': ('tpu', 95 * GiB), 'TPU v6e': ('tpu', 32 * GiB),
                'H100': ('gpu', 81_559 * 2 ** 20), 'H200': ('gpu', 143_771 * 2 ** 20)}
HEADROOM = 0.9  # a plan fits when it needs at most this share of HBM (XLA's workspace, fragments)
# The environment variable for the share of a GPU's memory JAX may take (JAX's default: 0.75):
# `moe-jax train` sets it to HEADROOM, a sweep's parallel runs to HEADROOM / jobs each.
MEMORY_FRACTION = 'XLA_PYTHON_CLIENT_MEM_FRACTION'
DTYPE_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}
# Hidden activations an FFN keeps per unit of width: SwiGLU's input and gate projections, the
# gate's SiLU and their product; GELU's projection and its GELU.
FFN_KEPT = {'swiglu': 4, 'gelu': 2}
# Logits per example as the output layer keeps them (float32 logits and softmax: 8 bytes each).
OUTPUTS = {'lm': lambda config, model: config.data.seq_len * model.vocab_size,
           'vit': lambda config, model: 0}
# What a config.model.remat keeps of a block between the forward and the backward pass: 'input'
# (the block's input alone), 'no scores' (all but the attention score matrices, which are dots
# with batch dimensions), or, for the rest, 'all'.
REMAT_KEEPS = {'full': 'input', 'nothing_saveable': 'input',
               'dots_with_no_batch_dims_saveable': 'no scores',
               'checkpoint_dots_with_no_batch_dims': 'no scores'}


@dataclasses.dataclass(frozen=True)
class Plan:
  """A config on a mesh: its counts and its bytes per device (module docstring)."""
  name: str
  mesh: tuple[int, int, int, int]  # (data, fsdp, expert, tensor)
  params_total: int
  params_active: float
  flops_active: float  # forward FLOPs per token, the papers' convention
  flops_executed: float  # forward FLOPs per token as run (capacity padding counts)
  tokens_per_device: int  # per step
  local_params: int  # weights held by one device
  activations: dict[str, float]  # bytes, by accelerator kind ('tpu', 'gpu')
  notes: tuple[str, ...] = ()
  microbatches: int = 1  # config.train.microbatches: activations are one microbatch's
  remat: str = 'none'  # config.model.remat
  compute_bytes: int = 4  # per value of config.model.dtype

  def memory(self, kind: str = 'tpu') -> dict[str, float]:
    """Bytes per device on an accelerator of `kind`: parameters, gradients, optimizer, compute
    copies, activations."""
    n = self.local_params
    grads, copies = WEIGHT_WORKING_BYTES[kind](self.compute_bytes)
    grads += 4.0 if self.microbatches > 1 else 0.0  # the float32 sum they accumulate into
    return {'parameters': 4.0 * n, 'gradients': grads * n, 'optimizer': 8.0 * n,
            'compute copies': copies * n, 'activations': self.activations[kind]}

  def total(self, kind: str = 'tpu') -> float:
    return sum(self.memory(kind).values())

  def fits(self, share: float = HEADROOM) -> dict[str, bool]:
    """{accelerator: the plan needs at most `share` of its HBM}."""
    return {name: self.total(kind) <= share * hbm
            for name, (kind, hbm) in ACCELERATORS.items()}


def fused_attention_on_gpu(config, model) -> bool:
  """Whether the model's attention runs as cuDNN's fused kernel on GPU: the LM's multi-head or
  grouped-query attention in bf16/fp16, attention 'auto' or 'cudnn', heads a multiple of 8 up to
  128 (`transformer.attention_implementation`), no deterministic ops. The ViT's and MLA's run
  XLA's attention."""
  size = getattr(model, 'head_size', 0)
  return (getattr(model, 'attention', 'xla') != 'xla' and not getattr(model, 'latent', False)
          and model.dtype != 'float32' and size % 8 == 0 and 0 < size <= 128
          and not config.get('deterministic', False))


def _block_bytes(model, spec, stack, tokens_per_group: flops.Shape, sharded: bool,
                 act: int, scores: bool, backend: str, tensor: int = 1) -> tuple[float, float]:
  """Bytes one token keeps in one (dense, MoE) block of `stack` for the backward pass (compute
  dtype `act`): block input and its norms; queries, keys and values (per query head), attention
  output, scores and their softmax in float32 and the probabilities in `act`; the FFN's hidden
  activations (`FFN_KEPT`), and, in an MoE block, float32 router probabilities and the rows of
  the expert slots the token's share of them fills (dispatch as resolved on `backend`). Router
  probabilities: one per router logit (`Family.logits_shape`: E, Soft MoE's E * S), E for a
  family without logits. tensor: the size of the tensor axis, which splits the heads and the
  dense FFN's width."""
  d, heads = model.d_model, model.num_heads
  size = getattr(model, 'head_size', d // heads)
  qk = size + getattr(model, 'rope_head_dim', 0)
  attention = act * (2 * d + heads * (2 * qk + 2 * size) / tensor)
  attention += heads * stack.keys * (8 + act) / tensor if scores else 0
  width = FFN_KEPT[model.activation]
  dense = act * (2 * d + width * model.d_ff / tensor)
  if not stack.moe_layers:
    return attention + dense, 0.0
  executor = resolve_dispatch(spec, backend, model.dtype)
  if spec.capacity_factor is None and (sharded or executor not in ('ragged', 'blocked')):
    slots = spec.num_experts  # dropless through capacity slots of the group's size
  else:
    slots = flops.expert_slots_per_token(spec, tokens_per_group, 'executed')
  logits = families.family(spec).logits_shape(spec) or (spec.num_experts,)  # hash: one-hot probs
  router = 8 * math.prod(logits)
  moe = (act * (2 * d + spec.num_shared_experts * width * spec.d_ff)
         + router + slots * act * (2 * d + width * spec.d_ff))
  return attention + dense, attention + moe


def _stack_bytes(model, spec, stack, groups: flops.Shape, sharded: bool, act: int,
                 scores: bool, backend: str, tensor: int = 1) -> float:
  """Bytes one token keeps in the blocks of `stack`, rematerialized by model.remat
  (`REMAT_KEEPS`); tensor: as `_block_bytes`."""
  def blocks(scores: bool) -> tuple[float, float]:
    """(all blocks, the largest one)."""
    dense, moe = _block_bytes(model, spec, stack, groups, sharded, act, scores, backend, tensor)
    kinds = [(stack.layers - stack.moe_layers, dense), (stack.moe_layers, moe)]
    return sum(n * b for n, b in kinds), max(b for n, b in kinds if n)

  keeps = REMAT_KEEPS.get(getattr(model, 'remat', 'none'), 'all')
  total, largest = blocks(scores)
  if keeps == 'input':  # + a recomputed block's activations and their gradients
    return stack.layers * act * model.d_model + 2 * largest
  if keeps == 'no scores' and scores:
    unscored, unscored_largest = blocks(False)
    return unscored + 2 * (largest - unscored_largest)
  return total


def activation_bytes(config, task: tasks.Task, model, spec, local_batch: int,
                     sharded: bool, scores: bool = True, backend: str = 'tpu',
                     tensor: int = 1) -> float:
  """Bytes of activations one device keeps for the backward pass of `local_batch` examples (one
  microbatch's): every stack's blocks (`_stack_bytes`; scores=False: attention keeps no score
  matrices; `backend`: 'tpu' or 'gpu', for config.moe.dispatch='auto') and the output layer's
  float32 logits (`OUTPUTS`)."""
  act = DTYPE_BYTES[model.dtype]
  total = 8.0 * OUTPUTS[task.name](config, model) / tensor
  for stack in task.stacks(config):
    groups = flops.Shape(local_batch, stack.tokens)
    total += stack.tokens * _stack_bytes(model, spec, stack, groups, sharded, act, scores,
                                         backend, tensor)
  return local_batch * total


def make_plan(config, name: str = '') -> Plan:
  """The `Plan` of a full experiment config on its `config.mesh`, validated first (as `moe-jax
  train` does, against an `AbstractMesh`): a bad field is a ValueError naming it."""
  task, cfg, _, mesh = train.check_config(config, sharding.abstract_mesh(config))
  data, fsdp, expert, tensor = (mesh.shape[axis] for axis in sharding.AXES)
  model, spec = task.from_config(config)
  total, active = task.param_counts(config)
  moe_layers = sum(stack.moe_layers for stack in task.stacks(config))
  experts = moe_layers * flops.expert_params(spec, model.d_model) if moe_layers else 0
  local_batch = config.data.batch_size // (data * fsdp * expert)
  micro = local_batch // cfg.microbatches  # the examples whose activations are live at once
  sharded, notes = mesh.size > 1, []
  if spec is not None and spec.capacity_factor is None and sharded:
    notes.append('dropless routing on a mesh runs through capacity slots as large as a token '
                 'group (num_experts / k times the expert buffers, docs/parallelism.md): a '
                 'config.moe.capacity_factor bounds them')
  if fsdp > 1:
    notes.append(f'fsdp={fsdp} gathers each block\'s weights for its use: add one block\'s '
                 'weights to the peak')
  return Plan(
      name=name, mesh=(data, fsdp, expert, tensor), params_total=total, params_active=active,
      flops_active=task.flops_per_token(config, 'active'),
      flops_executed=task.flops_per_token(config, 'executed'),
      tokens_per_device=local_batch * task.token_shape(config).seq_len,
      local_params=round((total - experts) / (fsdp * tensor) + experts / (expert * fsdp * tensor)),
      activations={'tpu': activation_bytes(config, task, model, spec, micro, sharded,
                                           tensor=tensor),
                   'gpu': activation_bytes(config, task, model, spec, micro, sharded,
                                           scores=not fused_attention_on_gpu(config, model),
                                           backend='gpu', tensor=tensor)},
      notes=tuple(notes), microbatches=cfg.microbatches, remat=model.remat,
      compute_bytes=DTYPE_BYTES[model.dtype])


def _count(n: float) -> str:
  for unit, size in (('T', 1e12), ('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= size:
      return f'{n / size:.2f}{unit}'
  return f'{n:.0f}'


def render(plan: Plan) -> str:
  """The plan as `moe-jax plan` prints it."""
  data, fsdp, expert, tensor = plan.mesh
  lines = [
      f'{plan.name} on mesh data={data} x fsdp={fsdp} x expert={expert} x tensor={tensor} '
      f'({data * fsdp * expert * tensor} devices)',
      f'  parameters        {_count(plan.params_total)} total, {_count(plan.params_active)} '
      f'active per token',
      f'  FLOPs per token   {_count(plan.flops_active)} forward (active), '
      f'{_count(plan.flops_executed)} as executed; training ~3x',
      f'  tokens per device {plan.tokens_per_device:,} per step',
      f'  memory per device, GiB ({_count(plan.local_params)} weights held: experts / '
      f'(expert x fsdp x tensor) = /{expert * fsdp * tensor}, the rest / (fsdp x tensor) = '
      f'/{fsdp * tensor}; batch / (data x fsdp x expert) = /{data * fsdp * expert}'
      + (f'; activations of 1 of {plan.microbatches} microbatches' if plan.microbatches > 1
         else '') + (f'; remat={plan.remat}' if plan.remat != 'none' else '') + ')',
      f'    {"":16s}{"TPU":>11s}{"GPU":>11s}']
  tpu, gpu = plan.memory('tpu'), plan.memory('gpu')
  lines += [f'    {part:16s}{tpu[part] / GiB:11.2f}{gpu[part] / GiB:11.2f}' for part in tpu]
  lines.append(f'    {"total":16s}{plan.total("tpu") / GiB:11.2f}{plan.total("gpu") / GiB:11.2f}')
  lines.append(f'  fits (at most {HEADROOM:.0%} of HBM): ' + ', '.join(
      f'{name} ({ACCELERATORS[name][1] / GiB:.0f} GiB) {"yes" if ok else "no"}'
      for name, ok in plan.fits().items()))
  lines += [f'  note: {note}' for note in plan.notes]
  return '\n'.join(lines)
