"""The CUDA kernels of fastsae._C against the reference (needs a GPU and a CUDA build of _C)."""

import pytest
import torch

from fastsae.ops import reference

pytestmark = pytest.mark.gpu
cpp_ops = pytest.importorskip("fastsae.ops.cpp", reason="fastsae._C is not built")
if not (torch.cuda.is_available() and cpp_ops._C.cuda_built()):
    pytest.skip("needs a CUDA device and _C built with its CUDA sources", allow_module_level=True)

from helpers import KINDS, check_autograd_backward_ops, sparse_case  # noqa: E402

F = torch.ops.fastsae


def on_cuda(case):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_backward_matches_reference(kind, dtype):
    c = on_cuda(sparse_case(300, 37, 500, 8, kind, dtype=dtype))
    for row_sparse in (False, True):
        got = cpp_ops.topk_sae_backward(**c, row_sparse=row_sparse)
        ref = reference.topk_sae_backward(**c, row_sparse=row_sparse)
        for key in ("dvalues", "dx", "db_dec"):
            torch.testing.assert_close(got[key], ref[key])
        lean = cpp_ops.topk_sae_backward(**c, row_sparse=row_sparse, need_dx=False)
        assert lean["dx"] is None
        torch.testing.assert_close(lean["db_dec"], ref["db_dec"])
        if row_sparse:
            for name in ("latents", "W_enc", "b_enc", "W_dec"):
                torch.testing.assert_close(getattr(got["rows"], name), getattr(ref["rows"], name))
        else:
            for key in ("dW_enc", "db_enc", "dW_dec"):
                torch.testing.assert_close(got[key], ref[key])
    assert torch.equal(cpp_ops.topk_sae_backward(**c)["dW_enc"], cpp_ops.topk_sae_backward(**c)["dW_enc"])


def test_cuda_decode_and_its_backward_match_reference():
    c = on_cuda(sparse_case(64, 33, 100, 5, "few_latents"))
    out = F.sparse_decode(c["values"], c["indices"], c["W_dec"], c["b_dec"])
    torch.testing.assert_close(out, reference.sparse_decode(c["values"], c["indices"], c["W_dec"], c["b_dec"]))
    check_autograd_backward_ops(c)
