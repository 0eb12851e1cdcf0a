"""Qwen3 in `DecoderNet`: each attention layer RMS-normalizes every query and key head (`q_norm`, `k_norm`) before the
rotary embedding. On a tiny random Qwen3 (float32; head_dim 16 with 4 heads on a hidden size of 32, so the projections
are not square; random norm weights), DecoderNet's logits equal Hugging Face's forward, eager (prefill, then steps) and
at fixed shapes (`forward_at`), and greedy `generate` equals HF's `generate` token for token, with and without drafts.
Negative control: the same net with the q/k norms taken away is far from HF."""
import copy
import pytest, torch
from specdec import generate
from specdec.models import LoadedModel
from specdec.net import DecoderNet
from specdec.drafters import DraftModel, PromptLookup
from specdec.controllers import FixedK

V = 128

@pytest.fixture(scope="module")
def qwen3() -> LoadedModel:
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, attn_implementation="sdpa", eos_token_id=V - 1)
    torch.manual_seed(5)
    model = Qwen3ForCausalLM(cfg).eval().requires_grad_(False)
    for p in model.parameters(): p.data.normal_(0, 0.3)
    for layer in model.model.layers:                                          # norm weights around 1, not all equal
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm): norm.weight.data = 1 + 0.5 * torch.randn(16)
    return LoadedModel(model, None, "tiny-qwen3", torch.device("cpu"), torch.float32)

def hf_generate(target, prompt, max_new):
    out = target.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=max_new,
                                pad_token_id=0, eos_token_id=[])
    return out[:, prompt.shape[1]:]

def net_logits(net, ids) -> tuple[torch.Tensor, torch.Tensor]:
    "`(eager, fixed)`: logits `[1, S, V]` from a prefill then one token a step, and from one `forward_at` over all."
    with torch.inference_mode():
        cache = net.new_cache(1, 40)
        eager = torch.cat([net(ids[:, :9], cache).logits] + [net(ids[:, t:t + 1], cache).logits
                                                          for t in range(9, ids.shape[1])], 1)
        cache = net.new_cache(1, 40)
        fixed = net.forward_at(ids, cache.positions(ids.shape[1]), cache).logits
    return eager, fixed

def test_qwen3_logits_match_hf_eager_and_at_fixed_shapes(qwen3):
    net = qwen3.net
    assert hasattr(net.layers[0].self_attn, "q_norm") and net.head_dim == 16
    ids = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(): ref = qwen3.model(ids).logits                 # [1, 24, V] HF's full forward
    eager, fixed = net_logits(net, ids)
    torch.testing.assert_close(eager, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fixed, ref, atol=1e-4, rtol=1e-4)
    unnormed = copy.deepcopy(qwen3.model)                                       # negative control: no q/k norms
    for layer in unnormed.model.layers: del layer.self_attn.q_norm, layer.self_attn.k_norm
    eager, fixed = net_logits(DecoderNet(unnormed), ids)
    assert (eager - ref).abs().max() > 0.1 and (fixed - ref).abs().max() > 0.1

def test_qwen3_greedy_generation_matches_hf(qwen3):
    for seed in range(3):
        prompt = torch.randint(0, V - 1, (1, 12), generator=torch.Generator().manual_seed(seed))
        ref = hf_generate(qwen3, prompt, 24)
        for drafter in (None, PromptLookup(), DraftModel(qwen3)):
            out = generate(qwen3, prompt, drafter=drafter, controller=None if drafter is None else FixedK(4),
                           max_new_tokens=24, eos_token_id=[])
            assert torch.equal(out.tokens, ref), (seed, drafter)
        fixed = generate(qwen3, prompt, max_new_tokens=24, eos_token_id=[], compile="fixed").tokens
        assert torch.equal(fixed, ref), seed
