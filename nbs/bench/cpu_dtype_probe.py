"""One decoding step of SmolLM2-135M on this CPU, float32 against bfloat16: the output head's matrix product (F.linear
and oneDNN prepacked, 4 rows), then a whole `DecoderNet` step of 1 and of 4 tokens over a 300-token context, medians.
Usage: `.venv/bin/python nbs/bench/cpu_dtype_probe.py [--linear torch|auto]` (auto: prepacked where oneDNN computes it)."""
import argparse, time
import torch
import torch.nn.functional as F
from specdec import load_model
from specdec.net import DecoderNet

def median_ms(fn, n:int) -> float:
    for _ in range(3): fn()
    times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--linear", default="auto", choices=("auto", "torch")); p.add_argument("--reps", type=int, default=25)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            weight, x = torch.randn(49152, 576).to(dtype), torch.randn(1, 4, 576).to(dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 4)
            plain = median_ms(lambda: F.linear(x, weight), 30)
            onednn = median_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), 30)
            print(f"head 49152x576, 4 rows, {dtype}: F.linear {plain:.2f} ms, oneDNN prepacked {onednn:.2f} ms")
        ids = torch.randint(0, 49152, (1, 300))
        for dtype in ("float32", "bfloat16"):
            model = load_model("smollm2-135m", dtype=dtype)
            net = DecoderNet(model.model, linear=args.linear)
            cache = net.new_cache(1, 400)
            net(ids, cache, logits="none")
            def step(q):
                net(ids[:, :q], cache); cache.rollback(300)
            print(f"SmolLM2-135M step, {dtype} ({net.backend} linears, {cache.keys.dtype} cache): "
                  + ", ".join(f"{q} token(s) {median_ms(lambda: step(q), args.reps):.1f} ms" for q in (1, 4)))

if __name__ == "__main__": main()
