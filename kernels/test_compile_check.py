"""`compile_check.py` compiles every Triton kernel signature for a CUDA target (sm_90) on this machine, GPU or not:
triton compiles for a target without a GPU, with the ptxas it bundles. It runs in a fresh process, since the tests here
may have imported triton for its interpreter. The negative control is the rotary kernel before it stored each output
through its own pointer: its bf16 queries and float32 cache gave one variable two pointer types, which the interpreter
ran and the compiler rejects."""
import os, subprocess, sys, textwrap
from pathlib import Path
import pytest

HERE = Path(__file__).parent

def run_python(*args:str) -> subprocess.CompletedProcess:
    "Run python in a fresh process without TRITON_INTERPRET, from the repository root."
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=HERE.parent, env=env, capture_output=True, text=True,
                          timeout=600)

@pytest.fixture(scope="module", autouse=True)
def needs_triton():
    from specdec_kernels.triton_support import triton_import_error
    if (why := triton_import_error()) is not None: pytest.skip(f"compile check skipped: {why}")

def test_every_kernel_signature_compiles_for_sm90():
    done = run_python(str(HERE / "compile_check.py"), "--arch", "90")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    compiled, total = lines[-1].split(" signatures")[0].split(" of ")
    assert compiled == total and int(total) >= 30, lines[-1]
    kernels = {line.split("(")[0].split()[-1] for line in lines if line.startswith("ok ")}
    assert kernels == {"ngram_match_kernel", "row_argmax_kernel", "greedy_accept_kernel", "rejection_verify_kernel",
                       "kv_write_kernel", "rms_norm_kernel", "rotary_kv_kernel", "silu_mul_kernel"}
    wide = [l for l in lines if "rotary_kv_kernel(qkv_ptr=*bf16" in l and "k_ptr=*fp32, v_ptr=*fp32" in l]
    assert len(wide) == 2 and all(l.startswith("ok ") for l in wide)     # a bf16 net's float32 cache, q = 1 and q = 5

UNFIXED_ROTARY = '''
import triton
import triton.language as tl

@triton.jit
def rotary_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, k_ptr, v_ptr, slots_ptr, q_len, Hq, Hkv,
                     qs_b, qs_t, cs_t, os_b, os_h, os_t, ks_b, ks_h, ks_c, vs_b, vs_h, vs_c,
                     HALF: tl.constexpr, BLOCK: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    b = bt // q_len
    t = bt % q_len
    d = tl.arange(0, BLOCK)
    ok = d < HALF
    src = qkv_ptr + b * qs_b + t * qs_t + head * 2 * HALF
    x1 = tl.load(src + d, mask=ok, other=0.0)
    x2 = tl.load(src + HALF + d, mask=ok, other=0.0)
    slot = tl.load(slots_ptr + t)
    if head >= Hq + Hkv:
        dest = v_ptr + b * vs_b + (head - Hq - Hkv) * vs_h + slot * vs_c
        tl.store(dest + d, x1, mask=ok)
        tl.store(dest + HALF + d, x2, mask=ok)
    else:
        c1 = tl.load(cos_ptr + t * cs_t + d, mask=ok, other=0.0)
        c2 = tl.load(cos_ptr + t * cs_t + HALF + d, mask=ok, other=0.0)
        s1 = tl.load(sin_ptr + t * cs_t + d, mask=ok, other=0.0)
        s2 = tl.load(sin_ptr + t * cs_t + HALF + d, mask=ok, other=0.0)
        ty = x1.dtype
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        y1 = ((f1 * c1.to(tl.float32)).to(ty).to(tl.float32) + (-f2 * s1.to(tl.float32)).to(ty).to(tl.float32)).to(ty)
        y2 = ((f2 * c2.to(tl.float32)).to(ty).to(tl.float32) + (f1 * s2.to(tl.float32)).to(ty).to(tl.float32)).to(ty)
        if head < Hq: dest = q_out_ptr + b * os_b + head * os_h + t * os_t
        else: dest = k_ptr + b * ks_b + (head - Hq) * ks_h + slot * ks_c
        tl.store(dest + d, y1, mask=ok)
        tl.store(dest + HALF + d, y2, mask=ok)
'''

def test_the_check_rejects_the_unfixed_rotary_kernel(tmp_path):
    "One launch (bf16 q/k/v, float32 cache) compiled with the unfixed kernel and with the shipped one."
    (tmp_path / "unfixed_rotary.py").write_text(UNFIXED_ROTARY)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import unfixed_rotary
        from specdec_kernels.compile_check import recorded_launches, compile_launch, cuda_target
        from specdec_kernels.rotary_kv_triton import rotary_kv_triton
        qkv = torch.zeros(1, 5, (9 + 2 * 3) * 64, dtype=torch.bfloat16)          # [B, q, (Hq+2Hkv)*D]
        keys, values = torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)      # [B, Hkv, C, D] float32
        with recorded_launches() as launches:
            rotary_kv_triton(qkv, torch.zeros(5, 64), torch.zeros(5, 64), keys, values, torch.arange(5), 9, 3)
        (fn, args, kwargs), = launches
        for name, kernel in (("shipped", fn), ("unfixed", unfixed_rotary.rotary_kv_kernel)):
            print(f"{{name}}:", str(compile_launch(kernel, args, kwargs, cuda_target(90))).replace(chr(10), " "))
        """)
    done = run_python("-c", script)
    assert done.returncode == 0, done.stderr[-4000:]
    shipped, unfixed = [l for l in done.stdout.splitlines() if l.startswith(("shipped:", "unfixed:"))]
    assert shipped == "shipped: None"
    assert "Mismatched type for dest between then block (pointer<bf16>) and else block (pointer<fp32>)" in unfixed
