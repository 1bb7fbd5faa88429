"""One training run of tests/test_determinism_gpu.py, in a process of its own (not collected).

Usage: python tests/determinism_worker.py WORKDIR DATA_DIR STEPS on|off. Trains the gshard_top2
member of claim (b) at gpu scale (English mix), cut to STEPS steps, with config.deterministic on or
off, through `moe_jax.run.train.train`, which sets XLA's flags before JAX starts.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import expert_choice_vs_top2  # noqa: E402
from moe_jax import reproducibility  # noqa: E402
from moe_jax.run import sweep, train  # noqa: E402


def member_config(data_dir: str, steps: int, deterministic: bool):
  """Claim (b)'s gshard_top2 member at gpu scale, STEPS steps, evaluated at the end only."""
  config = sweep.build_members(expert_choice_vs_top2.get_config('gpu'))['gshard_top2']
  config.data.data_dir = data_dir
  config.deterministic = deterministic
  config.train.update(steps=steps, warmup_steps=min(100, steps // 2), eval_every=0, log_every=10)
  return config


if __name__ == '__main__':
  workdir, data_dir, steps, mode = sys.argv[1:5]
  reproducibility.configure(mode == 'on')  # before building the member starts JAX's backends
  summary = train.train(member_config(data_dir, int(steps), mode == 'on'), workdir)
  print('summary', mode, summary['eval_loss'], summary['tokens_per_s'], flush=True)
