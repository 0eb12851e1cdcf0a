"""Compile every Triton kernel for a CUDA target at each signature `specdec.kernels` can pick, with no GPU needed.

Triton's CPU interpreter (`TRITON_INTERPRET=1`, how the tests run the kernels on a CPU) does not type a kernel, so a
kernel that the GPU's compiler rejects can pass every CPU test. This check calls each `*_triton` wrapper on CPU tensors
of each dtype its callers use (float32, float16, bfloat16; a float32 cache beside a half-precision net), at a one-token
step and at a verification block (the JIT makes an int argument equal to 1 a constant, so both are compiled), records
the launches instead of running them, and compiles each launch's signature with `triton.compile` for the target down to
a cubin (with the ptxas that triton bundles): what the JIT would compile on the GPU. Triton 3.x (run with 3.6 and 3.9).

    python kernels/compile_check.py [--arch 90|auto]     # from the repository root; one line per signature

It exits 1 when a signature does not compile (the compiler's message follows its line), 2 when triton runs in its
interpreter here (`TRITON_INTERPRET` set before triton was imported)."""
from __future__ import annotations
import argparse, contextlib, sys
import torch

FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# a one-token step (K = 1 draft to verify, batch 1, one KV head: the sizes the JIT turns into constants) and a
# verification block of 4 drafts on SmolLM2-135M's shapes
SHAPES = {"step": dict(K=1, q=1, Hq=4, Hkv=1, D=64, V=49152, C=64, H=576, I=1536),
          "block": dict(K=4, q=5, Hq=9, Hkv=3, D=64, V=49152, C=64, H=576, I=1536)}

def calls() -> list[tuple[str, str, tuple]]:
    "`(label, kernel, args)`: a call of each kernel's Triton wrapper per dtype and shape its callers use (CPU tensors)."
    out = []
    for shape, s in SHAPES.items():
        K, q, Hq, Hkv, D, V, C = s["K"], s["q"], s["Hq"], s["Hkv"], s["D"], s["V"], s["C"]
        tokens = torch.zeros(1, K, dtype=torch.long)                                       # [1, K] drafts
        fp32 = torch.float32
        out.append((f"{shape}", "ngram_match", (torch.zeros(1, 256, dtype=torch.long), torch.tensor([200]), 3, 1, K)))
        for name, dt in FLOATS.items():
            at = f"{shape} {name}"
            out.append((at, "greedy_verify", (tokens, torch.zeros(1, K + 1, V, dtype=dt))))
            for draft_probs in (None, torch.zeros(1, K, V, dtype=dt)):         # one-hot drafts, or probabilities
                label = f"{at} draft probs {'none' if draft_probs is None else name}"
                out.append((label, "rejection_verify", (tokens, draft_probs, torch.zeros(1, K + 1, V, dtype=dt),
                                                        torch.zeros(1, K, dtype=fp32), torch.zeros(1, V, dtype=fp32))))
            out.append((at, "kv_write", (torch.zeros(1, Hkv, C, D, dtype=dt), torch.zeros(1, Hkv, q, D, dtype=dt),
                                         torch.tensor([3]))))
            x = torch.zeros(1, q, s["H"], dtype=dt)                                           # [1, q, H]
            for residual in (None, torch.zeros_like(x)):
                label = f"{at} {'no residual' if residual is None else 'residual'}"
                out.append((label, "rms_norm", (x, torch.ones(s["H"], dtype=dt), 1e-5, residual)))
            for cache in dict.fromkeys((dt, fp32)):                                          # the net's dtype, or wider
                qkv = torch.zeros(1, q, (Hq + 2 * Hkv) * D, dtype=dt)                          # [1, q, (Hq+2Hkv)*D]
                keys, values = (torch.zeros(1, Hkv, C, D, dtype=cache) for _ in range(2))
                out.append((f"{at} cache {'fp32' if cache == fp32 else name}", "rotary_kv",
                            (qkv, torch.zeros(q, D), torch.zeros(q, D), keys, values, torch.arange(q), Hq, Hkv)))
                rows = (qkv.expand(2, -1, -1).contiguous(), torch.zeros(2, q, D), torch.zeros(2, q, D),   # a batch whose
                        keys.expand(2, -1, -1, -1).contiguous(), values.expand(2, -1, -1, -1).contiguous(),  # rows sit at
                        torch.arange(2 * q).view(2, q), Hq, Hkv)                                           # their own slots
                out.append((f"{at} cache {'fp32' if cache == fp32 else name} rows", "rotary_kv", rows))
            out.append((at, "silu_mul", (torch.zeros(1, q, 2 * s["I"], dtype=dt),)))
    return out

@contextlib.contextmanager
def recorded_launches():
    "Within: a `@triton.jit` kernel's launch is appended to the yielded list as `(fn, args, kwargs)` and not run."
    from triton.runtime.jit import JITFunction
    launches, run = [], JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    try: yield launches
    finally: JITFunction.run = run

def signature_of(fn, args:tuple, kwargs:dict) -> tuple[dict, dict, dict]:
    "`(signature, constexprs, options)` of a launch of `fn`, specialized as the JIT does (None, an int 1: constants)."
    from triton.runtime.jit import mangle_type
    bound = {**dict(zip(fn.arg_names, args)), **{k: v for k, v in kwargs.items() if k in fn.arg_names}}
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}                 # num_warps and the like
    signature, constexprs = {}, {}
    for p in fn.params:
        value = bound[p.name] if p.name in bound else p.default
        ty = "constexpr" if p.is_constexpr else mangle_type(value, not p.do_not_specialize)
        signature[p.name] = ty
        if ty == "constexpr": constexprs[p.name] = value
    return signature, constexprs, options

def cuda_target(arch:int):
    "Triton's target for a CUDA GPU of compute capability `arch` (90: H100, H200)."
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)

def compile_launch(fn, args:tuple, kwargs:dict, target) -> str|None:
    "Compile the launch `fn[grid](*args, **kwargs)` for `target` without running it: None, or the compiler's message."
    import triton
    from triton.compiler import ASTSource
    signature, constexprs, options = signature_of(fn, args, kwargs)
    try: triton.compile(ASTSource(fn, signature, constexprs), target=target, options=options)
    except Exception as e: return f"{type(e).__name__}: {e}"
    return None

def describe(fn, args:tuple, kwargs:dict) -> str:
    "The launch's kernel and its non-constant argument types, e.g. `rotary_kv_kernel(qkv_ptr=*bf16, ...)`."
    signature, constexprs, _ = signature_of(fn, args, kwargs)
    types = [f"{n}={t}" for n, t in signature.items() if t != "constexpr"]
    return f"{fn.__name__}({', '.join(types)}; {', '.join(f'{n}={v}' for n, v in constexprs.items())})"

def check(arch:int, out=sys.stdout) -> int:
    "Compile every launch of `calls()` for CUDA `arch`; print one line per distinct signature; the number that failed."
    import triton
    from specdec_kernels.triton_support import triton_module
    target, seen, failed = cuda_target(arch), set(), 0
    for label, name, args in calls():
        with recorded_launches() as launches: getattr(triton_module(name), f"{name}_triton")(*args)
        if not launches: raise RuntimeError(f"{name}_triton launched no kernel for {label}: give it work to launch")
        for fn, a, kw in launches:
            what = describe(fn, a, kw)
            if what in seen: continue
            seen.add(what)
            error = compile_launch(fn, a, kw, target)
            failed += error is not None
            print(f"{'ok  ' if error is None else 'FAIL'} {name} [{label}] {what}", file=out)
            if error: print("     " + error.replace("\n", "\n     "), file=out)
    print(f"{len(seen) - failed} of {len(seen)} signatures compiled for cuda:{arch} (triton {triton.__version__})",
          file=out)
    return failed

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="compute capability (90: H100), or auto: this machine's GPU")
    args = parser.parse_args(argv)
    if args.arch == "auto":
        if not torch.cuda.is_available(): parser.error("--arch auto needs a CUDA GPU here; name one, e.g. 90")
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    else: arch = int(args.arch)
    from specdec_kernels.triton_support import triton_import_error, interpreted
    if (why := triton_import_error()) is not None: print(f"compile check: {why}", file=sys.stderr); return 2
    if interpreted():
        print("compile check: triton runs in its interpreter here (TRITON_INTERPRET is set): it compiles nothing; "
              "run this without TRITON_INTERPRET", file=sys.stderr)
        return 2
    return 1 if check(arch) else 0

if __name__ == "__main__": sys.exit(main())
