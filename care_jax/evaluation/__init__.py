"""Evaluation of pretrained encoders (linear probe)."""
