"""`python -m moe_jax.train_vit --config FILE --workdir DIR [--config.<field>=<value> ...]`: the
same as `moe-jax train` (one trainer trains every task, `moe_jax.train`), kept for old commands.

  python -m moe_jax.train_vit --config configs/vit_digits.py --workdir runs/vit_digits
"""
from __future__ import annotations

import sys

from moe_jax import cli


def main(argv=None) -> int:
  argv = sys.argv if argv is None else argv
  return cli.main([cli.PROG, 'train', *argv[1:]])


if __name__ == '__main__':
  sys.exit(main())
