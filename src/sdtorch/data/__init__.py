"""Synthetic data: the captioned shapes world the default model is trained and judged on (`shapes`)."""
