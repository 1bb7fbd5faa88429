"""Training and experiments: the trainer, tasks, run directories, sweeps, reports, memory plans."""
