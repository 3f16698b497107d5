"""Helpers shared by the kernel packages."""
