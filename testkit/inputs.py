"""Small, fast request inputs (prompt not included): a test or benchmark adds its prompt and extends
them as ``{**SMALL, "iterations": 2}``."""

from __future__ import annotations

# A visualisation of one 256 px step with few scales and cutouts, after 8 prior steps.
SMALL = dict(iterations=1, display_freq=1, num_scales=4, num_cutouts=4, prior_steps=8, size=256)
# The embeddings only, after 8 prior steps: well under a second.
EMBED = dict(mode="embed", prior_steps=8)
