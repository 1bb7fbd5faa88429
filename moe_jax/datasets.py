"""TFDS builders of the project's own, which read local files and need no TensorFlow.

The stock `tiny_shakespeare` builder downloads its file and reads it with `tf.io.gfile`.
`TinyShakespeareManual` reads the same file from a manual dir instead and yields the same
features and splits, so it can be prepared offline as `array_record` and read back with
`builder.as_data_source()`.
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds


class TinyShakespeareManual(tfds.core.GeneratorBasedBuilder):
  """Tiny Shakespeare from `<manual_dir>/input.txt`; same splits and features as stock."""

  VERSION = tfds.core.Version('1.0.0')
  MANUAL_FILES = ('input.txt',)
  URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'With the network, download {URL} (1,115,394 bytes: the file stock TFDS fetches) into '
      'that folder.')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='40,000 lines of Shakespeare (karpathy/char-rnn), read from a manual dir.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        supervised_keys=None,
        homepage='https://github.com/karpathy/char-rnn/blob/master/data/tinyshakespeare/input.txt',
    )

  def _split_generators(self, dl_manager):
    text = (pathlib.Path(dl_manager.manual_dir) / self.MANUAL_FILES[0]).read_bytes().decode('utf-8')
    # The stock builder's 90/5/5 split, in characters.
    i = int(len(text) * 0.9)
    train, rest = text[:i], text[i:]
    i = int(len(rest) * 0.5)
    splits = {'train': train, 'validation': rest[:i], 'test': rest[i:]}
    return {name: self._generate_examples(name, split) for name, split in splits.items()}

  def _generate_examples(self, split_key, split_text):
    yield split_key, {'text': split_text}


# Data set names served by a local builder, and the builder for each.
LOCAL_BUILDERS = {'tiny_shakespeare': TinyShakespeareManual}
