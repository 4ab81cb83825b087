"""Metrics of dictionary quality and reconstruction."""

from __future__ import annotations

import torch


def max_cosine_similarities(truth: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """For every row of `truth` [G, d], its largest cosine similarity with a row of `learned` [n, d]."""
    t = torch.nn.functional.normalize(truth.float(), dim=1)
    w = torch.nn.functional.normalize(learned.float(), dim=1)
    return (t @ w.t()).max(dim=1).values


def mmcs(truth: torch.Tensor, learned: torch.Tensor) -> float:
    """Mean max cosine similarity: how well `learned` atoms cover the `truth` features."""
    return float(max_cosine_similarities(truth, learned).mean())
