"""Evaluation: analytic data models with exact denoisers, for measuring samplers against the truth."""
