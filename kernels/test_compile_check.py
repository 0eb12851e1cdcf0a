"""`compile_check.py` compiles every Triton kernel signature for a CUDA target (sm_90) on this machine, GPU or not:
triton compiles for a target without a GPU, with the ptxas it bundles. It runs in a fresh process, since the tests here
may have imported triton for its interpreter. The negative control is the rotary kernel's bug before it stored each
output through its own pointer, reduced to a few lines: one variable given two pointer types."""
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
    # a bf16 net's float32 cache, q = 1 and q = 5, rows sharing slots or each at its own
    assert len(wide) >= 2 and all(l.startswith("ok ") for l in wide)

# the rotary kernel's bug, reduced: one variable given a bf16 pointer in one arm of a runtime `if` and a float32 pointer
# in the other (the query output and a wider cache), which Triton's CPU interpreter runs and its compiler rejects
MIXED_POINTERS = '''
import triton
import triton.language as tl

@triton.jit
def store_kernel(x_ptr, first_ptr, other_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    if tl.program_id(0) == 0: dest = first_ptr
    else: dest = other_ptr
    tl.store(dest + offs, x, mask=offs < n)
'''

def test_the_check_rejects_one_variable_with_two_pointer_types(tmp_path):
    "The same kernel compiled with its two outputs of one dtype (compiles) and of two (rejected, as the rotary was)."
    (tmp_path / "mixed_pointers.py").write_text(MIXED_POINTERS)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        from mixed_pointers import store_kernel
        from specdec_kernels.compile_check import compile_launch, cuda_target
        x = torch.zeros(16, dtype=torch.bfloat16)
        for other in (torch.bfloat16, torch.float32):
            error = compile_launch(store_kernel, (x, torch.zeros_like(x), torch.zeros(16, dtype=other), 16),
                                   {{"BLOCK": 16}}, cuda_target(90))
            print(f"{{other}}:", str(error).replace(chr(10), " "))
        """)
    done = run_python("-c", script)
    assert done.returncode == 0, done.stderr[-4000:]
    same, mixed = [l for l in done.stdout.splitlines() if l.startswith("torch.")]
    assert same == "torch.bfloat16: None"
    assert "Mismatched type for dest between then block (pointer<bf16>) and else block (pointer<fp32>)" in mixed
