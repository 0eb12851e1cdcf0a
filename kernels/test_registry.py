"The registry `specdec.kernels`: what runs where, what `auto` picks, what it records, and the names the engine calls."
import subprocess, sys
import pytest, torch
import specdec.kernels as sk
import specdec_kernels as ref

def test_import_does_not_import_triton():
    code = "import sys, specdec.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)

def test_cpu_auto_is_the_torch_reference():
    for name in sk.KERNELS:
        assert "torch" in sk.available(name, "cpu")
        assert sk.choose(name, "cpu") is ref.TORCH_REFERENCES[name]
        assert sk.choices()[f"{name}@cpu"] == "torch"
    assert "Triton only on CUDA" in sk.choices(details=True)["kv_write@cpu"]["reason"]

def test_prefer_is_recorded_and_checked(triton_impl):
    triton_impl("kv_write")                                           # skips when Triton cannot run here
    assert sk.available("kv_write", "cpu" if not torch.cuda.is_available() else "cuda") == ["torch", "triton"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn = sk.choose("kv_write", device, prefer="triton")
    assert fn.__name__ == "kv_write_triton" and sk.choices(details=True)[f"kv_write@{sk._device(device)}"]["reason"] == "requested"
    assert sk.choose("kv_write", device, prefer="torch") is ref.kv_write_torch

def test_bad_requests_name_the_problem():
    with pytest.raises(ValueError, match="unknown kernel 'argmax'"): sk.choose("argmax", "cpu")
    with pytest.raises(ValueError, match="prefer must be auto, triton or torch"): sk.choose("kv_write", "cpu", prefer="fast")
    with pytest.raises(ValueError, match="unknown kernel"): sk.available("argmax", "cpu")

def test_triton_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(sk, "triton_unavailable", lambda device: "triton is not importable (ModuleNotFoundError)")
    assert sk.available("greedy_verify", "cpu") == ["torch"]
    with pytest.raises(ValueError, match="cannot run on cpu: triton is not importable"):
        sk.choose("greedy_verify", "cpu", prefer="triton")

def test_public_names_dispatch_to_the_kernels(device):
    for name in sk.KERNELS: sk.choose(name, device)                 # auto (on CUDA: timed once)
    g = torch.Generator().manual_seed(0)
    args = sk.example_inputs("rejection_verify", "cpu", vocab=101, generator=g)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    for got, want in zip(sk.rejection_verify(*args), ref.rejection_verify_torch(*args)): assert torch.equal(got, want)
    args = tuple(a.to(device) for a in sk.example_inputs("greedy_verify", "cpu", vocab=101, generator=g))
    for got, want in zip(sk.greedy_verify(*args), ref.greedy_verify_torch(*args)): assert torch.equal(got, want)
    tokens, lengths, *rest = sk.example_inputs("ngram_match", "cpu", context=64, generator=g)
    for got, want in zip(sk.ngram_match(tokens.to(device), lengths.to(device), *rest), ref.ngram_match_torch(tokens, lengths, *rest)):
        assert torch.equal(got.cpu(), want)
    cache, new, positions = (t.to(device) for t in sk.example_inputs("kv_write", "cpu", context=16, generator=g))
    expected = ref.kv_write_torch(cache.clone(), new, positions)
    assert torch.equal(sk.kv_write(cache, new, positions), expected)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: auto times Triton against torch only on a GPU")
def test_cuda_auto_is_timed_and_agrees():
    for name in sk.KERNELS:
        sk.choose(name, "cuda")
        decision = sk.choices(details=True)[f"{name}@{sk._device('cuda')}"]
        assert decision["reason"] == "timed", decision
        assert decision["impl"] == ("triton" if decision["triton_us"] < decision["torch_us"] else "torch")

@pytest.mark.parametrize("name", sk.KERNELS)
def test_compare_implementations_checks_then_times(triton_impl, device, name):
    triton_impl(name)
    decision = sk.compare_implementations(name, device, reps=2, vocab=1000, context=256)
    assert decision["reason"] == "timed" and decision["torch_us"] > 0 and decision["triton_us"] > 0
    assert decision["impl"] == ("triton" if decision["triton_us"] < decision["torch_us"] else "torch")

def test_compare_implementations_refuses_a_kernel_that_disagrees(monkeypatch):
    def implementation(name, impl):
        if impl == "torch": return ref.greedy_verify_torch
        return lambda drafts, logits: tuple(x + 1 for x in ref.greedy_verify_torch(drafts, logits))   # wrong by one
    monkeypatch.setattr(sk, "_implementation", implementation)
    decision = sk.compare_implementations("greedy_verify", "cpu", vocab=50)
    assert decision == {"impl": "torch", "reason": "the Triton kernel disagreed with the torch reference"}

def test_step_kernels_agree_within_rounding_and_the_others_exactly():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    nudged = x * (1 + 1e-7)                                        # float32 rounding noise
    assert sk._same_outputs((x,), (nudged,), "rms_norm") and not sk._same_outputs((x,), (x + 1e-3,), "rms_norm")
    assert not sk._same_outputs((x,), (nudged,), "kv_write") and sk._same_outputs((x,), (x.clone(),), "kv_write")
    assert not sk._same_outputs((x,), (x.double(),), "rms_norm")     # a dtype change is a disagreement
