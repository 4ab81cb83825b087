"""The helpers the kernels share (kernels/preact_tile.py)."""

import torch

from fastsae.kernels import preact_tile


def test_dot_precision_follows_interpreter_and_tf32_flag():
    # Under the interpreter there is no tf32: plain fp32 dots, so tests see exact fp32 math.
    if preact_tile.interpreted():
        assert preact_tile.dot_precision(torch.float32) == "ieee"
    assert preact_tile.dot_precision(torch.bfloat16) in ("tf32", "ieee")


def test_upcast_only_for_bf16_under_interpreter():
    assert not preact_tile.upcast(torch.float32)
    assert not preact_tile.upcast(torch.float16)
    assert preact_tile.upcast(torch.bfloat16) == preact_tile.interpreted()
