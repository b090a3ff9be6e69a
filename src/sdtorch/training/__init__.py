"""Training: the pieces sdtorch's own models are trained with (tokenizer, loops, checkpoints)."""
