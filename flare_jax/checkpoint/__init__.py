"""Checkpoints: Hugging Face Qwen3.5 import / export and model save / load (orbax)."""
