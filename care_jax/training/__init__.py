"""Optimiser, schedules, training state, the pure train step and the online probe it
trains alongside (no data, no I/O)."""
