"""Evaluation of encoders: the kNN monitor during pretraining, linear evaluation and
fine-tuning after it, and what they share (features of a split, checkpointed runs)."""
