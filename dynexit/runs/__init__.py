"""Experiments: specs, run folders, the per-run pipeline, the runner, SLURM jobs and aggregation."""
