"""Toy data with known features and toy runs: `ToyData` (fastsae.toy.data), `make_toy_sae`,
`train_toy`, `evaluate` (fastsae.toy.train: the Trainer on toy data), the sweep
(fastsae.toy.sweep, `fastsae toy-sweep`) and tiny language models for tests (tiny_lm)."""

from .data import ToyData, ToySource

__all__ = ["ToyData", "ToySource"]
