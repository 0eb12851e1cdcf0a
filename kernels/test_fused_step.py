"""The decoder step with the Triton kernels (`DecoderNet(kernels="triton")`) against the same step with their torch
references: logits within float32 rounding, and greedy tokens equal to Hugging Face's own greedy output. Without CUDA
this runs the kernels under Triton's interpreter (see conftest.py)."""
import pytest, torch
from specdec import generate
from specdec.models import tiny_llama, LoadedModel
from specdec.net import DecoderNet
from specdec.drafters import PromptLookup
from specdec.controllers import FixedK

TEXT = "the cat sat on the mat; the cat sat on the mat and the cat sat"

@pytest.fixture(scope="module")
def gpu_or_cpu(device):
    from specdec_kernels.triton_support import triton_unavailable
    if (why := triton_unavailable(device)) is not None: pytest.skip(f"Triton cannot run here: {why}")
    return device

def _qwen2(device) -> LoadedModel:
    "A tiny Qwen2: q/k/v biases (fused with the weights) and a sliding window on its second layer."
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=128, hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa", eos_token_id=127,
                      use_sliding_window=True, sliding_window=6, max_window_layers=1)
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(cfg).eval().requires_grad_(False)
    for p in model.parameters(): p.data.normal_(0, 0.3)
    return LoadedModel(model.to(device), None, "tiny-qwen2", torch.device(device), torch.float32)

def _logits(net, ids):
    "Logits of a prefill, two steps and a verification block after a rollback (sliced forward), then the same through `forward_at`."
    out = []
    with torch.inference_mode():
        cache = net.new_cache(1, 64)
        for a, b in ((0, 17), (17, 18), (18, 22)): out.append(net(ids[:, a:b], cache).logits)
        cache.rollback(19)
        out.append(net.forward_at(ids[:, 19:24], cache.positions(5), cache).logits)
    return torch.cat(out, 1)

@pytest.mark.parametrize("make", [lambda d: tiny_llama(seed=5, device=d, dtype=torch.float32), _qwen2], ids=["llama", "qwen2"])
def test_triton_step_computes_the_torch_step(gpu_or_cpu, make):
    model = make(gpu_or_cpu)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0)).to(gpu_or_cpu)
    triton_net = DecoderNet(model.model, linear="torch", kernels="triton")
    assert triton_net.ops["rms_norm"].__name__ == "rms_norm_triton"
    torch_net = DecoderNet(model.model, linear="torch", kernels="torch")
    torch.testing.assert_close(_logits(triton_net, ids), _logits(torch_net, ids), atol=2e-4, rtol=2e-4)

def test_triton_step_is_lossless(gpu_or_cpu):
    model = tiny_llama(seed=5, device=gpu_or_cpu, dtype=torch.float32)
    model.__dict__["net"] = DecoderNet(model.model, linear="torch", kernels="triton")   # the net `generate` uses
    prompt = model.encode(TEXT)
    with torch.inference_mode():
        hf = model.model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]
    for drafter in (None, PromptLookup()):
        out = generate(model, prompt, drafter=drafter, controller=FixedK(3) if drafter else None, max_new_tokens=16,
                       eos_token_id=[], compile="eager")
        assert torch.equal(out.tokens, hf), drafter
