"""Decoding speed on CPU: our static KV cache against no cache, and against HF transformers'
generate.

    python tests/bench/bench_decode.py [--threads 2] [--new_tokens 256] [--reps 3] [--quick]

context  time per generated token after a prefill of `context` tokens (median of --steps tokens,
         best of --reps runs), for a small Llama-like model (d_model 256, 6 layers, 8 heads, 2 kv
         heads, SwiGLU 704, RoPE, vocab 8192):
           cache     one token through the static KV cache sized context + steps (nearly flat);
           cache 4k  the same with a cache of 4096 slots, most of them not yet written;
           no cache  a full forward over the whole sequence: what a token costs without a cache.
hf       ours vs HF LlamaForCausalLM.generate on the same random weights: hidden 512, 8 layers,
         8 heads, 2 kv heads, vocab 32000, the rest LlamaConfig's defaults (intermediate 11008,
         untied head), fp32, batch 1, greedy, --new_tokens after a 16-token prompt. The HF model is
         saved with save_pretrained and loaded with Transformer.from_pretrained; tokens/s is the
         best of --reps whole generate() calls (prefill included), and the generated tokens must be
         identical. "weights only" times nothing but the model's matrix-vector products for one
         token (F.linear over every Linear, the head included): the floor for a torch fp32 decoder
         at batch 1, which must read every weight once per token. "ours bf16" is the same model
         cast to bf16 (generate.py --dtype bf16): half the bytes to read.
Each timed section runs with torch.set_num_threads(--threads).
"""
import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model import Config, Transformer  # noqa: E402


def small_llama():
    torch.manual_seed(0)
    cfg = Config(vocab_size=8192, block_size=4096, n_layer=6, n_head=8, n_kv_head=2, d_model=256,
                 d_ff=704, norm="rmsnorm", position="rope", ffn="glu", activation="silu",
                 bias=False, tie_embeddings=False)
    return Transformer(cfg).eval()


@torch.no_grad()
def per_token_ms(model, context, steps, reps, slots=None):
    """ms of one cached decode step after a prefill of `context` tokens: the median over `steps`
    tokens, the best of `reps` runs (a load spike on a shared machine hits one run, not all)."""
    ids = torch.randint(0, model.config.vocab_size, (1, context + steps))
    best = float("inf")
    for _ in range(reps):
        cache = model.setup_cache(1, slots or context + steps)
        model(ids[:, :context], cache=cache, input_pos=torch.arange(context))
        times = []
        for t in range(context, context + steps):
            t0 = time.perf_counter()
            model(ids[:, t:t + 1], cache=cache, input_pos=torch.tensor([t]))
            times.append(time.perf_counter() - t0)
        best = min(best, statistics.median(times))
    return 1e3 * best


@torch.no_grad()
def weights_only_ms(model, reps):
    """One token's matrix-vector products alone: F.linear over every Linear weight, best of reps."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times[1:])


@torch.no_grad()
def full_forward_ms(model, context, reps):
    ids = torch.randint(0, model.config.vocab_size, (1, context + 1))
    model(ids)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def bench_context(args):
    model = small_llama()
    print(f"\n== per-token decode time (ms), small Llama-like model, {args.threads} threads")
    print(f"{'context':>8} {'cache':>9} {'cache 4k':>9} {'no cache':>9}")
    for context in args.contexts:
        print(f"{context:>8} {per_token_ms(model, context, args.steps, args.reps):>9.2f} "
              f"{per_token_ms(model, context, args.steps, args.reps, slots=4096):>9.2f} "
              f"{full_forward_ms(model, context, args.reps):>9.2f}")


def bench_hf(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=512, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=2,
                                      intermediate_size=args.intermediate)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Transformer.from_pretrained(d)
    x = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    # half the bytes per token: generate.py --dtype bf16
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    runs = {"ours": lambda: ours.generate(x, n, temperature=0),
            "ours bf16": lambda: ours_bf16.generate(x, n, temperature=0),
            "HF": lambda: hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)}
    best, out = {k: float("inf") for k in runs}, {}
    with torch.no_grad():
        for _ in range(args.reps):  # interleaved, so a load spike on the shared machine hits both
            for name, run in runs.items():
                t0 = time.perf_counter()
                out[name] = run()
                best[name] = min(best[name], time.perf_counter() - t0)
    floor = weights_only_ms(ours, 10 * args.reps)
    same = torch.equal(out["ours"], out["HF"])
    print(f"\n== greedy generate, Llama hidden 512 x 8 layers, 8/2 heads, intermediate "
          f"{args.intermediate}, vocab 32000, fp32, batch 1, 16 + {n} tokens, {args.threads} "
          f"threads")
    for name in runs:
        print(f"{name:>9}: {n / best[name]:7.1f} tokens/s  ({1e3 * best[name] / n:.2f} ms/token)")
    print(f"weights only: {1e3 / floor:7.1f} tokens/s  ({floor:.2f} ms/token)")
    distinct = len(set(out["HF"][0, 16:].tolist()))
    print(f"ours / HF: {best['HF'] / best['ours']:.2f}x "
          f"(bf16: {best['HF'] / best['ours bf16']:.2f}x); "
          f"fp32 tokens identical: {same} ({distinct} distinct of {n})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per context")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=11008,
                   help="Llama FFN width (LlamaConfig's default)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", choices=("context", "hf"))
    p.add_argument("--quick", action="store_true", help="contexts 64 and 256, 32 new tokens, 1 rep")
    args = p.parse_args()
    if args.quick:
        args.contexts, args.steps, args.new_tokens, args.reps = [64, 256], 8, 32, 1
    torch.set_num_threads(args.threads)
    if args.only != "hf":
        bench_context(args)
    if args.only != "context":
        bench_hf(args)


if __name__ == "__main__":
    main()
