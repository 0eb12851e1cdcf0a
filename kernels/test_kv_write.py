"KV write at per-row positions: the torch reference against a loop, and the Triton kernel against the reference."
import pytest, torch
from specdec_kernels import kv_write_torch

def make_case(q, dtype, seed=0, L=2, B=3, H=2, C=11, D=5):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(L, B, H, C, D, generator=g).to(dtype)       # a layered cache; one layer is a strided view
    new = torch.randn(B, H, q, D, generator=g).to(dtype)
    positions = torch.tensor([0, C - q, 3])[:B]
    return cache, new, positions

@pytest.mark.parametrize("q", [1, 4])
def test_reference_writes_each_row_at_its_position(q):
    cache, new, positions = make_case(q, torch.float32)
    expected = cache.clone()
    for b, p in enumerate(positions.tolist()): expected[1, b, :, p:p + q] = new[b]
    assert kv_write_torch(cache[1], new, positions) is not None
    assert torch.equal(cache, expected)                             # written in place; layer 0 and other slots untouched

@pytest.mark.parametrize("q,dtype", [(1, torch.float32), (4, torch.float32), (3, torch.bfloat16)])
def test_triton_matches_reference(triton_impl, device, q, dtype):
    cache, new, positions = make_case(q, dtype, seed=q)
    cache, new, positions = cache.to(device), new.to(device), positions.to(device)
    expected = cache.clone()
    kv_write_torch(expected[1], new, positions)
    out = triton_impl("kv_write")(cache[1], new, positions)
    assert out.data_ptr() == cache[1].data_ptr() and torch.equal(cache, expected)

def test_bad_inputs_name_the_problem():
    cache, new, positions = make_case(4, torch.float32)
    with pytest.raises(ValueError, match=r"positions \+ q must fit the cache"):
        kv_write_torch(cache[0], new, torch.tensor([0, 8, 3]))
    with pytest.raises(TypeError, match="new has dtype torch.bfloat16 but cache has torch.float32"):
        kv_write_torch(cache[0], new.bfloat16(), positions)
    with pytest.raises(ValueError, match=r"new must have shape \(3, 2, 4, 5\)"):
        kv_write_torch(cache[0], new[:, :1].expand(3, 1, 4, 5), positions)
