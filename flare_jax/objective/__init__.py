"""The FLARE two-stream objective: layout, noise, losses. See README.md in this folder."""
