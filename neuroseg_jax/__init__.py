"""neuroseg_jax: functional JAX/Flax segmentation of neurons and cells in microscopy images."""

__version__ = "0.1.0"
