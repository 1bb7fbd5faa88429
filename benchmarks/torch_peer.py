"""A PyTorch peer of `train_step.Case`'s model and training step: the benchmark's peer column
(`train_step.py --peer torch`).

The LM of `moe_jax.models.transformer.Transformer` with an MoE FFN in every block, alike in
structure and FLOPs: byte embedding [V, d]; num_layers pre-norm blocks, x += attn(norm(x));
x += moe(norm(x)) (RMSNorm; q, k, v, o projections without bias, RoPE on q and k, causal
`scaled_dot_product_attention`); final RMSNorm; unembedding [d, V]. The MoE FFN routes by token
choice, dropless: float32 router logits, softmax, top-k, the k weights renormalized to sum to 1
when k > 1. The T * k token slots, sorted by expert, run through the SwiGLU experts ([E, d, f]
gate and up, [E, f, d] down) by one grouped matmul per projection (`torch._grouped_mm`; a loop over
experts where it does not run); the shared experts are one dense SwiGLU of width
num_shared_experts * f. Loss: next-byte cross-entropy plus the load-balancing (Switch, per
sequence) and z losses. Step: float32 parameters, bf16 autocast, global-norm clipping, fused
AdamW (torch's default betas and eps are optax's; weight decay on matrices only), the model under
`torch.compile` unless turned off.

Shapes: B batch, L sequence length, d model width, H heads, E experts, k experts per token, f expert
width, T = B * L tokens, V = 256 bytes.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import time
import traceback
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256
EPS = 1e-6  # flax's RMSNorm
COMPUTE = torch.bfloat16
# Each expert's group of rows is padded to a multiple of ALIGN (16 bytes of bf16), the alignment
# PyTorch MoE code gives the groups of `torch._grouped_mm`.
ALIGN = 8


@dataclasses.dataclass(frozen=True)
class Hyper:
  """Our step's hyper-parameters: `train.make_optimizer`'s (the peak learning rate, held constant:
  the schedule does not change a step's work) and the MoE aux losses' weights."""
  learning_rate: float
  weight_decay: float
  clip_norm: float
  load_balancing_coef: float
  z_loss_coef: float


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
  """x [M, K] rows grouped, w [G, K, N], offs [G] int32 the groups' ends (rows past offs[-1]
  unused) -> [M, N]: group g's rows times w[g]."""
  return torch._grouped_mm(x, w, offs=offs)


def looped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
  """`grouped_mm` as one matmul per group -> [offs[-1], N] (the rows past the last group left out)."""
  sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
  return torch.cat([rows @ weight for rows, weight in zip(x[:sum(sizes)].split(sizes), w)])


GROUPED_MMS = {'grouped_mm': grouped_mm, 'loop': looped_mm}


def pick_grouped_mm(device: torch.device) -> str:
  """'grouped_mm' where `torch._grouped_mm` runs on `device` in bf16, else 'loop'."""
  try:
    x = torch.ones(16, 16, dtype=COMPUTE, device=device)
    grouped_mm(x, torch.ones(2, 16, 16, dtype=COMPUTE, device=device),
               torch.tensor([8, 16], dtype=torch.int32, device=device))
    return 'grouped_mm'
  except (AttributeError, RuntimeError, NotImplementedError):
    return 'loop'


def slot_rows(index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
  """Where the T * k token slots go among the grouped matmuls' rows, grouped by expert, each group
  padded to a multiple of ALIGN rows. index [T, k] -> (row of each slot [T k], offs [E] int32: the
  groups' ends)."""
  flat = index.flatten()
  order = flat.argsort(stable=True)
  rank = torch.empty_like(order).index_copy_(0, order, torch.arange(len(flat), device=flat.device))
  counts = flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))
  padded = (counts + ALIGN - 1) // ALIGN * ALIGN
  ends, padded_ends = counts.cumsum(0), padded.cumsum(0)
  shift = (padded_ends - padded) - (ends - counts)  # [E] padded group start - unpadded start
  return rank + shift[flat], padded_ends.to(torch.int32)


def rope(x: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
  """Rotary position embedding (rotate-half form). x: [B, L, H, D] -> [B, L, H, D]."""
  length, dim = x.shape[1], x.shape[-1]
  freqs = base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim)
  angles = torch.arange(length, dtype=torch.float32, device=x.device)[:, None] * freqs  # [L, D/2]
  cos, sin = angles.cos()[:, None], angles.sin()[:, None]
  x1, x2 = x.float().chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def linear(d_in: int, d_out: int) -> nn.Linear:
  return nn.Linear(d_in, d_out, bias=False)


class Attention(nn.Module):
  """Causal multi-head self-attention with RoPE. x: [B, L, d] -> [B, L, d]."""

  def __init__(self, d: int, heads: int):
    super().__init__()
    self.heads = heads
    self.query, self.key, self.value, self.out = (linear(d, d) for _ in range(4))

  def forward(self, x):
    b, l, d = x.shape
    q, k, v = (proj(x).view(b, l, self.heads, -1) for proj in (self.query, self.key, self.value))
    q, k, v = (y.transpose(1, 2) for y in (rope(q), rope(k), v))  # [B, H, L, D]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.out(out.transpose(1, 2).reshape(b, l, d))


class SwiGLU(nn.Module):
  """Dense SwiGLU FFN, (silu(x W_gate) * x W_in) W_out. x: [..., d] -> [..., d]."""

  def __init__(self, d: int, f: int):
    super().__init__()
    self.gate, self.up, self.down = linear(d, f), linear(d, f), linear(f, d)

  def forward(self, x):
    return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
  """Dropless token-choice MoE FFN with SwiGLU experts (and shared experts when num_shared > 0).
  x: [B, L, d] -> ([B, L, d], weighted aux loss)."""

  def __init__(self, d: int, f: int, num_experts: int, k: int, num_shared: int, hyper: Hyper,
               matmul: str):
    super().__init__()
    self.k, self.hyper, self.matmul = k, hyper, GROUPED_MMS[matmul]
    weights = lambda *shape: nn.Parameter(torch.randn(*shape) * shape[-2] ** -0.5)  # fan-in
    self.router = nn.Parameter(torch.randn(d, num_experts) * 0.02)
    self.w_gate, self.w_in, self.w_out = (weights(num_experts, d, f), weights(num_experts, d, f),
                                          weights(num_experts, f, d))
    self.shared = SwiGLU(d, num_shared * f) if num_shared else None

  def forward(self, x):
    b, l, d = x.shape
    with torch.autocast(x.device.type, enabled=False):
      logits = x.float() @ self.router  # [B, L, E]
    probs = logits.softmax(-1)
    weight, index = probs.topk(self.k, dim=-1)  # [B, L, k]
    if self.k > 1:
      weight = weight / weight.sum(-1, keepdim=True)
    y = self.experts(x.reshape(b * l, d), index.reshape(b * l, -1), weight.reshape(b * l, -1))
    y = y.view(b, l, d)
    if self.shared is not None:
      y = y + self.shared(x)
    return y, self.aux_loss(logits, probs, index)

  def experts(self, x, index, weight):
    """x [T, d]; index, weight [T, k] -> [T, d]: the sum of each token's k experts' outputs times
    their weights, the T * k slots grouped by expert (`slot_rows`) and run by grouped matmuls."""
    (t, k), (num_experts, d, _) = index.shape, self.w_in.shape
    row, offs = slot_rows(index, num_experts)
    rows = x.new_zeros(t * k + num_experts * (ALIGN - 1), d, dtype=COMPUTE).index_copy(
        0, row, x.to(COMPUTE).repeat_interleave(k, dim=0))  # padding rows stay 0
    w_gate, w_in, w_out = (w.to(COMPUTE) for w in (self.w_gate, self.w_in, self.w_out))
    h = F.silu(self.matmul(rows, w_gate, offs)) * self.matmul(rows, w_in, offs)
    y = self.matmul(h, w_out, offs)[row].view(t, k, d)  # back in slot order
    return (y * weight[..., None].to(y.dtype)).sum(1)

  def aux_loss(self, logits, probs, index):
    """Weighted Switch load-balancing loss, E * sum_e f_e P_e of each sequence (f_e: share of its
    T k choices, P_e: mean probability) averaged, plus the z-loss. logits, probs [B, L, E],
    index [B, L, k]."""
    b, l, e = probs.shape
    choices = index.reshape(b, -1)
    fraction = probs.new_zeros(b, e).scatter_add_(1, choices, probs.new_ones(choices.shape))
    balance = e * (fraction / choices.shape[1] * probs.mean(1)).sum(-1).mean()
    z = torch.logsumexp(logits, -1).square().mean()
    return self.hyper.load_balancing_coef * balance + self.hyper.z_loss_coef * z


class Block(nn.Module):
  """Pre-norm block: x += attn(norm(x)); x += moe(norm(x)). x: [B, L, d] -> ([B, L, d], aux)."""

  def __init__(self, case, hyper: Hyper, matmul: str):
    super().__init__()
    d = case.d_model
    self.attention_norm, self.ffn_norm = nn.RMSNorm(d, eps=EPS), nn.RMSNorm(d, eps=EPS)
    self.attention = Attention(d, case.num_heads)
    self.moe = MoE(d, case.d_ff, case.num_experts, case.k, case.num_shared_experts, hyper, matmul)

  def forward(self, x):
    x = x + self.attention(self.attention_norm(x))
    y, aux = self.moe(self.ffn_norm(x))
    return x + y, aux


class PeerLM(nn.Module):
  """The LM and its loss. batch [B, L + 1] bytes -> (cross-entropy + aux, cross-entropy)."""

  def __init__(self, case, hyper: Hyper, matmul: str):
    super().__init__()
    d = case.d_model
    self.embed = nn.Embedding(VOCAB, d)
    nn.init.normal_(self.embed.weight, std=d ** -0.5)
    self.blocks = nn.ModuleList(Block(case, hyper, matmul) for _ in range(case.num_layers))
    self.final_norm = nn.RMSNorm(d, eps=EPS)
    self.unembed = linear(d, VOCAB)

  def forward(self, batch):
    x, aux = self.embed(batch[:, :-1]).to(COMPUTE), 0.0
    for block in self.blocks:
      x, block_aux = block(x)
      aux = aux + block_aux
    logits = self.unembed(self.final_norm(x)).float()  # [B, L, V]
    loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    return loss + aux, loss


def make_step(model: PeerLM, hyper: Hyper, compile_model: bool):
  """The training step, batch [B, L + 1] -> cross-entropy (a 0-d tensor), updating `model`."""
  device = next(model.parameters()).device
  decay = [p for p in model.parameters() if p.ndim >= 2]
  rest = [p for p in model.parameters() if p.ndim < 2]
  groups = [{'params': decay, 'weight_decay': hyper.weight_decay},
            {'params': rest, 'weight_decay': 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=hyper.learning_rate, fused=True)
  forward = torch.compile(model) if compile_model else model

  def step(batch):
    with torch.autocast(device.type, dtype=COMPUTE):
      total, loss = forward(batch)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), hyper.clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  return step


def run_torch_case(case, warmup: int, steps: int, hyper: Mapping[str, float],
                   compile_model: bool = True, device: str | None = None) -> dict:
  """Times `case`'s training step like `train_step.run_case`: warmup steps (the first compiles),
  then the median of `steps` timed ones, each ending in a device synchronization. `case` needs the
  fields of `train_step.Case` that shape the model and batch; `hyper` holds `Hyper`'s fields. A
  model that fails to compile runs eagerly ('compiled': False)."""
  hyper = Hyper(**hyper)
  device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
  sync = torch.cuda.synchronize if device.type == 'cuda' else lambda: None
  matmul = pick_grouped_mm(device)
  torch.manual_seed(0)
  model = PeerLM(case, hyper, matmul).to(device)
  batch = torch.randint(0, VOCAB, (case.batch_size, case.seq_len + 1), device=device)
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)

  def timed(step):
    t0 = time.perf_counter()
    loss = float(step(batch))
    sync()
    return time.perf_counter() - t0, loss

  compiled = compile_model
  step = make_step(model, hyper, compiled)
  try:
    first = timed(step)
  except Exception:  # the compiler's failures: report and run eagerly
    if not compiled:
      raise
    traceback.print_exc()
    compiled = False
    model.zero_grad(set_to_none=True)
    step = make_step(model, hyper, compiled)
    first = timed(step)
  runs = [first] + [timed(step) for _ in range(warmup + steps - 1)]
  times = [t for t, _ in runs[warmup:]]
  step_s = statistics.median(times)
  result = {
      'step_ms': 1e3 * step_s, 'step_ms_all': [1e3 * t for t in times],
      'tokens_per_s': case.batch_size * case.seq_len / step_s,
      'losses': [loss for _, loss in runs], 'first_step_s': first[0],
      'compiled': compiled, 'grouped_mm': matmul, 'torch': torch.__version__,
      'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
      'params': sum(p.numel() for p in model.parameters()),
  }
  if device.type == 'cuda':
    result['peak_gb'] = torch.cuda.max_memory_allocated(device) / 1e9
  del model, step
  release()
  return result


def release() -> None:
  """Drops compiled graphs and returns cached device memory to the driver (before JAX takes it)."""
  torch._dynamo.reset()
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()
