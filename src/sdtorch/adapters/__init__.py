"""Adapters a loaded model takes on and can drop again: textual-inversion embeddings, LoRA."""
