"""Config checks: errors that name the field and its fix, and notes logged once.

A bad value raises `ValueError('config.<section>.<field>=<value> is invalid: <fix>.')`, before
anything is traced or compiled. A setting that runs differently than written (and harmlessly so) is
logged once (`log_once`) rather than remapped in silence.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Iterable, Mapping


@dataclasses.dataclass(frozen=True)
class Section:
  """Checks of one config section, `config.<name>`."""
  name: str

  def fail(self, field: str, value, fix: str):
    raise ValueError(f'config.{self.name}.{field}={value!r} is invalid: {fix}.')

  def one_of(self, field: str, value, allowed) -> None:
    if value not in allowed:
      self.fail(field, value, f'choose one of {allowed}')

  def positive(self, field: str, value) -> None:
    if not isinstance(value, int) or value < 1:
      self.fail(field, value, 'use a positive integer')

  def known(self, values: Mapping[str, Any], known: Iterable[str]) -> None:
    """Raises naming the fields of `values` that are not in `known`."""
    unknown = sorted(set(values) - set(known))
    if unknown:
      raise ValueError(f'config.{self.name} has unknown field(s) {unknown}; known fields: '
                       f'{sorted(known)}.')


def section_values(cls, section: str, config: Mapping[str, Any]) -> dict[str, Any]:
  """`config.<section>` as a dict for dataclass `cls`, rejecting fields `cls` does not have."""
  values = dict(config.items())
  Section(section).known(values, [f.name for f in dataclasses.fields(cls)])
  return values


@functools.cache
def log_once(logger: logging.Logger, level: int, message: str) -> None:
  """`logger.log(level, message)` the first time this process sees the message."""
  logger.log(level, message)
