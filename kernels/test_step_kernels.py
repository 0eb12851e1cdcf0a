"""The decoder step's fused ops (RMS norm with the residual add, rotary + KV write, SiLU gate): each torch reference
against Hugging Face's own modules, each Triton kernel against its reference (hidden sizes that are not powers of two,
GQA, q = 1 and q > 1, slots out of order, bf16)."""
import pytest, torch
import torch.nn.functional as F
from specdec_kernels import rms_norm_torch, rotary_kv_torch, silu_mul_torch

from specdec.kernels import TOLERANCE                             # the registry's own agreement rule

def close(a, b, dtype): return a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a.float(), b.float(), **TOLERANCE[dtype])

def test_rms_norm_reference_is_llama_rms_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad(): norm.weight.copy_(torch.randn(96, generator=g))
    x, residual = torch.randn(2, 3, 96, generator=g), torch.randn(2, 3, 96, generator=g)
    out, summed = rms_norm_torch(x, norm.weight, 1e-5, residual)
    assert torch.equal(summed, x + residual) and torch.equal(out, norm(x + residual))
    out, summed = rms_norm_torch(x, norm.weight, 1e-5)
    assert summed is x and torch.equal(out, norm(x))

@pytest.mark.parametrize("H,dtype,with_residual", [(96, torch.float32, False), (576, torch.float32, True),
                                                    (100, torch.bfloat16, True), (576, torch.bfloat16, False)])
def test_rms_norm_triton_matches_reference(triton_impl, device, H, dtype, with_residual):
    g = torch.Generator().manual_seed(H)
    x = (3 * torch.randn(2, 5, H, generator=g)).to(dtype).to(device)
    residual = torch.randn(2, 5, H, generator=g).to(dtype).to(device) if with_residual else None
    weight = torch.randn(H, generator=g).to(dtype).to(device)
    expected, expected_sum = rms_norm_torch(x, weight, 1e-6, residual)
    out, summed = triton_impl("rms_norm")(x, weight, 1e-6, residual)
    assert close(out, expected, dtype)
    if dtype == torch.float32: assert torch.equal(summed, expected_sum)   # the residual stream is one add: exact
    else: assert close(summed, expected_sum, dtype)               # triton's interpreter truncates to bf16, a GPU rounds

def test_rms_norm_triton_is_not_a_plain_copy(triton_impl, device):
    "Control: a wrong epsilon or a missing residual shows in the comparison above's tolerance."
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(4, 64, generator=g).to(device) * 1e-2, torch.ones(64, device=device)
    expected, _ = rms_norm_torch(x, weight, 1e-2)
    out, _ = triton_impl("rms_norm")(x, weight, 1e-6)
    assert not close(out, expected, torch.float32)

def hf_rotary(query, key, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    return apply_rotary_pos_emb(query, key, cos[None], sin[None])

def make_rotary(B, q, Hq, Hkv, D, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, q, (Hq + 2 * Hkv) * D, generator=g).to(dtype)
    angles = torch.rand(q, D // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    cache = torch.randn(2, 2, B, Hkv, C, D, generator=g).to(dtype)   # [K/V, layers, B, Hkv, C, D]; layer 1 is written
    slots = torch.randperm(C, generator=g)[:q]
    return qkv, cos, sin, cache, slots

@pytest.mark.parametrize("q", [1, 4])
def test_rotary_kv_reference_is_hf_rotary_and_a_cache_write(q):
    B, Hq, Hkv, D, C = 2, 6, 2, 8, 9
    qkv, cos, sin, cache, slots = make_rotary(B, q, Hq, Hkv, D, C, torch.float32, q)
    expected = cache.clone()
    query = rotary_kv_torch(qkv, cos, sin, cache[0, 1], cache[1, 1], slots, Hq, Hkv)
    heads = qkv.view(B, q, Hq + 2 * Hkv, D).transpose(1, 2)       # [B, heads, q, D]
    hf_query, hf_key = hf_rotary(heads[:, :Hq], heads[:, Hq:Hq + Hkv], cos, sin)
    assert torch.equal(query, hf_query)
    expected[0, 1][:, :, slots] = hf_key
    expected[1, 1][:, :, slots] = heads[:, Hq + Hkv:]
    assert torch.equal(cache, expected)                           # layer 0 and other slots untouched

@pytest.mark.parametrize("q,Hq,Hkv,D,dtype", [(1, 9, 3, 64, torch.float32), (5, 9, 3, 64, torch.float32),
                                              (3, 4, 4, 12, torch.float32), (5, 9, 3, 64, torch.bfloat16)])
def test_rotary_kv_triton_matches_reference(triton_impl, device, q, Hq, Hkv, D, dtype):
    qkv, cos, sin, cache, slots = make_rotary(2, q, Hq, Hkv, D, 11, dtype, seed=q + D)
    qkv, cos, sin, cache, slots = (t.to(device) for t in (qkv, cos, sin, cache, slots))
    expected = cache.clone()
    expected_query = rotary_kv_torch(qkv, cos, sin, expected[0, 1], expected[1, 1], slots, Hq, Hkv)
    query = triton_impl("rotary_kv")(qkv, cos, sin, cache[0, 1], cache[1, 1], slots, Hq, Hkv)
    assert close(query, expected_query, dtype) and close(cache, expected, dtype)
    assert torch.equal(cache[1], expected[1])                     # values are copied exactly
    assert torch.equal(cache[:, 0], expected[:, 0])               # the other layer is untouched

def test_rotary_kv_with_each_rows_own_slots_is_each_row_alone():
    "Rows at different lengths: each row's slots `[B, q]` and rotary rows `[B, q, D]` give what that row alone would get."
    B, q, Hq, Hkv, D, C = 3, 4, 6, 2, 8, 12
    qkv, _, _, cache, _ = make_rotary(B, q, Hq, Hkv, D, C, torch.float32, 5)
    g = torch.Generator().manual_seed(6)
    angles = torch.rand(B, q, D // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)   # [B, q, D]
    slots = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8], [8, 9, 10, 11]])                # [B, q]
    batched = cache.clone()
    query = rotary_kv_torch(qkv, cos, sin, batched[0, 1], batched[1, 1], slots, Hq, Hkv)
    for b in range(B):
        alone = cache[:, :, b:b + 1].clone()
        row_query = rotary_kv_torch(qkv[b:b + 1], cos[b], sin[b], alone[0, 1], alone[1, 1], slots[b], Hq, Hkv)
        assert torch.equal(query[b:b + 1], row_query) and torch.equal(batched[:, :, b:b + 1], alone)
    with pytest.raises(ValueError, match=r"cos must have shape \(3, 4, 8\)"):
        rotary_kv_torch(qkv, cos[:, :3], sin, cache[0, 1], cache[1, 1], slots, Hq, Hkv)

def test_rotary_kv_triton_with_each_rows_own_slots_matches_reference(triton_impl, device):
    B, q, Hq, Hkv, D, C = 3, 5, 9, 3, 64, 16
    qkv, _, _, cache, _ = make_rotary(B, q, Hq, Hkv, D, C, torch.float32, 7)
    angles = torch.rand(B, q, D // 2, generator=torch.Generator().manual_seed(8)) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    slots = torch.stack([torch.arange(q) + start for start in (0, 7, 11)])                # [B, q]
    qkv, cos, sin, cache, slots = (t.to(device) for t in (qkv, cos, sin, cache, slots))
    expected = cache.clone()
    expected_query = rotary_kv_torch(qkv, cos, sin, expected[0, 1], expected[1, 1], slots, Hq, Hkv)
    query = triton_impl("rotary_kv")(qkv, cos, sin, cache[0, 1], cache[1, 1], slots, Hq, Hkv)
    assert close(query, expected_query, torch.float32) and close(cache, expected, torch.float32)

def test_rotary_kv_writes_a_wider_float32_cache_for_bf16():
    "A half-precision net on the CPU keeps a float32 cache: the rotated bf16 keys and values are written there exactly."
    qkv, cos, sin, cache, slots = make_rotary(2, 4, 6, 2, 8, 9, torch.bfloat16, 1)
    same = cache.clone()
    wide = cache.float()
    query = rotary_kv_torch(qkv, cos, sin, same[0, 1], same[1, 1], slots, 6, 2)
    wide_query = rotary_kv_torch(qkv, cos, sin, wide[0, 1], wide[1, 1], slots, 6, 2)
    assert wide_query.dtype == torch.bfloat16 and torch.equal(wide_query, query)
    assert torch.equal(wide, same.float())                        # bf16 values are exact in float32
    with pytest.raises(TypeError, match=r"keys has dtype torch.float16 but qkv has torch.bfloat16 \(a cache is qkv's dtype or float32\)"):
        rotary_kv_torch(qkv, cos, sin, cache[0, 1].half(), cache[1, 1], slots, 6, 2)

def test_rotary_kv_triton_writes_a_wider_cache_as_the_reference(triton_impl, device):
    qkv, cos, sin, cache, slots = make_rotary(2, 5, 9, 3, 64, 11, torch.bfloat16, seed=3)
    qkv, cos, sin, slots = (t.to(device) for t in (qkv, cos, sin, slots))
    cache = cache.float().to(device)
    expected = cache.clone()
    expected_query = rotary_kv_torch(qkv, cos, sin, expected[0, 1], expected[1, 1], slots, 9, 3)
    query = triton_impl("rotary_kv")(qkv, cos, sin, cache[0, 1], cache[1, 1], slots, 9, 3)
    assert close(query, expected_query, torch.bfloat16) and close(cache, expected, torch.bfloat16)
    assert torch.equal(cache[1], expected[1])                     # values are copied exactly

def test_rotary_kv_errors_name_the_problem():
    qkv, cos, sin, cache, slots = make_rotary(2, 3, 6, 2, 8, 9, torch.float32, 0)
    with pytest.raises(ValueError, match=r"qkv's last dim must be \(num_heads \+ 2 \* num_kv_heads\) \* head_dim"):
        rotary_kv_torch(qkv, cos, sin, cache[0, 1], cache[1, 1], slots, 5, 2)
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 9\)"):
        rotary_kv_torch(qkv, cos, sin, cache[0, 1], cache[1, 1], torch.tensor([0, 3, 9]), 6, 2)
    with pytest.raises(ValueError, match=r"cos must have shape \(3, 8\)"):
        rotary_kv_torch(qkv, cos[:2], sin, cache[0, 1], cache[1, 1], slots, 6, 2)

def test_silu_mul_reference_is_the_llama_mlp_gate():
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    assert torch.equal(silu_mul_torch(torch.cat([gate, up], -1)), F.silu(gate) * up)
    with pytest.raises(ValueError, match="gate_up's last dim must be even"): silu_mul_torch(torch.randn(2, 7))

@pytest.mark.parametrize("I,dtype", [(10, torch.float32), (1536, torch.float32), (1500, torch.bfloat16)])
def test_silu_mul_triton_matches_reference(triton_impl, device, I, dtype):
    gate_up = (2 * torch.randn(2, 3, 2 * I, generator=torch.Generator().manual_seed(I))).to(dtype).to(device)
    assert close(triton_impl("silu_mul")(gate_up), silu_mul_torch(gate_up), dtype)
