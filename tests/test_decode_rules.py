"""Decoding rules shared with Hugging Face: τ counts only tokens emitted before EOS, the EOS argument means what it means
in `generate`, and Qwen2/Mistral sliding windows are honoured."""
import pytest, torch
from specdec import generate
from specdec.models import tiny_llama, LoadedModel
from specdec.net import DecoderNet
from specdec.drafters import DraftModel, PromptLookup
from specdec.controllers import FixedK

TEXTS = ["the cat sat on the mat; the cat sat on the", "abcabcabcabc", "Once upon a time there was", "1, 2, 3, 4, 5, 6,"]


def hf(model, prompt, max_new, **kw):
    out = model.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=max_new,
                               pad_token_id=0, **kw)
    return out[:, prompt.shape[1]:]


def test_tau_counts_only_tokens_before_eos():
    "A self-draft accepts every draft; with an EOS inside the second draft, the drafts after it are not counted."
    target = tiny_llama(seed=11)
    checked = 0
    for text in TEXTS:
        prompt = target.encode(text)
        plain = hf(target, prompt, 24, eos_token_id=[])[0].tolist()
        eos = next((plain[p] for p in range(10, 16) if plain[p] not in plain[:p]), None)    # first emitted in step 2 (K=8)
        if eos is None: continue
        out = generate(target, prompt, drafter=DraftModel(target), controller=FixedK(8), max_new_tokens=24, eos_token_id=eos)
        s = out.stats
        assert out.tokens[0, -1].item() == eos and out.tokens.shape[1] == plain.index(eos) + 1
        assert s.accepted + s.target_forwards == s.new_tokens                   # τ = new tokens per target forward
        assert sum(out.accepted_lengths) == s.accepted and s.tau == s.new_tokens / s.target_forwards
        assert s.proposed == 8 * s.target_forwards                             # the drafts past the EOS were proposed
        checked += 1
    assert checked >= 2


def _with_eos_inside(prompt_text, seed=12):
    "A fresh tiny model whose generation config's EOS is the 8th token of its own greedy output."
    model = tiny_llama(seed=seed)
    prompt = model.encode(prompt_text)
    plain = hf(model, prompt, 30, eos_token_id=[])
    eos = plain[0, 7].item()
    model.model.generation_config.eos_token_id = eos
    return model, prompt, plain, eos


def test_eos_argument_means_what_it_means_in_hf_generate():
    model, prompt, plain, eos = _with_eos_inside(TEXTS[2])
    stop = plain[0].tolist().index(eos) + 1
    # no argument: the model's EOS, in both
    default_hf, default_ours = hf(model, prompt, 30), generate(model, prompt, max_new_tokens=30).tokens
    assert default_hf.shape[1] == stop and torch.equal(default_ours, default_hf)
    # an empty list: never stop early, in both (HF also reads an explicit None this way)
    for drafter in (None, PromptLookup(), DraftModel(model)):
        ours = generate(model, prompt, drafter=drafter, max_new_tokens=30, eos_token_id=[]).tokens
        assert ours.shape[1] == 30 and torch.equal(ours, hf(model, prompt, 30, eos_token_id=[]))
    assert torch.equal(hf(model, prompt, 30, eos_token_id=None), plain)


def _tiny_config(kind:str, window:int):
    from transformers import Qwen2Config, MistralConfig
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa", eos_token_id=127)
    if kind == "qwen2":   # sliding attention from layer 1 on (max_window_layers=1), as HF's layer_types say
        return Qwen2Config(use_sliding_window=True, sliding_window=window, max_window_layers=1, **common)
    return MistralConfig(sliding_window=window, **common)


def _tiny(kind:str, window:int=8) -> LoadedModel:
    from transformers import Qwen2ForCausalLM, MistralForCausalLM
    cls = Qwen2ForCausalLM if kind == "qwen2" else MistralForCausalLM
    torch.manual_seed(3)
    model = cls(_tiny_config(kind, window)).eval().requires_grad_(False)
    for p in model.parameters(): p.data.normal_(0, 0.3)
    return LoadedModel(model, None, f"tiny-{kind}", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_sliding_window_matches_hf(kind):
    target = _tiny(kind)
    net = target.net
    assert net.windows == ([None, 8] if kind == "qwen2" else [8, 8])
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = target.model(ids).logits                                        # [1, 30, V], full-sequence HF forward
        cache = net.new_cache(1, 40)
        sliced = torch.cat([net(ids[:, :12], cache).logits] + [net(ids[:, t:t + 1], cache).logits for t in range(12, 20)]
                           + [net(ids[:, 20:30], cache).logits], 1)
        cache = net.new_cache(1, 40)
        fixed = net.forward_at(ids, cache.positions(30), cache).logits
    torch.testing.assert_close(sliced, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fixed, ref, atol=1e-4, rtol=1e-4)
    full = DecoderNet(target.model)
    full.windows = [None] * len(full.windows)                                  # negative control: the window matters
    with torch.inference_mode(): ignored = full(ids, full.new_cache(1, 40)).logits
    assert (ignored[:, 8:] - ref[:, 8:]).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_sliding_window_generation_matches_hf(kind):
    target = _tiny(kind)
    prompt = torch.randint(0, 120, (1, 14), generator=torch.Generator().manual_seed(1))
    ref = hf(target, prompt, 24, eos_token_id=[])
    for drafter in (None, PromptLookup(), PromptLookup(on_device=True)):
        out = generate(target, prompt, drafter=drafter, max_new_tokens=24, eos_token_id=[])
        assert torch.equal(out.tokens, ref), drafter
    assert torch.equal(generate(target, prompt, max_new_tokens=24, eos_token_id=[], compile="fixed").tokens, ref)
