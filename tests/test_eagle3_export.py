"""`specdec export-head`: the exported EAGLE-3 head computes, in an independent re-implementation of the layer-0 forward
of vLLM's and SGLang's `llama_eagle3` (written here from their source, neither engine imported), the draft logits and
drafts our head computes in the loop (float32, max abs difference <= 1e-4), on tiny-llama and SmolLM2-135M."""
import json
import pytest, torch
from safetensors.torch import load_file
from specdec import generate
from specdec.controllers import FixedK
from specdec.vocab import DraftVocab
from specdec.heads import EagleHead
from specdec.eagle3 import Eagle3Head, export_head
from specdec.cli import main

TOL = 1e-4


class Reference:
    """An exported folder, run as the engines' `LlamaForCausalLMEagle3` runs it: the auxiliary states are the target's
    layer INPUTS `hidden_states[i]` (HF `output_hidden_states`, index 0 the embeddings) for vLLM's top-level ids, or
    for SGLang's `eagle_config` ids + 1; `fc` over their concatenation; the decoder layer on
    [input_layernorm(embedding) ; hidden_norm(hidden)] with the un-normed hidden as residual; `norm`, `lm_head`, then
    draft ids to target ids by d2t (the other target ids -inf); the pre-norm output is the next step's hidden."""
    def __init__(self, folder, embed:torch.Tensor): # [V, H] the target's embedding (the engines share it)
        self.w, self.cfg, self.embed = load_file(str(folder / "model.safetensors")), \
            json.loads((folder / "config.json").read_text()), embed.float()
        c = self.cfg
        assert c["architectures"] == ["LlamaForCausalLMEagle3"] and c["num_hidden_layers"] == 1
        assert not c.get("rope_scaling") and (c.get("rope_parameters") or {}).get("rope_type", "default") == "default"
        if "eagle_aux_hidden_state_layer_ids" in c: self.aux_ids = list(c["eagle_aux_hidden_state_layer_ids"])   # vLLM
        else: self.aux_ids = [i + 1 for i in c["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]            # SGLang
        self.heads, self.kv_heads, self.D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.eps, self.theta = c["rms_norm_eps"], c["rope_theta"]
        self.keys, self.values = [], []

    def norm(self, x, name):
        return self.w[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def rope(self, x, positions):                                    # x [heads, T, D]; rotate_half, HF llama style
        inv = 1.0 / self.theta ** (torch.arange(0, self.D, 2, dtype=torch.float32) / self.D)
        freqs = positions.float()[:, None] * inv[None]                # [T, D/2]
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
        x1, x2 = x[..., :self.D // 2], x[..., self.D // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def step(self, ids, hidden, positions):
        """Layer 0 over new positions (ids [T], hidden [T, H], positions [T]), attending to every cached position and
        causally among the new ones; the pre-norm outputs [T, H]."""
        w, p = self.w, "midlayer."
        x = torch.cat([self.norm(self.embed[ids], p + "input_layernorm.weight"),
                       self.norm(hidden, p + "hidden_norm.weight")], -1)              # [T, 2H]
        T = ids.shape[0]
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(T, self.heads, self.D).transpose(0, 1)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(T, self.kv_heads, self.D).transpose(0, 1)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(T, self.kv_heads, self.D).transpose(0, 1)
        q, k = self.rope(q, positions), self.rope(k, positions)
        self.keys.append(k); self.values.append(v)
        K, V = torch.cat(self.keys, 1), torch.cat(self.values, 1)                   # [kv, past+T, D]
        rep = self.heads // self.kv_heads
        K, V = K.repeat_interleave(rep, 0), V.repeat_interleave(rep, 0)
        past = K.shape[1] - T
        scores = q @ K.transpose(1, 2) / self.D ** 0.5                               # [heads, T, past+T]
        allowed = torch.arange(past + T)[None] <= (past + torch.arange(T))[:, None]
        attn = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ V    # [heads, T, D]
        h = hidden + attn.transpose(0, 1).reshape(T, -1) @ w[p + "self_attn.o_proj.weight"].T
        m = self.norm(h, p + "post_attention_layernorm.weight")
        gate, up = m @ w[p + "mlp.gate_proj.weight"].T, m @ w[p + "mlp.up_proj.weight"].T
        return h + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T

    def logits(self, prenorm):
        "Target-vocabulary logits [T, V]: draft logits at draft id + d2t, -inf elsewhere."
        draft = self.norm(prenorm, "norm.weight") @ self.w["lm_head.weight"].T       # [T, N]
        full = torch.full((draft.shape[0], self.cfg["vocab_size"]), float("-inf"))
        full[:, torch.arange(draft.shape[1]) + self.w["d2t"]] = draft
        return full

    def draft_chain(self, prompt, hidden_states, k):
        """Greedy chain of k drafts after the prompt [S] (the target's hidden_states of its S positions): each step's
        target-vocabulary logits [k, V] and the drafts [k]."""
        S = prompt.shape[0]
        aux = torch.cat([hidden_states[i][0].float() for i in self.aux_ids], -1)      # [S, 3H]
        fused = aux[:S - 1] @ self.w["fc.weight"].T                                  # pairs t = 0..S-2
        out = self.step(prompt[1:], fused, torch.arange(S - 1))[-1:]                 # [1, H] at S-2
        logits, drafts = [], []
        for i in range(k):
            logits.append(self.logits(out)[0]); drafts.append(int(logits[-1].argmax()))
            out = self.step(torch.tensor([drafts[-1]]), out, torch.tensor([S - 1 + i]))
        return torch.stack(logits), drafts


def random_head(target, n_draft:int, seed:int=0) -> Eagle3Head:
    "An Eagle3Head with random weights (norms near 1) over every other of the target's first 2*n_draft ids."
    g = torch.Generator().manual_seed(seed)
    vocab = DraftVocab(torch.arange(0, min(2 * n_draft, target.vocab_size), 2), target.vocab_size)
    head = Eagle3Head(target, vocab).float()
    with torch.no_grad():
        for name, p in head.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * (0.2 if base else p.shape[-1] ** -0.5))
    return head.eval().requires_grad_(False)


def our_chain(target, head, prompt, k):
    "Our head in the loop: the first step's draft logits [k, N] (as `_pick` gets them) and its drafts [k] (target ids)."
    seen, pick = [], head._pick
    def recording(logits, sampling, generator):
        out = pick(logits, sampling, generator)
        if len(seen) < k: seen.append((logits[0].clone(), int(out[0][0])))
        return out
    head._pick = recording
    try: generate(target, prompt, drafter=head, controller=FixedK(k), max_new_tokens=k + 4)
    finally: del head._pick
    return torch.stack([s[0] for s in seen]), [s[1] for s in seen]


def parity(target, head, folder, prompt, k=4):
    "Max abs difference of the draft logits (over the draft vocabulary), and both drafts."
    ref = Reference(folder, target.model.model.embed_tokens.weight.detach())
    with torch.inference_mode():
        states = target.model(prompt, output_hidden_states=True).hidden_states
        ref_logits, ref_drafts = ref.draft_chain(prompt[0], states, k)
    logits, drafts = our_chain(target, head, prompt, k)
    assert len(drafts) == k
    ids = head.draft_vocab.ids.long()
    return (logits - ref_logits[:, ids]).abs().max().item(), drafts, ref_drafts, ref_logits


@pytest.mark.parametrize("format", ["vllm", "sglang"])
def test_the_exported_tiny_head_drafts_as_ours(tiny, tmp_path, format):
    head = random_head(tiny, 100)
    folder = export_head(head, tmp_path / format, format)
    prompt = tiny.encode("The quick brown fox jumps over the lazy dog, and then")
    diff, drafts, ref_drafts, ref_logits = parity(tiny, head, folder, prompt)
    assert diff <= TOL, diff
    assert drafts == ref_drafts
    # outside the draft vocabulary the reference's logits are -inf: our drafts come from the same ids
    assert torch.isinf(ref_logits[:, 1::2]).all() and set(drafts) <= set(head.draft_vocab.ids.tolist())


def test_the_exported_smollm2_head_drafts_as_ours(smol, tmp_path):
    head = random_head(smol, 4096, seed=1)
    assert head.target_layers == (1, 14, 26)                               # inputs of 2, 15, 27 (L=30)
    folder = export_head(head, tmp_path / "smol", "vllm")
    assert json.loads((folder / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]
    prompt = smol.encode("The capital of France is Paris. The capital of Italy is")
    diff, drafts, ref_drafts, _ = parity(smol, head, folder, prompt)
    assert diff <= TOL, diff
    assert drafts == ref_drafts


@pytest.mark.parametrize("break_it", ["permuted q_proj", "aux ids by output", "residual normed"])
def test_the_parity_check_fails_on_a_wrong_export(tiny, tmp_path, break_it):
    "Negative controls: a permuted weight, the aux layers read one layer early, and a normed residual all break parity."
    head = random_head(tiny, 100)
    folder = export_head(head, tmp_path / "vllm", "vllm")
    if break_it == "permuted q_proj":
        from safetensors.torch import save_file
        w = load_file(str(folder / "model.safetensors"))
        name = "midlayer.self_attn.q_proj.weight"
        w[name] = w[name][torch.randperm(w[name].shape[0], generator=torch.Generator().manual_seed(0))]
        save_file(w, str(folder / "model.safetensors"))
    elif break_it == "aux ids by output":                                  # ours, not the engines' convention
        config = json.loads((folder / "config.json").read_text())
        config["eagle_aux_hidden_state_layer_ids"] = list(head.target_layers)
        (folder / "config.json").write_text(json.dumps(config))
    prompt = tiny.encode("The quick brown fox jumps over the lazy dog, and then")
    if break_it == "residual normed":
        step = Reference.step
        def normed_residual(self, ids, hidden, positions):
            return step(self, ids, self.norm(hidden, "midlayer.hidden_norm.weight"), positions)
        Reference.step = normed_residual
        try: diff = parity(tiny, head, folder, prompt)[0]
        finally: Reference.step = step
    else: diff = parity(tiny, head, folder, prompt)[0]
    assert diff > 100 * TOL, (break_it, diff)


def test_export_errors_name_the_problem(tiny, tmp_path):
    head = random_head(tiny, 100)
    with pytest.raises(ValueError, match="unknown export format 'onnx': use vllm or sglang"):
        export_head(head, tmp_path / "a", "onnx")
    (tmp_path / "full").mkdir(); (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        export_head(head, tmp_path / "full", "vllm")
    with pytest.raises(ValueError, match="cannot be exported for vllm: it is a eagle head in the workbench's own"):
        export_head(EagleHead(tiny), tmp_path / "b", "vllm")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_cli_exports_a_saved_head(tiny, tmp_path, capsys):
    from specdec.checkpoints import save_head
    head = random_head(tiny, 100)
    save_head(head, tmp_path / "head")
    assert main(["export-head", str(tmp_path / "head"), str(tmp_path / "out"), "--format", "sglang",
                 "--model", "tiny-llama"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(head.target_layers)
    assert config["draft_vocab_size"] == 100 and config["vocab_size"] == tiny.vocab_size
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(weights["fc.weight"], head.fc.weight) and weights["d2t"].dtype == torch.int64
    assert torch.equal(weights["d2t"] + torch.arange(100), head.draft_vocab.ids.long())
    assert weights["t2d"].dtype == torch.bool and int(weights["t2d"].sum()) == 100
    assert main(["export-head", str(tmp_path / "head"), str(tmp_path / "out"), "--model", "tiny-llama"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
