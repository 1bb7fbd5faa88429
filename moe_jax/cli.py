"""The `moe-jax` command line: `moe-jax <command> [flags]`.

  moe-jax train  --config configs/lm_tiny.py --workdir DIR [--config.model.d_model=64 ...]
  moe-jax train  --config configs/vit_digits.py --workdir DIR   (the trainer serves every task)
  moe-jax sweep  --config configs/compare_routers.py --workdir DIR [--only dense,switch_top1]
  moe-jax report --workdir DIR
  moe-jax config --config FILE [--config.moe.router=soft ...]   (prints the resolved config)
  moe-jax plan   --config FILE --config.mesh.data=D --config.mesh.expert=X [--config.mesh.fsdp=F ...]
                 (parameters, FLOPs, memory per device and the accelerators it fits; no device used)
  moe-jax tokenizer --data english_mix --vocab_size 8192 --out DIR
                 (a SentencePiece vocabulary from the training split; --config.data.tokenizer=
                 DIR/tokenizer.model trains on it)

Config overrides are ml_collections' `--config.<field>=<value>`; `--config FILE:ARG` passes ARG to
the file's get_config, whose presets it picks (e.g. `configs/lm_tiny.py:dropless` for
`moe.capacity_factor=None`; configs/__init__.py). `--config.<field>=None` (or none) sets a field
that may be None (typed optional, e.g. config.moe.capacity_factor). A config in a package
(configs/, configs/papers/) imports its siblings as Python, from any folder. Each command is one
`COMMANDS` entry: a function defining its flags on its own `FlagValues` and a function running with
them. A user's mistake (a missing config file, a syntax error in it, a bad field value or name, a
workdir that is a file, missing data, no runs to report, a workdir another run is using, a
checkpoint that cannot be written) ends in one line on stderr and exit code 2, Ctrl-C (at any
moment of `train` or `sweep`: they stop at a safe point, resumable) in 130 and a non-finite loss
in 1, with no traceback.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import sys
import textwrap
from typing import Any, Callable, Sequence

from absl import flags
from ml_collections import config_flags

from moe_jax import interrupt

PROG = 'moe-jax'


@dataclasses.dataclass(frozen=True)
class Command:
  """A subcommand: `define_flags(fv, argv)` declares its flags, `run(fv)` runs with them parsed.

  argv is the command's own argument list, which config-file flags scan for their overrides.
  """
  help: str
  define_flags: Callable[[flags.FlagValues, Sequence[str]], None]
  run: Callable[[flags.FlagValues], Any]


def _config_flag(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  """--config FILE (required), with --config.<field>=value overrides."""
  config_flags.DEFINE_config_file(
      'config', None, 'ml_collections config file defining get_config(), as FILE or FILE:ARG '
      '(ARG picks presets, e.g. configs/lm_tiny.py:dropless); override fields with '
      '--config.<field>=<value>. `moe-jax config --config FILE` prints the resolved config and '
      'the router families with their options.', flag_values=fv,
      lock_config=True, sys_argv=list(argv))
  flags.mark_flags_as_required(['config'], flag_values=fv)


def _config_and_workdir_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  """--config FILE (with --config.<field>=value overrides) and --workdir DIR, both required."""
  _config_flag(fv, argv)
  flags.DEFINE_string('workdir', None, 'run directory: config.json, metrics.jsonl, TensorBoard '
                      'events, checkpoints/, summary.json. An existing one is resumed.',
                      flag_values=fv)
  flags.mark_flags_as_required(['workdir'], flag_values=fv)


def _train(fv: flags.FlagValues) -> None:
  from moe_jax.parallel import multihost  # here, so that `moe-jax --help` does not import JAX
  from moe_jax.run import memory_plan, train  # here, so that `moe-jax --help` does not import JAX

  # Before JAX starts its backend: on a GPU, JAX may take the share of memory that `moe-jax plan`
  # counts a config as fitting (its own default is 75%); a value the user set stands.
  os.environ.setdefault(memory_plan.MEMORY_FRACTION, str(memory_plan.HEADROOM))
  multihost.initialize_from_env()  # multi-host: before any mesh is built; else a no-op

  summary = train.train(fv.config, fv.workdir)
  print(json.dumps(summary, indent=2))


def _sweep_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  _config_and_workdir_flags(fv, argv)
  flags.DEFINE_list('only', None, 'train only these members (comma-separated names).',
                    flag_values=fv)


def _sweep(fv: flags.FlagValues) -> None:
  from moe_jax.parallel import multihost
  from moe_jax.run import report, sweep

  multihost.initialize_from_env()

  print(sweep.run_sweep(fv.config, fv.workdir, only=fv.only))
  print(report.written(fv.workdir))


def _workdir_flag(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  del argv
  flags.DEFINE_string('workdir', None, 'a run directory, or a sweep directory of runs.',
                      flag_values=fv)
  flags.mark_flags_as_required(['workdir'], flag_values=fv)


def _report(fv: flags.FlagValues) -> None:
  from moe_jax.run import report

  print(report.write_report(fv.workdir))
  print(report.written(fv.workdir))


def _check_config(config) -> None:
  """Raises the ValueError that `train` (or, for a sweep config, `sweep`) would raise for `config`,
  naming the field: `train.check_config` on config.mesh as an `AbstractMesh` (no device used)."""
  from moe_jax.parallel import sharding
  from moe_jax.run import sweep, train

  if 'base' in config and 'members' in config:  # a sweep: each member as `sweep` builds it
    configs = [sweep.member_config(config.base, overrides) for overrides in config.members.values()]
  else:
    configs = [config]
  for member in configs:
    train.check_config(member, sharding.abstract_mesh(member))


def _show_config(fv: flags.FlagValues) -> None:
  if 'jax' not in sys.modules:  # checking a config never needs an accelerator: keep JAX off it
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from moe_jax.moe import families, spec

  _check_config(fv.config)  # a config that train would refuse is not printed
  print(fv.config)
  print('Router families (config.moe.router; moe_jax/routers/, registered in moe_jax/moe/families.py):')
  for name, family in families.FAMILIES.items():
    options = ', '.join(family.options) or 'none'
    print(f'  {name:14s}{family.cite}. Options: {options}.')
  print(f'group_by: {", ".join(spec.GROUPINGS)}; score: {", ".join(spec.SCORES)}; priority: '
        f'{", ".join(spec.PRIORITIES)}; router_logits: {", ".join(spec.ROUTER_LOGITS)}; '
        f'balance_over: {", ".join(spec.BALANCE_SCOPES)}.\n'
        'config.moe fields (moe_jax/moe/spec.py, MoESpec):')
  attributes = spec.MoESpec.__doc__.split('Attributes:\n', 1)[1]
  print(textwrap.indent(textwrap.dedent(attributes).rstrip(), '  '))


def _plan(fv: flags.FlagValues) -> None:
  if 'jax' not in sys.modules:  # a plan never needs an accelerator: keep JAX off it
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from moe_jax.run import memory_plan

  name = config_flags.get_config_filename(fv['config'])
  print(memory_plan.render(memory_plan.make_plan(fv.config, name=name)))


def _tokenizer_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  del argv
  flags.DEFINE_string('data', None, 'the text data set whose TRAINING split the vocabulary is '
                      'learnt from (e.g. english_mix, tiny_shakespeare)', flag_values=fv)
  flags.DEFINE_integer('vocab_size', 8192, 'pieces in the vocabulary (byte fallback takes 256 '
                       'of them)', flag_values=fv)
  flags.DEFINE_string('out', None, 'folder for tokenizer.model, tokenizer.vocab and '
                      'tokenizer.json; then train with --config.data.tokenizer=OUT/tokenizer.model',
                      flag_values=fv)
  flags.DEFINE_enum('model_type', 'unigram', ['unigram', 'bpe'], 'SentencePiece model type',
                    flag_values=fv)
  flags.DEFINE_integer('input_sentence_size', 300_000, 'lines sampled from the training split '
                       '(caps the time: about a minute for 8k pieces)', flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'TFDS data dir (as config.data.data_dir)', flag_values=fv)
  flags.DEFINE_string('manual_dir', None, 'the data set\'s local files (as '
                      'config.data.manual_dir)', flag_values=fv)
  flags.mark_flags_as_required(['data', 'out'], flag_values=fv)


def _tokenizer(fv: flags.FlagValues) -> None:
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # no accelerator needed
  from moe_jax.data import tokenizers

  command = ' '.join([PROG, 'tokenizer', f'--data={fv.data}', f'--vocab_size={fv.vocab_size}',
                      f'--out={fv.out}', f'--model_type={fv.model_type}',
                      f'--input_sentence_size={fv.input_sentence_size}'])
  try:
    record = tokenizers.train_sentencepiece(
        fv.data, fv.vocab_size, fv.out, data_dir=fv.data_dir, manual_dir=fv.manual_dir,
        model_type=fv.model_type, input_sentence_size=fv.input_sentence_size, command=command)
  except (ValueError, OSError) as e:  # the data's messages name config fields: name the flags
    message = str(e)
    for field, flag in (('--config.data.manual_dir', '--manual_dir'),
                        ('config.data.data_dir', '--data_dir'), ('config.data.name', '--data')):
      message = message.replace(field, flag)
    raise type(e)(message) from None
  out = pathlib.Path(fv.out)
  print(f'wrote {out / "tokenizer.model"}, {out / "tokenizer.vocab"} and '
        f'{out / tokenizers.RECORD} ({record["vocab_size"]} pieces from the {record["split"]} '
        f'split of {record["data"]}, {record["seconds"]} s); train with '
        f'--config.data.tokenizer={out / "tokenizer.model"}')


COMMANDS: dict[str, Command] = {
    'train': Command('train (or resume) a run: the LM or the ViT, as the config says',
                     _config_and_workdir_flags, _train),
    'sweep': Command('train every member of an equal-FLOPs sweep, then report', _sweep_flags,
                     _sweep),
    'report': Command('results.md/.csv and plots from run directories', _workdir_flag, _report),
    'config': Command('print the resolved config (file + overrides) and the router options',
                      _config_flag, _show_config),
    'plan': Command('parameters, FLOPs and memory per device of a config on its mesh, and the '
                    'accelerators it fits, before any device is used', _config_flag, _plan),
    'tokenizer': Command('train a SentencePiece vocabulary on a data set\'s training split',
                         _tokenizer_flags, _tokenizer),
}


def _usage() -> str:
  lines = [f'usage: {PROG} <command> [flags]   ({PROG} <command> --help for its flags)', '',
           'commands:']
  lines += [f'  {name:10s}{command.help}' for name, command in COMMANDS.items()]
  return '\n'.join(lines)


class _StderrHandler(logging.StreamHandler):
  """A log handler writing to the sys.stderr of the moment, which a later caller of `main` (a
  test, a notebook) may have replaced."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    del value


def _config_value(args: Sequence[str]) -> str | None:
  """The FILE[:ARG] of `--config FILE[:ARG]` in args."""
  for i, arg in enumerate(args):
    if arg in ('--config', '-config') and i + 1 < len(args):
      return args[i + 1]
    if arg.startswith(('--config=', '-config=')):
      return arg.split('=', 1)[1]
  return None


def _config_file(args: Sequence[str]) -> str | None:
  """The FILE of `--config FILE[:ARG]` in args (ARG goes to the file's get_config)."""
  value = _config_value(args)
  return None if value is None else value.split(':', 1)[0]


def _import_path_for(config_file: str) -> None:
  """Puts the folder above the config file's top-most package (the repository root for
  configs/*.py and configs/papers/*.py) first on sys.path, so that the config imports its
  siblings (`from configs import lm_tiny`, `from configs.papers import common`) however and from
  wherever moe-jax was started. A config file outside a package changes nothing."""
  folder = pathlib.Path(config_file).resolve().parent
  if not (folder / '__init__.py').exists():
    return
  while (folder.parent / '__init__.py').exists():
    folder = folder.parent
  if str(folder.parent) not in sys.path:
    sys.path.insert(0, str(folder.parent))


_NONE = ('None', 'none')


def _overrides(args: Sequence[str]) -> list[tuple[int, str, str | None]]:
  """(index, path, value) of each `--config.<path>=<value>` or `--config.<path> <value>` in args
  (value None for a bare boolean `--config.<path>`)."""
  found = []
  for i, arg in enumerate(args):
    name, equals, value = arg.partition('=')
    if name.startswith(('--config.', '-config.')):
      path = name.split('.', 1)[1]
      if not equals:
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith('-') else None
      found.append((i, path, value))
  return found


def _split_none_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
  """Takes `--config.<path>=None` (or none) out of args: ml_collections parses a field by its
  type, and a float or bool field refuses 'None' even where None is a valid value (e.g.
  config.moe.capacity_factor: dropless). Returns (the other args, the paths to set to None after
  parsing); an override of the same path later in args wins over a None."""
  overrides, drop, paths = _overrides(args), set(), []
  for n, (i, path, value) in enumerate(overrides):
    if value in _NONE:
      drop.update({i} if '=' in args[i] else {i, i + 1})
      if not any(later == path for _, later, _ in overrides[n + 1:]):
        paths.append(path)
  return [arg for i, arg in enumerate(args) if i not in drop], paths


def _set_none(config, path: str) -> None:
  """Sets config field `path` to None; a flags.Error when the field cannot be None (it is not
  typed as optional, e.g. `config_dict.placeholder(float)`, and does not hold None)."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top

  *parents, field = path.split('.')
  holder = config
  for name in parents:
    holder = holder[name]
  value = dict(holder.items(preserve_field_references=True))[field]
  if not (isinstance(value, config_dict.FieldReference) or value is None):
    raise flags.Error(f'--config.{path}=None: config.{path} cannot be None (it holds '
                      f'{value!r}); give a value of its type.')
  holder[field] = None


def _unknown_field(args: Sequence[str], message: str) -> str:
  """The message for an override that names no config field: which override, and for a sweep
  config (whose fields live under `base.`) the override to use instead."""
  try:  # the config as its file gives it, without the overrides
    value, fv = _config_value(args), flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, '', flag_values=fv,
                                    sys_argv=[PROG, '--config', value])
    fv([PROG, '--config', value])
    config = fv.config
  except Exception:  # pylint: disable=broad-exception-caught
    return message

  def missing(root, path: str) -> int | None:
    """The index of the first name of `path` that root lacks, None when it has them all."""
    for i, name in enumerate(path.split('.')):
      if not hasattr(root, 'keys') or name not in root:
        return i
      root = root[name]
    return None

  for _, path, value in _overrides(args):
    at = missing(config, path)
    if at is None:
      continue
    if 'base' in config and 'members' in config and missing(config.base, path) is None:
      value = '' if value is None else f'={value}'
      return (f'--config.{path}: a sweep config has no field {path}: a sweep\'s fields live under '
              f'base. (the config each member starts from); use --config.base.{path}{value}')
    names = path.split('.')
    where = '.'.join(['config', *names[:at]])
    suggestion = message[message.find('Did you mean'):].splitlines()[0] if (
        'Did you mean' in message) else ''
    return f'--config.{path}: {where} has no field {names[at]!r}. {suggestion}'.rstrip()
  return message


def _run(name: str, fv: flags.FlagValues) -> int:
  """Runs command `name`; returns its exit status. A user's mistake (ValueError or OSError: the
  config, workdir or data), Ctrl-C and a non-finite loss end in one message, no traceback."""
  try:
    COMMANDS[name].run(fv)
    return 0
  except KeyboardInterrupt as e:  # train.Interrupted says where to resume
    status, message = 130, str(e) or 'interrupted'
  except FloatingPointError as e:  # train.NonFiniteLoss
    status, message = 1, str(e)
  except (ValueError, OSError) as e:
    status, message = 2, str(e)
  print(f'{PROG} {name}: {message}', file=sys.stderr)
  return status


TRAINING = ('train', 'sweep')  # Ctrl-C stops them at a safe point (moe_jax/interrupt.py)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `moe-jax <command> [flags]`; returns the exit status."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in TRAINING:
    return _main(argv)
  with interrupt.deferred():  # from the start: Ctrl-C while JAX imports or compiles is safe too
    status = _main(argv)
    if status == 0 and interrupt.requested():  # pressed after training's last safe point
      print(f'{PROG} {argv[1]}: interrupted once its work was done', file=sys.stderr)
      status = 130
  return status


def _main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
    print(_usage())
    return 0 if len(argv) >= 2 else 2
  name, args = argv[1], argv[2:]
  if name not in COMMANDS:
    print(f'{PROG}: unknown command {name!r}.\n\n{_usage()}', file=sys.stderr)
    return 2
  args = [f'{PROG} {name}', *args]
  fv = flags.FlagValues()
  COMMANDS[name].define_flags(fv, args)
  if '-h' in args or '--help' in args:
    print(f'usage: {PROG} {name} [flags]\n\n{fv.get_help()}')
    return 0
  config_file = _config_file(args) if 'config' in fv else None
  try:
    parsed, to_none = args, []
    if config_file is not None:  # ml_collections would say so only at the config's first use
      if not os.path.isfile(config_file):
        raise flags.Error(f'config file {config_file} not found')
      _import_path_for(config_file)
      parsed, to_none = _split_none_overrides(args)
    rest = fv(parsed)
    if len(rest) > 1:
      raise flags.Error(f'unexpected arguments {rest[1:]}')
    for path in to_none:
      _set_none(fv.config, path)
  except SyntaxError as e:  # in the config file, or a module it imports
    where = f'config file {config_file}'
    if e.filename and os.path.abspath(e.filename) != os.path.abspath(config_file):
      where = f'{e.filename} (imported by config file {config_file})'
    print(f'{PROG} {name}: {where}, line {e.lineno}: {e.msg}: fix the Python syntax there.',
          file=sys.stderr)
    return 2
  except ImportError as e:  # the config file imports what is not there
    print(f'{PROG} {name}: config file {config_file}: {e}. A config in a package (folders with '
          '__init__.py) imports from the folder above its top package; fix the import or install '
          'what it needs.', file=sys.stderr)
    return 2
  except (flags.Error, KeyError, AttributeError) as e:  # the latter two: unknown config fields
    message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    if isinstance(e, AttributeError) and "has no attribute 'get_config'" in message:
      message = f'config file {config_file} defines no get_config(): name an experiment config'
    elif isinstance(e, AttributeError):  # ConfigDict's message is a repr: unquote it
      message = 'unknown config field ' + message.strip('\'').replace('\\n', ' ').replace(
          "\\'", "'")
    if isinstance(e, KeyError):
      message = 'unknown config field ' + message
    if isinstance(e, KeyError) or message.startswith('unknown config field'):
      message = _unknown_field(args, message)
    last = message.rstrip().splitlines()[-1]
    if 'Traceback' in message and last.startswith('ValueError: '):  # from get_config(ARG)
      message = last.removeprefix('ValueError: ')
    print(f'{PROG} {name}: {message}\n\nSee `{PROG} {name} --help`.', file=sys.stderr)
    return 2
  logger = logging.getLogger('moe_jax')
  if not logger.handlers:
    logger.addHandler(_StderrHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler (absl's) would print each line twice
  return _run(name, fv)


if __name__ == '__main__':
  sys.exit(main())
