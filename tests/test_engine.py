"""The fixed-shape engine: `forward_at` equals the sliced forward, prefill chunks and compiled steps give the eager
tokens, and a decoding step reads the device once."""
import traceback
import pytest, torch
from torch.utils._python_dispatch import TorchDispatchMode
import specdec.decode as decode
from specdec import generate
from specdec.models import tiny_llama
from specdec.net import DecoderNet
from specdec.engine import Engine, engine_for, resolve_compile
from specdec.drafters import PromptLookup, DraftModel, LayerSkip, Fallback
from specdec.controllers import FixedK
from specdec.policies import RejectionSampling

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TEXT = "the cat sat on the mat; the cat sat on the mat and the cat sat"


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=5)


def _sliced_and_fixed(net, ids, steps):
    "Logits of the same schedule of blocks (prefill, steps, a rollback) through `forward` and through `forward_at`."
    outs = []
    for fixed in (False, True):
        cache, got = net.new_cache(1, 64), []
        for kind, a, b in steps:
            if kind == "rollback": cache.rollback(a); continue
            block = ids[:, a:b]
            if fixed:
                got.append(net.forward_at(block, cache.positions(b - a), cache).logits); cache.length = cache.length + b - a
            else: got.append(net(block, cache).logits)
        outs.append(torch.cat(got, 1))
    return outs


def test_fixed_shape_forward_equals_sliced_forward(model):
    net = DecoderNet(model.model, linear="torch")
    ids = torch.randint(0, model.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    steps = [("fwd", 0, 20), ("fwd", 20, 21), ("fwd", 21, 26), ("rollback", 23, None), ("fwd", 23, 28), ("fwd", 28, 29)]
    with torch.inference_mode():
        sliced, fixed = _sliced_and_fixed(net, ids, steps)
        ref = model.model(ids[:, :29]).logits
    torch.testing.assert_close(fixed, sliced, atol=1e-5, rtol=1e-5)
    expected = torch.cat([ref[:, :26], ref[:, 23:29]], 1)      # the rollback re-runs positions 23..25
    torch.testing.assert_close(fixed, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt_len", [1, 2, 63, 64, 65, 66, 129])
def test_prefill_chunks_give_the_eager_tokens(model, prompt_len):
    "Prompt lengths around the 64-token chunk: the padded last chunk never changes a token."
    ids = torch.randint(0, 256, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    eager = generate(model, ids, max_new_tokens=12, eos_token_id=[], compile="eager")
    fixed = generate(model, ids, max_new_tokens=12, eos_token_id=[], compile="fixed")
    assert fixed.engine["mode"] == "fixed" and eager.engine["mode"] == "eager"
    assert torch.equal(fixed.tokens, eager.tokens)
    pld = generate(model, ids, drafter=PromptLookup(on_device=True), controller=FixedK(3), max_new_tokens=12,
                   eos_token_id=[], compile="fixed")
    assert torch.equal(pld.tokens, eager.tokens)


def test_fixed_engine_with_every_drafter_is_lossless(model):
    prompt = model.encode(TEXT)
    ref = generate(model, prompt, max_new_tokens=30, eos_token_id=[], compile="eager").tokens
    draft = tiny_llama(seed=6, num_layers=2)
    for drafter in (PromptLookup(), PromptLookup(on_device=True), DraftModel(draft), DraftModel(model), LayerSkip(model, 2),
                    Fallback([PromptLookup(3, 2), DraftModel(draft)])):
        for k in (1, 4):
            out = generate(model, prompt, drafter=drafter, controller=FixedK(k), max_new_tokens=30, eos_token_id=[], compile="fixed")
            assert torch.equal(out.tokens, ref), (drafter.name, k)
            assert out.stats.new_tokens == out.stats.accepted + out.stats.target_forwards
            if not isinstance(drafter, PromptLookup):                     # a draft model's engine (a Fallback member's too) built off the clock
                assert any(key.startswith("draft:") for key in out.engine["setup_seconds"]), (drafter.name, out.engine)


def test_engine_reuses_its_cache_and_reports_setup(model):
    net = DecoderNet(model.model)
    engine = engine_for(net, "fixed")
    assert engine_for(net, "fixed") is engine and engine_for(net, "fixed", role="draft") is not engine
    assert engine_for(net, "eager") is net
    a = engine.new_cache(1, 100)
    assert engine.new_cache(1, 50) is a and a.length == 0 and a.capacity >= 100 + engine.prefill_chunk
    assert engine.new_cache(1, 1000) is not a                     # grown: a new cache (and new shapes)
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"): resolve_compile("fast", net)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"): resolve_compile("graphs", net)
        assert resolve_compile("auto", net) == "eager"


def test_rotary_tables_grown_outside_the_engine_drop_every_step_built_on_the_old_ones(model):
    """A graph reads the rotary tables by address: once something else grows them (an eager cache for feature recording,
    a cost probe), a newly built width must not vouch for the widths built before; all are rebuilt."""
    net = DecoderNet(model.model)
    engine = engine_for(net, "fixed", role="tables-test")
    cache = engine.new_cache(1, 64)
    engine.warmup(cache, [(1, "all")])
    old_step = engine.steps[(1, "all")]
    net.new_cache(1, 4096)                                         # the tables grow, outside the engine
    engine.warmup(cache, [(2, "all")])                             # a new width is built on the new tables...
    assert (1, "all") not in engine.steps                          # ...and the old width is gone, not re-blessed
    ids = torch.tensor([[5]])
    engine(ids, cache)
    assert engine.steps[(1, "all")] is not old_step and engine.tables is net.cos


SYNCING_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose", "unique", "masked_select",
               "_unique2", "repeat_interleave", "multinomial"}

class CountSyncs(TorchDispatchMode):
    """Counts what makes a GPU wait for the host: ops that read a scalar or have data-dependent shapes, copies to the CPU,
    and the tensor methods that read values without dispatching an op on a CPU (`tolist`, `cpu`, `numpy`), wrapped while
    the context is open. The loop's one read (`decode.read_step`) and the kernels' CPU-only input checks are not counted."""
    READS = ("tolist", "cpu", "numpy")
    def __init__(self): super().__init__(); self.seen = []
    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.READS}
        for name, method in self.saved.items():
            def counted(t, *args, _name=name, _method=method, **kwargs):
                if not _allowed_read(): self.seen.append(_name)
                return _method(t, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()
    def __exit__(self, *exc):
        for name, method in self.saved.items(): setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        to_cpu = name in ("_to_copy", "copy_") and any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args[:1]) \
                 and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
        if (name in SYNCING_OPS or to_cpu) and not _allowed_read(): self.seen.append(name)
        return func(*args, **kwargs)


def _allowed_read() -> bool:
    "Whether the read comes from the loop's one read per step (`read_step`) or the kernels' CPU-only input checks."
    stack = traceback.extract_stack()
    return _cpu_only_check(stack) or any(f.name == "read_step" and f.filename.endswith("decode.py") for f in stack)


def _cpu_only_check(stack) -> bool:
    "Whether the op comes from the kernels' input checks, which read values only on the CPU (free there, skipped on a GPU)."
    return any(f.filename.replace("\\", "/").endswith("kernels/checks.py") for f in stack)


class GraphBuffers:
    """On the CPU, what a CUDA graph replay does to memory: under this context the `fixed` mode's steps (the engine's and
    the heads' `HeadSteps`) read their inputs from, and write their outputs (logits and every layer's output) into,
    tensors kept per shape, so a step's result is overwritten by the next step of that shape, as a graph's static
    buffers are. Code that holds a step's output across the next one (instead of reading or copying it first) then goes
    wrong on the CPU."""
    def __enter__(self):
        from specdec.engine import HeadSteps
        self.saved = Engine._step, HeadSteps.__call__
        build, HeadSteps_call = self.saved
        def step(engine, q, logits, cache):
            key = (q, logits)
            if engine.mode != "fixed" or key in engine.steps: return build(engine, q, logits, cache)
            run, kept = build(engine, q, logits, cache), {}
            def replay(ids, cache, tree=None):
                out, layers = run(ids, cache, tree)                 # logits, {layer: [B, q, H]}
                if not kept: kept.update(out=None if out is None else out.clone(),
                                         layers={i: f.clone() for i, f in layers.items()})
                if out is not None: kept["out"].copy_(out)
                for i, f in layers.items(): kept["layers"][i].copy_(f)
                return kept["out"], kept["layers"]
            engine.steps[key] = replay
            return replay
        def head_step(steps, name, width, fn, *inputs):
            if steps.mode != "fixed" or width > steps.max_width: return HeadSteps_call(steps, name, width, fn, *inputs)
            if (name, width) not in steps.graphs:                   # "captured": inputs and outputs kept for this shape
                static_inputs = [x.clone() for x in inputs]
                outputs = fn(*static_inputs)
                steps.graphs[(name, width)] = (static_inputs, None, tuple(o.clone() for o in outputs) if isinstance(outputs, tuple) else outputs.clone())
            static_inputs, _, outputs = steps.graphs[(name, width)]
            for static, x in zip(static_inputs, inputs): static.copy_(x)
            fresh = fn(*static_inputs)
            for o, f in zip(outputs if isinstance(outputs, tuple) else (outputs,), fresh if isinstance(fresh, tuple) else (fresh,)): o.copy_(f)
            return outputs
        Engine._step, HeadSteps.__call__ = step, head_step
        return self
    def __exit__(self, *exc):
        from specdec.engine import HeadSteps
        Engine._step, HeadSteps.__call__ = self.saved


def test_graph_buffers_overwrite_a_steps_output_with_the_next_ones(model):
    "The emulation does what a graph does: a step's logits change when the same shape runs again."
    prompt = model.encode(TEXT)
    with GraphBuffers():
        engine = engine_for(model.net, "fixed", role="test-buffers")
        cache = engine.new_cache(1, 64)
        engine(prompt[:, :8], cache, "none")
        first = engine(prompt[:, 8:9], cache, "all").logits
        kept = first.clone()
        second = engine(prompt[:, 9:10], cache, "all").logits
    assert second is first and not torch.equal(first, kept)


def test_a_prompt_of_several_prefill_chunks_returns_every_chunks_features(model):
    """Asked for two layers' outputs, a prefill of 3 chunks through static buffers (`GraphBuffers`) returns the features
    of every prompt position, as the eager forward does: each chunk's are copied out before the next chunk runs."""
    prompt = model.encode(" ".join([TEXT] * 3))                                # [1, S], S > 2 prefill chunks
    keep = (0, model.num_layers - 1)
    eager = model.net(prompt, model.net.new_cache(1, 256), "last", keep=keep).features   # [1, S, 2H]
    with GraphBuffers():
        engine = engine_for(model.net, "fixed", role="test-chunks")
        fixed = engine(prompt, engine.new_cache(1, 256), "last", keep=keep).features
    assert prompt.shape[1] > 2 * engine.prefill_chunk and fixed.shape == eager.shape == (1, prompt.shape[1], 2 * 64)
    torch.testing.assert_close(fixed, eager, rtol=1e-4, atol=1e-4)
    assert engine(prompt[:, :4], engine.new_cache(1, 256), "last").features is None   # no layers asked for: none


@pytest.mark.parametrize("compile", ["eager", "fixed"])
def test_one_host_read_per_step(model, monkeypatch, compile):
    "The loop reads the device once per step (`read_step`), and no other op in generate would sync a GPU."
    reads, real = [], decode.read_step
    monkeypatch.setattr(decode, "read_step", lambda summary: reads.append(1) or real(summary))
    prompt = model.encode(TEXT)
    draft = tiny_llama(seed=6, num_layers=2)
    cases = [dict(), dict(drafter=PromptLookup(on_device=True), controller=FixedK(4)),
             dict(drafter=DraftModel(draft), controller=FixedK(3)),
             dict(drafter=DraftModel(draft), policy=RejectionSampling(), temperature=0.8, top_p=0.9)]
    for kw in cases:
        reads.clear()
        with CountSyncs() as syncs:
            out = generate(model, prompt, max_new_tokens=20, eos_token_id=[], compile=compile, **kw)
        assert len(reads) == out.stats.target_forwards, kw
        assert syncs.seen == [], (kw, syncs.seen)


def test_the_counter_sees_a_sync(model):
    """The sync counter can fail: a host PromptLookup copies the sequence to the host and searches it there; a drafter
    that reads a value with `.tolist()` or `.cpu()` (no op is dispatched for either on a CPU) is seen too."""
    with CountSyncs() as syncs:
        generate(model, model.encode(TEXT), drafter=PromptLookup(), max_new_tokens=8, eos_token_id=[])
    assert "nonzero" in syncs.seen
    class Reads(PromptLookup):
        def __init__(self, read): super().__init__(on_device=True); self.read = read
        def propose(self, tokens, k, sampling=None, generator=None):
            self.read(tokens[0, -1:])                                   # a value read on the host
            return super().propose(tokens, k, sampling, generator)
    for read, name in ((lambda t: t.tolist(), "tolist"), (lambda t: t.cpu(), "cpu")):
        with CountSyncs() as syncs:
            generate(model, model.encode(TEXT), drafter=Reads(read), controller=FixedK(2), max_new_tokens=8, eos_token_id=[])
        assert syncs.seen.count(name) >= 7, (name, syncs.seen)        # one per drafting step


def test_compile_gives_the_eager_tokens():
    "torch.compile (CPU, two step widths: 1 and K+1) reproduces the eager greedy tokens; compile time is reported, not timed."
    small = tiny_llama(seed=7, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    prompt = small.encode(TEXT)
    ref = generate(small, prompt, max_new_tokens=10, eos_token_id=[], compile="eager")
    out = generate(small, prompt, max_new_tokens=10, eos_token_id=[], compile="compile")
    assert torch.equal(out.tokens, ref.tokens)
    pld = generate(small, prompt, drafter=PromptLookup(on_device=True), controller=FixedK(3), max_new_tokens=10,
                   eos_token_id=[], compile="compile")
    assert torch.equal(pld.tokens, ref.tokens)
    setup = pld.engine["setup_seconds"]
    assert setup["target:q=1/all"] > 0 and setup["target:q=4/all"] > 0
    assert pld.stats.wall_time < sum(setup.values())              # the compile is reported beside, not inside, wall time


@cuda
def test_graphs_give_the_eager_tokens_on_cuda():
    gpu = tiny_llama(seed=5, device="cuda", dtype=torch.float32)
    prompt = gpu.encode(TEXT)
    ref = generate(gpu, prompt, max_new_tokens=40, eos_token_id=[], compile="eager").tokens
    draft = tiny_llama(seed=6, num_layers=2, device="cuda", dtype=torch.float32)
    for drafter in (None, PromptLookup(), DraftModel(draft), LayerSkip(gpu, 2)):
        for k in (1, 4):
            out = generate(gpu, prompt, drafter=drafter, controller=FixedK(k) if drafter else None, max_new_tokens=40,
                           eos_token_id=[], compile="graphs")
            assert out.engine["mode"] == "graphs"
            assert torch.equal(out.tokens, ref), (drafter and drafter.name, k)
    assert generate(gpu, prompt, max_new_tokens=4).engine["mode"] == "graphs"     # auto on CUDA


@cuda
def test_graph_steps_do_not_sync_on_cuda(monkeypatch):
    "Under torch.cuda.set_sync_debug_mode('error'), only read_step may synchronise inside the loop."
    gpu = tiny_llama(seed=5, device="cuda", dtype=torch.float32)
    prompt = gpu.encode(TEXT)
    real = decode.read_step
    def read(summary):
        torch.cuda.set_sync_debug_mode(0)
        try: return real(summary)
        finally: torch.cuda.set_sync_debug_mode("error")        # every later op of the loop must not sync
    monkeypatch.setattr(decode, "read_step", read)
    try:
        for drafter in (None, PromptLookup(), DraftModel(tiny_llama(seed=6, num_layers=2, device="cuda", dtype=torch.float32))):
            generate(gpu, prompt, drafter=drafter, max_new_tokens=24, eos_token_id=[], compile="graphs")
            torch.cuda.set_sync_debug_mode(0)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_fused_weights_share_the_models_storage():
    "q/k/v and gate/up become one matrix product each; the model's own weights are views of it (no second copy)."
    from specdec.net import fuse_weights
    small = tiny_llama(seed=9, device="cpu", dtype=torch.float32)   # on the CPU on a GPU machine too: the ids are a CPU generator's
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = small.model(ids).logits
        net = DecoderNet(small.model, linear="torch")                 # built inside inference mode, as generate does
    embeds = small.model.get_input_embeddings()(ids).detach().requires_grad_()
    small.model(inputs_embeds=embeds).logits.sum().backward()        # autograd still runs through the fused weights' views
    assert embeds.grad is not None
    attn = small.model.model.layers[1].self_attn
    weight = net.qkv[1].weight                                       # [(Hq + 2*Hkv) * D, H]
    assert weight.shape[0] == sum(l.weight.shape[0] for l in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.k_proj.weight.data_ptr() == weight.data_ptr() + attn.q_proj.weight.numel() * weight.element_size()
    with torch.inference_mode(): assert torch.equal(small.model(ids).logits, before)   # the model computes as before
    assert DecoderNet(small.model, linear="torch").qkv[1].weight is weight             # fused once per model
    old = weight.clone()
    with torch.no_grad(): small.model.load_state_dict({k: v * 2 for k, v in small.model.state_dict().items()})
    assert torch.equal(weight, 2 * old)                                # loading new weights reaches the fused product
    attn.v_proj.weight = torch.nn.Parameter(attn.v_proj.weight.detach().clone())       # replaced: fused again
    assert fuse_weights([attn.q_proj, attn.k_proj, attn.v_proj])[0] is not weight


def test_auto_linears_are_the_faster_backend_timed_once_per_model():
    """`linear="auto"` on a CPU times both backends on the model's own weights and keeps the faster; every net over the
    same model reuses that timing (a target and its LayerSkip draft agree); a forced backend is not timed."""
    from specdec.net import onednn_available
    small = tiny_llama(seed=11)
    net = DecoderNet(small.model)
    if not onednn_available(): assert net.backend == "torch" and net.linear_timings is None; return
    timed = net.linear_timings
    assert set(timed) == {"onednn", "torch"} and all(ms > 0 for ms in timed.values())
    assert net.backend == min(timed, key=timed.get)
    half = DecoderNet(small.model, num_layers=2)
    assert half.linear_timings is timed and half.backend == net.backend
    assert DecoderNet(small.model, linear="torch").linear_timings is None

def test_the_lean_step_launches_about_nine_kernels_per_layer():
    "Counted on the CPU: each fused op is one launch; the torch references of the same ops launch several."
    from specdec.engine import count_step_ops
    from specdec.net import STEP_OPS
    small = tiny_llama(seed=9, num_layers=3)
    net = DecoderNet(small.model, linear="torch", kernels="torch")
    lean, unfused = count_step_ops(net, q=5), count_step_ops(net, q=5, fused=False)
    assert lean["rms_norm (fused)"] == 2 * 3 + 1 and lean["rotary_kv (fused)"] == 3 and lean["silu_mul (fused)"] == 3
    assert lean["linear"] == 4 * 3 + 1                              # q/k/v, o, gate/up, down per layer; the head
    assert sum(lean.values()) <= 9 * 3 + 8 < sum(unfused.values())
    assert not any(name.endswith("(fused)") for name in unfused) and set(STEP_OPS) == {"rms_norm", "rotary_kv", "silu_mul"}
    assert count_step_ops(net, q=1) == lean                          # the same launches for 1 token as for 5


def test_kernel_choice_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="kernels must be auto, triton or torch, got 'fast'"):
        DecoderNet(model.model, kernels="fast")
    from specdec_kernels.triton_support import triton_unavailable
    if triton_unavailable("cpu") is not None:
        with pytest.raises(ValueError, match="Triton kernel 'rms_norm' cannot run on cpu"):
            DecoderNet(model.model, kernels="triton")


@cuda
def test_triton_step_in_graphs_gives_the_eager_tokens_on_cuda():
    "The lean step with the Triton kernels, captured as CUDA graphs, reproduces the torch-reference eager tokens (float32)."
    gpu = tiny_llama(seed=5, device="cuda", dtype=torch.float32)
    prompt = gpu.encode(TEXT)
    gpu.__dict__["net"] = DecoderNet(gpu.model, kernels="torch")
    ref = generate(gpu, prompt, max_new_tokens=40, eos_token_id=[], compile="eager").tokens
    gpu.__dict__["net"] = DecoderNet(gpu.model, kernels="triton")
    for drafter in (None, PromptLookup()):
        out = generate(gpu, prompt, drafter=drafter, controller=FixedK(4) if drafter else None, max_new_tokens=40,
                       eos_token_id=[], compile="graphs")
        assert out.engine["mode"] == "graphs" and torch.equal(out.tokens, ref), drafter


def test_a_bf16_net_on_the_cpu_attends_over_a_float32_cache_and_tracks_float32():
    """bfloat16 on the CPU: oneDNN's prepacked bf16 linears where it computes bf16, attention over a float32 cache. Its
    logits stay as close to the float32 model's as Hugging Face's own bf16 forward, and its argmax agrees with HF's."""
    from specdec.net import onednn_bf16_available, linear_backend
    fp32 = tiny_llama(seed=5)
    bf = tiny_llama(seed=5, dtype=torch.bfloat16)
    timed = bf.net.linear_timings                                    # auto: the faster of the two on this host
    assert bf.net.backend == (min(timed, key=timed.get) if onednn_bf16_available() else "torch")
    ids = bf.encode(TEXT)
    with torch.inference_mode():
        cache = bf.net.new_cache(1, 64)
        assert cache.keys.dtype == cache.values.dtype == torch.float32
        ours = torch.cat([bf.net(ids[:, :-4], cache).logits, bf.net(ids[:, -4:-1], cache).logits,
                          bf.net(ids[:, -1:], cache).logits], 1)   # [1, S, V]
        reference = fp32.model(ids).logits.float()
        hf = bf.model(ids).logits.float()
        fixed = Engine(bf.net, "fixed")                                  # the fixed-shape forward over the same float32 cache
        cache = fixed.new_cache(1, 64)
        assert cache.keys.dtype == torch.float32
        fixed(ids[:, :-4], cache, logits="none")
        at_fixed = torch.cat([fixed(ids[:, -4:-1], cache).logits, fixed(ids[:, -1:], cache).logits], 1)   # [1, 4, V]
    torch.testing.assert_close(at_fixed, ours[:, -4:], atol=0.05, rtol=0.02)   # bf16 rounding of other block shapes
    ours_err, hf_err = (ours - reference).abs().max().item(), (hf - reference).abs().max().item()
    assert ours_err <= 1.5 * hf_err, (ours_err, hf_err)
    assert (ours.argmax(-1) == hf.argmax(-1)).float().mean() >= 0.9
    with pytest.raises(ValueError, match="the onednn backend needs float32 \\(or bfloat16 where oneDNN computes it\\) on a CPU"):
        linear_backend(torch.device("cpu"), torch.float16, "onednn")
