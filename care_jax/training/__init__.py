"""Optimiser, schedules, training state and the pure train step (no data, no I/O)."""
