"""Run directories and their life: checkpoints, the lock, records and W&B, plots, reports, signals, exit statuses."""
