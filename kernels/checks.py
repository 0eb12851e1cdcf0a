"""Input checks shared by each kernel's torch reference and its Triton version (shapes, dtypes, devices; no host sync)."""
from __future__ import annotations
import torch

def check_tensor(name:str, x, ndim:int, dtypes:tuple|None=None) -> None:
    "Raise a `TypeError`/`ValueError` naming `name` unless `x` is a tensor with `ndim` dims (and one of `dtypes`)."
    if not isinstance(x, torch.Tensor): raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim: raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {x.dtype}")

def check_shape(name:str, x:torch.Tensor, shape:tuple) -> None:
    "Raise unless `x.shape == shape`."
    if tuple(x.shape) != tuple(shape): raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")

def check_same_device(**tensors) -> torch.device:
    "Raise unless every (non-None) tensor is on one device; return it."
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors on different devices: " + ", ".join(f"{n} on {d}" for n, d in devices.items()))
    return next(iter(devices.values()))

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TOKEN_IDS = (torch.long,)

def check_verify(draft_tokens, target, target_name:str) -> tuple[int, int, int]:
    "Check `draft_tokens [B, K]` long against `target [B, K+1, V]`; return `(B, K, V)`."
    check_tensor("draft_tokens", draft_tokens, 2, TOKEN_IDS)
    check_tensor(target_name, target, 3, FLOATS)
    B, K = draft_tokens.shape
    if target.shape[0] != B or target.shape[1] != K + 1:
        raise ValueError(f"{target_name} must have shape [B, K+1, V] = [{B}, {K + 1}, V] for draft_tokens {tuple(draft_tokens.shape)}, "
                         f"got {tuple(target.shape)}")
    V = target.shape[2]
    if V == 0: raise ValueError(f"{target_name} has an empty vocabulary (V = 0)")
    return B, K, V

def check_rejection(draft_tokens, draft_probs, target_probs, uniforms, exp_noise) -> tuple[int, int, int]:
    "Check the inputs of `rejection_verify`; return `(B, K, V)`."
    B, K, V = check_verify(draft_tokens, target_probs, "target_probs")
    if draft_probs is not None:
        check_tensor("draft_probs", draft_probs, 3, FLOATS)
        check_shape("draft_probs", draft_probs, (B, K, V))
    check_tensor("uniforms", uniforms, 2, FLOATS)
    check_shape("uniforms", uniforms, (B, K))
    check_tensor("exp_noise", exp_noise, 2, FLOATS)
    check_shape("exp_noise", exp_noise, (B, V))
    check_same_device(draft_tokens=draft_tokens, draft_probs=draft_probs, target_probs=target_probs, uniforms=uniforms,
                      exp_noise=exp_noise)
    return B, K, V

def check_ngram(tokens, lengths, max_ngram, min_ngram, k) -> tuple[int, int]:
    "Check the inputs of `ngram_match`; return `(B, S_cap)`."
    check_tensor("tokens", tokens, 2, TOKEN_IDS)
    check_tensor("lengths", lengths, 1, TOKEN_IDS)
    B, S_cap = tokens.shape
    check_shape("lengths", lengths, (B,))
    for name, v in (("max_ngram", max_ngram), ("min_ngram", min_ngram), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool): raise TypeError(f"{name} must be an int, got {v!r}")
    if not 1 <= min_ngram <= max_ngram: raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
    if k < 0: raise ValueError(f"k must be >= 0, got {k}")
    check_same_device(tokens=tokens, lengths=lengths)
    if lengths.device.type == "cpu" and lengths.numel() and not bool(((lengths >= 0) & (lengths <= S_cap)).all()):
        raise ValueError(f"lengths must lie in [0, {S_cap}] (the tokens' capacity), got {lengths.tolist()}")
    return B, S_cap

def check_kv_write(cache, new, positions) -> tuple[int, int, int, int, int]:
    "Check the inputs of `kv_write`; return `(B, H, C, D, q)`."
    check_tensor("cache", cache, 4, FLOATS)
    check_tensor("new", new, 4, FLOATS)
    check_tensor("positions", positions, 1, TOKEN_IDS)
    B, H, C, D = cache.shape
    q = new.shape[2]
    check_shape("new", new, (B, H, q, D))
    check_shape("positions", positions, (B,))
    if new.dtype != cache.dtype: raise TypeError(f"new has dtype {new.dtype} but cache has {cache.dtype}: cast it first")
    check_same_device(cache=cache, new=new, positions=positions)
    if positions.device.type == "cpu" and B and not bool(((positions >= 0) & (positions + q <= C)).all()):
        # on the CPU the check is free; on a GPU it would cost a host sync, so there it is the caller's contract
        raise ValueError(f"positions + q must fit the cache: need 0 <= position and position + {q} <= {C}, got {positions.tolist()}")
    return B, H, C, D, q

def check_rms_norm(x, weight, residual) -> tuple[int, int]:
    "Check the inputs of `rms_norm`: `x [..., H]`, `weight [H]`, `residual` like `x` or None; return `(rows, H)`."
    if not isinstance(x, torch.Tensor) or x.dim() < 1: raise TypeError("x must be a torch.Tensor with a last (hidden) dim")
    if x.dtype not in FLOATS: raise TypeError(f"x must be floating point, got {x.dtype}")
    H = x.shape[-1]
    check_tensor("weight", weight, 1, FLOATS)
    check_shape("weight", weight, (H,))
    if residual is not None:
        check_tensor("residual", residual, x.dim(), FLOATS)
        check_shape("residual", residual, tuple(x.shape))
        if residual.dtype != x.dtype: raise TypeError(f"residual has dtype {residual.dtype} but x has {x.dtype}")
    check_same_device(x=x, weight=weight, residual=residual)
    return x.numel() // max(H, 1), H

def check_rotary_kv(qkv, cos, sin, keys, values, slots, num_heads, num_kv_heads) -> tuple[int, int, int, int]:
    "Check the inputs of `rotary_kv` (slots `[q]` shared by the rows, or `[B, q]` each row's); return `(B, q, D, C)`."
    check_tensor("qkv", qkv, 3, FLOATS)
    check_tensor("keys", keys, 4, FLOATS)
    check_tensor("values", values, 4, FLOATS)
    B, q, width = qkv.shape
    _, Hkv, C, D = keys.shape
    if num_kv_heads != Hkv: raise ValueError(f"keys have {Hkv} heads but num_kv_heads is {num_kv_heads}")
    if D % 2: raise ValueError(f"head_dim must be even for rotary embeddings, got {D}")
    if width != (num_heads + 2 * num_kv_heads) * D:
        raise ValueError(f"qkv's last dim must be (num_heads + 2 * num_kv_heads) * head_dim = "
                         f"({num_heads} + 2 * {num_kv_heads}) * {D} = {(num_heads + 2 * num_kv_heads) * D}, got {width}")
    check_shape("keys", keys, (B, Hkv, C, D))
    check_shape("values", values, (B, Hkv, C, D))
    rows = isinstance(slots, torch.Tensor) and slots.dim() == 2              # each row's own slots (and positions)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, 3 if rows else 2, FLOATS)
        check_shape(name, t, (B, q, D) if rows else (q, D))
    check_tensor("slots", slots, 2 if rows else 1, TOKEN_IDS)
    check_shape("slots", slots, (B, q) if rows else (q,))
    for name, t in (("keys", keys), ("values", values)):              # a half-precision net on the CPU: a float32 cache
        if t.dtype != qkv.dtype and t.dtype != torch.float32:
            raise TypeError(f"{name} has dtype {t.dtype} but qkv has {qkv.dtype} (a cache is qkv's dtype or float32)")
    check_same_device(qkv=qkv, cos=cos, sin=sin, keys=keys, values=values, slots=slots)
    if slots.device.type == "cpu" and q and not bool(((slots >= 0) & (slots < C)).all()):
        raise ValueError(f"slots must lie in [0, {C}) (the cache's capacity), got {slots.tolist()}")
    return B, q, D, C

def check_silu_mul(gate_up) -> int:
    "Check `gate_up [..., 2I]` (gate then up); return I."
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() < 1: raise TypeError("gate_up must be a torch.Tensor")
    if gate_up.dtype not in FLOATS: raise TypeError(f"gate_up must be floating point, got {gate_up.dtype}")
    if gate_up.shape[-1] % 2: raise ValueError(f"gate_up's last dim must be even (gate then up), got {gate_up.shape[-1]}")
    return gate_up.shape[-1] // 2
