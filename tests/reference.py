"""Plain NumPy reference routers: loops over tokens and experts, written for clarity, not speed.

Each returns the dense combine matrix [T, E] (weight of expert e in token t's output; 0 = not
routed there). An MoE layer's output is then sum_e combine[t, e] * FFN_e(x_t).
"""
import numpy as np


def softmax(x, axis=-1):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def capacity(tokens, experts, factor, k=1):
  return int(np.floor(k * tokens * factor / experts + 0.5))


def token_choice(logits, k, capacity_factor, priority='choice', renormalize=None):
  t, e = logits.shape
  probs = softmax(logits)
  choices = [list(np.argsort(-probs[i], kind='stable')[:k]) for i in range(t)]
  weights = np.array([[probs[i, c] for c in choices[i]] for i in range(t)])
  if renormalize if renormalize is not None else k > 1:
    weights = weights / weights.sum(-1, keepdims=True)
  if capacity_factor is None:
    cap = t
  else:
    cap = capacity(t, e, capacity_factor, k)
  if priority == 'token':
    order = [(i, j) for i in range(t) for j in range(k)]
  else:
    tokens = range(t)
    if priority == 'batch':
      tokens = sorted(range(t), key=lambda i: -probs[i].max())
    order = [(i, j) for j in range(k) for i in tokens]
  load = np.zeros(e, int)
  combine = np.zeros((t, e))
  for i, j in order:
    expert = choices[i][j]
    if load[expert] < cap:
      load[expert] += 1
      combine[i, expert] = weights[i, j]
  return combine


def expert_choice(logits, capacity_factor):
  t, e = logits.shape
  probs = softmax(logits)
  cap = capacity(t, e, capacity_factor)
  combine = np.zeros((t, e))
  for expert in range(e):
    for i in np.argsort(-probs[:, expert], kind='stable')[:cap]:
      combine[i, expert] = probs[i, expert]
  return combine


def moe_output(x, combine, expert_fns):
  """x: [T, d]; combine: [T, E]; expert_fns[e]: [d] -> [d]."""
  out = np.zeros_like(x, dtype=np.float64)
  for i in range(x.shape[0]):
    for e, fn in enumerate(expert_fns):
      if combine[i, e] != 0:
        out[i] += combine[i, e] * fn(x[i])
  return out


def soft_moe_output(x, logits, expert_fns):
  """x: [T, d]; logits: [T, E, S]. Slots mix tokens, outputs mix slots."""
  t, e, s = logits.shape
  dispatch = softmax(logits, axis=0)
  combine = softmax(logits.reshape(t, e * s), axis=1).reshape(t, e, s)
  slot_in = np.einsum('tes,td->esd', dispatch, x)
  slot_out = np.stack([[expert_fns[i](slot_in[i, j]) for j in range(s)] for i in range(e)])
  return np.einsum('tes,esd->td', combine, slot_out)


def sinkhorn_plan(logits, tol=1e-4, max_iters=100):
  """Megatron-LM's loop, in the probability domain: rows of exp(logits) to 1/T, columns to 1/E."""
  cost = np.exp(np.asarray(logits, np.float64))
  t, e = cost.shape
  d0, d1 = np.ones(t), np.ones(e)
  for _ in range(max_iters):
    d0 = 1 / t / (cost @ d1)
    new = 1 / e / (d0 @ cost)
    change = np.mean(np.abs(new - d1))
    d1 = new
    if change <= tol:
      break
  return d0[:, None] * cost * d1[None, :]


def top_k_combine(choose_by, weights, k):
  """Dense combine [T, E]: each token's top-k of `choose_by`, weighted by `weights`; no capacity."""
  combine = np.zeros_like(np.asarray(weights, np.float64))
  for i, row in enumerate(np.asarray(choose_by)):
    top = np.argsort(-row, kind='stable')[:k]
    combine[i, top] = weights[i, top]
  return combine


def best_balanced_total(scores):
  """The largest sum_t scores[t, expert_t] with at most ceil(T / E) tokens per expert (Hungarian
  algorithm on experts repeated ceil(T / E) times)."""
  from scipy.optimize import linear_sum_assignment  # pylint: disable=g-import-not-at-top
  t, e = scores.shape
  slots = np.repeat(np.asarray(scores, np.float64), -(-t // e), axis=1)
  rows, cols = linear_sum_assignment(slots, maximize=True)
  return slots[rows, cols].sum()


def murmur_expert(token_ids, num_experts, seed=0):
  """murmur3's 32-bit finalizer of id + seed, mod E, with Python integers."""
  out = []
  for token in np.asarray(token_ids).reshape(-1):
    x = (int(token) + seed) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    out.append((x ^ (x >> 16)) % num_experts)
  return np.array(out).reshape(np.shape(token_ids))


def group_limited_experts(choose_by, k, num_groups, groups_per_token):
  """Per token: score each group by the sum of its top-2 affinities, keep the best
  groups_per_token groups, then the top-k experts inside them. [T, E] -> list of expert sets."""
  t, e = choose_by.shape
  size = e // num_groups
  chosen = []
  for row in np.asarray(choose_by, np.float64):
    groups = row.reshape(num_groups, size)
    group_score = np.sort(groups, axis=1)[:, ::-1][:, :min(2, size)].sum(1)
    keep = np.argsort(-group_score, kind='stable')[:groups_per_token]
    allowed = [g * size + j for g in sorted(keep) for j in range(size)]
    chosen.append(set(sorted(allowed, key=lambda x: -row[x])[:k]))
  return chosen
