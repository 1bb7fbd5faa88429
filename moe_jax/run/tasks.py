"""What one trainer (`moe_jax.run.train`) and the sweeps (`moe_jax.run.sweep`) train: a task is a model
family with its data and loss.

`LM`: the transformer LM (`models.transformer`) on text as bytes, next-token cross-entropy (an
encoder-decoder's: of its decoder tokens, the text that follows its encoder's).
`VIT`: the ViT classifier (`models.vit`) on images, cross-entropy and accuracy.
`of(config)` is an experiment config's task.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_jax.data import images as image_data, pipeline, text, tokenizers
from moe_jax.models import transformer, vit
from moe_jax.moe import flops

log = logging.getLogger(__name__)
Batch = Any  # one batch of a task's data: a pytree of [B, ...] host arrays


@dataclasses.dataclass(frozen=True)
class Data:
  """A task's data set, loaded: `train_batch(i)` is training batch i, a function of (seed, i)
  only, so a resumed run continues exactly; `eval_batches` are the held-out batches, whose metrics
  average with `eval_weights` (None: equally).

  Tokenized text streams instead (`moe_jax.data.pipeline`): `stream(sharding)` is then the
  `StreamFeed` of this process's rows, whose state is saved beside each checkpoint, and
  train_batch is None. `eval_bytes_per_token`: UTF-8 bytes of the held-out text scored per scored
  token (text only; None for images), for bits per byte."""
  train_batch: Callable[[int], Batch] | None
  eval_batches: list[Batch]
  eval_weights: list[int] | None = None
  stream: Callable[[Any], Any] | None = None
  eval_bytes_per_token: float | None = None

  def feed(self, sharding):
    """The training batches placed by `sharding`: `batch(i)`, `save(workdir, step, kept_steps)`,
    `restore(workdir, step)` (`pipeline.IndexedFeed` or `pipeline.StreamFeed`)."""
    if self.stream is not None:
      return self.stream(sharding)
    return pipeline.IndexedFeed(self.train_batch, sharding)


@dataclasses.dataclass(frozen=True)
class Task:
  """A model family and its data, as the trainer and sweeps see them.

  From a full experiment config: from_config -> (model config, MoESpec or None for a dense
  model); build -> the flax model, validating config.data, config.model and config.moe;
  input_spec -> a batch of model inputs (for init); flops_per_token(config, convention) and
  param_counts -> (total, active) count the model (`moe_jax.moe.flops` conventions); stacks -> its
  blocks as `models.Stack`s (for memory plans); load -> `Data`,
  FileNotFoundError when the data set is missing. Of a batch: inputs -> the model's input;
  loss(logits, batch) -> (mean loss, {metric: value}), e.g. {'accuracy': ...}.
  """
  name: str
  from_config: Callable
  build: Callable
  input_spec: Callable[[Any], jax.ShapeDtypeStruct]
  flops_per_token: Callable[..., float]
  param_counts: Callable[[Any], tuple[int, float]]
  stacks: Callable[[Any], list]
  load: Callable[[Any], Data]
  inputs: Callable[[Batch], jax.Array]
  loss: Callable[[jax.Array, Batch], tuple[jax.Array, dict]]

  def token_shape(self, config) -> flops.Shape:
    """A batch as the FFN layers see it: batch_size examples of this many tokens each."""
    inputs = self.input_spec(config)
    model, _ = self.from_config(config)
    return flops.Shape(inputs.shape[0], model.num_tokens(inputs.shape[1:]))


def _check_sizes(config, *names: str) -> None:
  for name in names:
    value = config.data[name]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'config.data.{name}={value!r} is invalid: use a positive integer.')


# --- LM: next-byte prediction on text ----------------------------------------------------------


def _build_lm(config) -> transformer.Transformer:
  _check_sizes(config, 'seq_len', 'batch_size')
  if transformer.input_len(config):
    _check_sizes(config, 'input_len')
  return transformer.build(config)


def _load_text(config) -> Data:
  """Batches of [batch_size, input_len + seq_len + 1] tokens (input_len: an encoder-decoder's
  encoder tokens, else 0); held out: the validation split, laid out by `text.eval_batches`.

  config.data.tokenizer='bytes': the text read into memory as bytes, training batch i a function
  of (seed, i) (`moe_jax.data.text`). A SentencePiece model: streamed through Grain
  (`moe_jax.data.pipeline`), the held-out batches from the whole validation split (its first
  `pipeline.EVAL_TOKENS` tokens when larger)."""
  tokenizer = tokenizers.of(config)
  size, length = config.data.batch_size, transformer.input_len(config) + config.data.seq_len
  if tokenizer.name == tokenizers.BYTES:
    splits = text.load_text_splits(config.data.name, data_dir=config.data.data_dir,
                                   manual_dir=config.data.manual_dir)
    tokens = text.encode(splits['train'])
    held_out = text.eval_batches(text.encode(splits['validation']), size, length,
                                 config.train.eval_batches)
    return Data(lambda i: text.train_batch(tokens, i, size, length, config.seed),
                list(held_out), eval_bytes_per_token=1.0)
  sources = text.text_sources(config.data.name, data_dir=config.data.data_dir,
                              manual_dir=config.data.manual_dir)
  windows = max(config.train.eval_batches, text.MIN_ROW_GAP_WINDOWS) * size
  held_tokens = pipeline.eval_tokens(sources['validation'], tokenizer,
                                     max(windows * length + 1, pipeline.EVAL_TOKENS))
  held_out = text.eval_batches(held_tokens, size, length, config.train.eval_batches)
  scored = held_out[..., -config.data.seq_len:]  # the targets the loss scores
  bytes_per_token = float(tokenizer.piece_bytes[scored].sum()) / scored.size
  if not tokenizer.lossless:
    log.warning('tokenizer %s does not round-trip text exactly (normalization): bits per byte '
                'count the bytes of the text as it normalizes it', tokenizer.name)

  def stream(sharding):
    return pipeline.StreamFeed(
        lambda rows: pipeline.PackedRows(sources['train'], tokenizer, rows=rows, num_rows=size,
                                         length=length + 1, seed=config.seed),
        sharding, size, length + 1)

  return Data(None, list(held_out), stream=stream, eval_bytes_per_token=bytes_per_token)


def cross_entropy(logits: jax.Array, batch: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of the last L positions. logits: [B, L, V] for inputs
  batch[:, :-1], batch: [B, M + L + 1] (M = 0, or an encoder-decoder's encoder tokens)."""
  targets = batch[:, -logits.shape[1]:]
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _text_loss(logits: jax.Array, batch: jax.Array) -> tuple[jax.Array, dict]:
  return cross_entropy(logits, batch), {}


LM = Task(name='lm', from_config=transformer.from_config, build=_build_lm,
          input_spec=transformer.input_spec, flops_per_token=transformer.model_flops_per_token,
          param_counts=transformer.param_counts, stacks=transformer.stacks,
          load=_load_text,
          inputs=lambda batch: batch[:, :-1], loss=_text_loss)


# --- ViT: image classification -----------------------------------------------------------------


def _build_vit(config) -> vit.ViT:
  _check_sizes(config, 'batch_size')
  return vit.build(config)


def _load_images(config) -> Data:
  """Batches of (images [B, H, W, C], labels [B]) (`moe_jax.data.images`); held out: the whole
  test split in config.train.eval_batches nearly equal batches, weighted by their sizes."""
  with text.quiet_tfds():
    splits = image_data.load_image_splits(config.data.name, data_dir=config.data.data_dir,
                                              manual_dir=config.data.manual_dir)
  images, labels = splits['train']
  test_images, test_labels = splits['test']
  parts = config.train.eval_batches
  held_out = list(zip(np.array_split(test_images, parts), np.array_split(test_labels, parts)))
  return Data(lambda i: image_data.train_batch(images, labels, i, config.data.batch_size,
                                                   config.seed),
              held_out, [len(y) for _, y in held_out])


def classification_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy, accuracy). logits [B, classes], labels [B] int."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def _image_loss(logits: jax.Array, batch) -> tuple[jax.Array, dict]:
  loss, accuracy = classification_loss(logits, batch[1])
  return loss, {'accuracy': accuracy}


VIT = Task(name='vit', from_config=vit.from_config, build=_build_vit, input_spec=vit.input_spec,
           flops_per_token=vit.model_flops_per_token, param_counts=vit.param_counts,
           stacks=vit.stacks,
           load=_load_images, inputs=lambda batch: batch[0], loss=_image_loss)


TASKS = {task.name: task for task in (LM, VIT)}


def get(name: str) -> Task:
  """The task called `name` ('lm' or 'vit'); a ValueError naming config.task otherwise."""
  if name not in TASKS:
    raise ValueError(f'config.task={name!r} is invalid: choose one of {sorted(TASKS)}.')
  return TASKS[name]


def of(config) -> Task:
  """The task of an experiment config: `config.task` where it has one, else 'vit' for an image
  data set (`image_data.IMAGE_BUILDERS`, `STOCK_IMAGES`) and 'lm' for text."""
  images = {**image_data.IMAGE_BUILDERS, **image_data.STOCK_IMAGES}
  default = 'vit' if config.data.name in images else 'lm'
  return get(config.get('task', default))
