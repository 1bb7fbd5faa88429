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
