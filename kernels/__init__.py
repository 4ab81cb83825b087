"""Triton kernels of fastsae, installed as fastsae.kernels (one file per kernel family)."""
