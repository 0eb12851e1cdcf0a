"""RMS norm (with the residual add fused in) in Triton: one program per row; the sum, the variance and the scale in one pass."""
from __future__ import annotations
import torch, triton
import triton.language as tl
from .checks import check_rms_norm

@triton.jit
def rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, H, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    ty = x_ptr.dtype.element_ty
    h = tl.load(x_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        h = h + tl.load(res_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(sum_ptr + row * H + cols, h.to(ty), mask=ok)
        h = h.to(ty).to(tl.float32)                                   # rounded to x's dtype, as torch's add
    h = tl.where(ok, h, 0.0)
    var = tl.sum(h * h, axis=0) / H
    normed = (h * (1.0 / tl.sqrt(var + eps))).to(ty)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * H + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)

def rms_norm_triton(x:torch.Tensor, weight:torch.Tensor, eps:float,
                    residual:torch.Tensor|None=None) -> tuple[torch.Tensor, torch.Tensor]:
    "Triton version of `rms_norm_torch` (equal up to float rounding: the reductions run in another order)."
    rows, H = check_rms_norm(x, weight, residual)
    x = x.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if residual is None: summed, res = x, x
    else: summed, res = torch.empty_like(x), residual.contiguous()
    if rows * H == 0: return out, (summed if residual is None else x + residual)
    rms_norm_kernel[(rows,)](x, res, weight, out, summed, H, eps, HAS_RES=residual is not None,
                             BLOCK=triton.next_power_of_2(H))
    return out, summed
