"""Forward-mode AD of BatchNormFunction (its ``jvp``) and of torch_bn.functional.batch_norm."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.autograd import gradcheck

import torch_bn
from torch_bn.functional import batch_norm

from helpers import float64_inputs

SHAPES = [(6, 3), (4, 3, 5), (3, 2, 3, 4), (3, 2, 2, 3, 2)]  # 2D to 5D


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_forward_ad(shape, training, affine):
    x, w, b, rm, rv = float64_inputs(shape, affine)

    def f(x, w, b):
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    assert gradcheck(f, (x, w, b), check_forward_ad=True, check_batched_forward_grad=True,
                     check_backward_ad=False, check_undefined_grad=False)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_function_jvp_matches_torch_native(shape):
    """The tangent of y (and the primal) equal PyTorch's own forward AD of F.batch_norm, for
    tangents on x alone, on the parameters alone and on all three."""
    x, w, b, _, _ = float64_inputs(shape, True, seed=1)
    g = torch.Generator().manual_seed(2)
    tangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, b)]
    for mask in [(1, 0, 0), (0, 1, 1), (1, 1, 1), (0, 0, 1)]:
        with fwAD.dual_level():
            primals = [fwAD.make_dual(p.detach(), t) if on else p.detach()
                       for p, t, on in zip((x, w, b), tangents, mask)]
            ours = torch_bn.BatchNormFunction.apply(*primals, 1e-5, "closed_form")[0]
            ref = F.batch_norm(primals[0], None, None, primals[1], primals[2], True)
            ours_p, ours_t = fwAD.unpack_dual(ours)
            ref_p, ref_t = fwAD.unpack_dual(ref)
        torch.testing.assert_close(ours_p, ref_p)
        torch.testing.assert_close(ours_t, ref_t)


def test_torch_func_jacfwd_and_hessian_in_training():
    x, w, b, _, _ = float64_inputs((5, 3), True, seed=3)
    x, w, b = x.detach(), w.detach(), b.detach()

    def ours(x):
        return batch_norm(x, None, None, w, b, True).pow(2).sum()

    def ref(x):
        return F.batch_norm(x, None, None, w, b, True).pow(2).sum()

    torch.testing.assert_close(torch.func.jacfwd(ours)(x), torch.func.jacfwd(ref)(x))
    torch.testing.assert_close(torch.func.hessian(ours)(x), torch.func.hessian(ref)(x))
    y, t = torch.func.jvp(lambda x: batch_norm(x, None, None, w, b, True), (x,), (torch.ones_like(x),))
    # A tangent constant along the batch moves every mean by the same amount: y does not change.
    torch.testing.assert_close(t, torch.zeros_like(t), atol=1e-12, rtol=0)


def test_running_stats_get_no_tangent():
    x, w, b, rm, rv = float64_inputs((6, 3), True, seed=4)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x.detach(), torch.randn_like(x))
        batch_norm(xd, rm, rv, w.detach(), b.detach(), True)
        assert fwAD.unpack_dual(rm).tangent is None and fwAD.unpack_dual(rv).tangent is None
