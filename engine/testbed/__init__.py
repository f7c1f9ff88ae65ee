"""Synthetic data, training of the embedded model, tiny pipelines; never on the inference path."""
