"""Evaluation: task files, scorers and the jitted batch harness."""
