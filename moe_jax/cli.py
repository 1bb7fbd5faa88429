"""The `moe-jax` command line: `moe-jax <command> [flags]`.

  moe-jax train  --config configs/lm_tiny.py --workdir DIR [--config.model.d_model=64 ...]
  moe-jax sweep  --config configs/compare_routers.py --workdir DIR [--only dense,switch_top1]
  moe-jax report --workdir DIR

Config overrides are ml_collections' `--config.<field>=<value>`; `--config.<field>=None` sets a
field to None (e.g. `--config.moe.capacity_factor=None` for dropless routing), applied after the
other overrides. Each command is one `COMMANDS` entry: a function defining its flags on its own
`FlagValues` and a function running with them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from typing import Any, Callable, Sequence

from absl import flags
from ml_collections import config_flags

PROG = 'moe-jax'
_NONE_OVERRIDE = re.compile(r'^--?config\.([\w.]+)=(?:None|none)$')


@dataclasses.dataclass(frozen=True)
class Command:
  """A subcommand: `define_flags(fv, argv)` declares its flags, `run(fv)` runs with them parsed.

  argv is the command's own argument list, which config-file flags scan for their overrides.
  """
  help: str
  define_flags: Callable[[flags.FlagValues, Sequence[str]], None]
  run: Callable[[flags.FlagValues], Any]


def _config_and_workdir_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  """--config FILE (with --config.<field>=value overrides) and --workdir DIR, both required."""
  config_flags.DEFINE_config_file(
      'config', None, 'ml_collections config file defining get_config(); override fields with '
      '--config.<field>=<value>, or --config.<field>=None.', flag_values=fv, lock_config=True,
      sys_argv=list(argv))
  flags.DEFINE_string('workdir', None, 'run directory: config.json, metrics.jsonl, '
                      'checkpoints/, summary.json. An existing one is resumed.', flag_values=fv)
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=fv)


def _train(fv: flags.FlagValues) -> None:
  from moe_jax import distributed, train  # here, so that `moe-jax --help` does not import JAX

  distributed.initialize_from_env()  # multi-host: before any mesh is built; else a no-op

  summary = train.train(fv.config, fv.workdir)
  print(json.dumps(summary, indent=2))


def _sweep_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  _config_and_workdir_flags(fv, argv)
  flags.DEFINE_list('only', None, 'train only these members (comma-separated names).',
                    flag_values=fv)


def _sweep(fv: flags.FlagValues) -> None:
  from moe_jax import distributed, sweep

  distributed.initialize_from_env()

  print(sweep.run_sweep(fv.config, fv.workdir, only=fv.only))


def _workdir_flag(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  del argv
  flags.DEFINE_string('workdir', None, 'a run directory, or a sweep directory of runs.',
                      flag_values=fv)
  flags.mark_flags_as_required(['workdir'], flag_values=fv)


def _report(fv: flags.FlagValues) -> None:
  from moe_jax import report

  print(report.write_report(fv.workdir))
  print(f'\nwritten: {fv.workdir}/results.md, results.csv and PNG plots')


COMMANDS: dict[str, Command] = {
    'train': Command('train (or resume) a transformer LM run', _config_and_workdir_flags,
                     _train),
    'sweep': Command('train every member of an equal-FLOPs sweep, then report', _sweep_flags,
                     _sweep),
    'report': Command('results.md/.csv and plots from run directories', _workdir_flag, _report),
}


def _usage() -> str:
  lines = [f'usage: {PROG} <command> [flags]   ({PROG} <command> --help for its flags)', '',
           'commands:']
  lines += [f'  {name:10s}{command.help}' for name, command in COMMANDS.items()]
  return '\n'.join(lines)


def _set_none(config, path: str) -> None:
  *parents, field = path.split('.')
  node = config
  for name in parents:
    node = node[name]
  if field not in node:
    raise KeyError(f'--config.{path}=None: config has no field {path!r}.')
  node[field] = None


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `moe-jax <command> [flags]`; returns the exit status."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
    print(_usage())
    return 0 if len(argv) >= 2 else 2
  name, args = argv[1], argv[2:]
  if name not in COMMANDS:
    print(f'{PROG}: unknown command {name!r}.\n\n{_usage()}', file=sys.stderr)
    return 2
  nones = [m.group(1) for m in map(_NONE_OVERRIDE.match, args) if m]
  args = [f'{PROG} {name}'] + [a for a in args if not _NONE_OVERRIDE.match(a)]
  fv = flags.FlagValues()
  COMMANDS[name].define_flags(fv, args)
  if '-h' in args or '--help' in args:
    print(f'usage: {PROG} {name} [flags]\n\n{fv.get_help()}')
    return 0
  try:
    rest = fv(args)
    if len(rest) > 1:
      raise flags.Error(f'unexpected arguments {rest[1:]}')
    for path in nones:
      _set_none(fv.config, path)
  except (flags.Error, KeyError, AttributeError) as e:  # the latter two: unknown config fields
    message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    if isinstance(e, AttributeError):  # ConfigDict's message is a repr: unquote it
      message = 'unknown config field ' + message.strip('\'').replace('\\n', ' ').replace(
          "\\'", "'")
    print(f'{PROG} {name}: {message}\n\nSee `{PROG} {name} --help`.', file=sys.stderr)
    return 2
  logger = logging.getLogger('moe_jax')
  if not logger.handlers:
    logger.addHandler(logging.StreamHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler (absl's) would print each line twice
  COMMANDS[name].run(fv)
  return 0


if __name__ == '__main__':
  sys.exit(main())
