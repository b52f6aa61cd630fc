"""Decoding speed: our static KV cache against no cache, and our decoding against HF transformers'
generate on the same weights; int8 quality on a trained model; the GPU path when CUDA is there.

    python tests/bench/bench_decode.py [--threads 2] [--reps 3] [--quick]
    python tests/bench/bench_decode.py --only hf                       # the issue's table alone
    python tests/bench/bench_decode.py --only quality --text tinyshakespeare.txt
    python tests/bench/bench_decode.py --only gpu                      # needs CUDA

context  time per generated token after a prefill of `context` tokens (median of --steps tokens,
         best of --reps runs), for a small Llama-like model (d_model 256, 6 layers, 8 heads, 2 kv
         heads, SwiGLU 704, RoPE, vocab 8192):
           cache     one token through the static KV cache sized context + steps (nearly flat);
           cache 4k  the same with a cache of 4096 slots, most of them not yet written;
           no cache  a full forward over the whole sequence: what a token costs without a cache.
hf       the issue's table, all rows measured side by side in one process (interleaved, best of
         --reps whole generate() calls, prefill included): a random HF LlamaForCausalLM (hidden
         512, 8 layers, 8 heads, 2 kv heads, vocab 32000, untied head; intermediate 1408 and
         11008), saved with save_pretrained and loaded with Transformer.from_pretrained; fp32,
         batch 1, greedy, --new_tokens after a 16-token prompt, --threads threads.
           ours fp32          model.generate
           ours fp32 compiled model.generate(compile=True) (the one-token step compiled once,
                              before timing)
           ours int8          decoding.quantize(model, "int8") (Linears of >= 512k weights: the
                              MLP and the head), then model.generate (and compiled)
           speculative        decoding.speculative_generate: the fp32 model checks drafts of
                              --draft_tokens tokens from its own int8 copy; its output is the fp32
                              model's greedy text, token for token
           HF generate        LlamaForCausalLM.generate (its default dynamic cache)
           weights-only floor nothing but the fp32 model's matrix-vector products for one token
                              (F.linear over its 57 Linear weights): what any fp32 decoder must
                              spend reading its weights at batch 1
         Each row reports tokens/s, its speed over HF's and its ms per token over the floor's;
         "same" says whether its tokens equal ours fp32 (int8 may differ: other arithmetic).
quality  int8's cost in loss: train.py trains configs/shakespeare_char.yaml on --text (2000
         iterations), then the val split's loss (every val window, batch 64) in fp32 and with
         every Linear int8 (min_weights=0; at its default size threshold nothing of this small
         model would be quantized). Also trains a 1-layer draft on the same text and reports its
         acceptance rate and speed-up as the speculative draft of the trained model.
gpu      (CUDA only) bf16, the issue's two models and a 1.1B Llama (hidden 2048, 16 layers,
         intermediate 8192): ours with the compiled static-cache step (CUDA graphs) against HF
         generate with its static cache compiled, tokens/s, and the fraction of HBM bandwidth
         reached: the bytes a step reads (matrices, the head included, and the static KV cache)
         x tokens/s over the bandwidth of a device-to-device copy.
"""
import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from decoding import quantize, speculative_generate  # noqa: E402
from model import Config, Transformer, from_checkpoint, load_checkpoint  # noqa: E402


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
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device)
              for w in weights}
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
        if w.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times[1:]), len(weights)


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


def hf_llama(intermediate, hidden=512, layers=8, heads=8, kv_heads=2, dtype=torch.float32,
             device="cpu"):
    """A random HF Llama and the same weights through save_pretrained -> our from_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      intermediate_size=intermediate)
    hf = LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Transformer.from_pretrained(d)
    return hf.to(device, dtype), ours.to(device, dtype).eval()


def timed(runs, reps, sync=lambda: None):
    """Best seconds of each run over reps rounds, interleaved (a load spike on a shared machine
    hits one run of a round, not one row), and each run's last output."""
    best, out = {k: float("inf") for k in runs}, {}
    with torch.no_grad():
        for _ in range(reps):
            for name, run in runs.items():
                t0 = time.perf_counter()
                out[name] = run()
                sync()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best, out


def hf_greedy(hf, x, n):
    return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, eos_token_id=None, pad_token_id=0)


def bench_hf(args):
    for inter in args.intermediates:
        bench_hf_size(args, inter)


def bench_hf_size(args, inter):
    hf, ours = hf_llama(inter)
    x = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    int8 = quantize(copy.deepcopy(ours), "int8")
    stats = {}
    runs = {"ours fp32": lambda: ours.generate(x, n, temperature=0),
            "ours fp32 compiled": lambda: ours.generate(x, n, temperature=0, compile=True),
            "ours int8": lambda: int8.generate(x, n, temperature=0),
            "ours int8 compiled": lambda: int8.generate(x, n, temperature=0, compile=True),
            "speculative": lambda: speculative_generate(ours, int8, x, n, args.draft_tokens,
                                                        temperature=0, stats=stats),
            "HF generate": lambda: hf_greedy(hf, x, n)}
    compiled = [name for name in runs if name.endswith("compiled")]
    for name in compiled if args.no_compile else ():
        del runs[name]
    with torch.no_grad():
        t0 = time.perf_counter()
        for name in compiled if not args.no_compile else ():
            runs[name]()                                        # compiled before timing
        compile_s = time.perf_counter() - t0
    best, out = timed(runs, args.reps)
    floor, n_weights = weights_only_ms(ours, 10 * args.reps)
    print(f"\n== greedy generate, Llama hidden 512 x 8 layers, 8/2 heads, intermediate {inter}, "
          f"vocab 32000, fp32, batch 1, 16 + {n} tokens, {args.threads} threads")
    print(f"{'':>20} {'tokens/s':>9} {'ms/token':>9} {'x HF':>6} {'x floor':>8}  same")
    hf_s = best["HF generate"]
    for name in runs:
        ms = 1e3 * best[name] / n
        same = torch.equal(out[name], out["ours fp32"])
        print(f"{name:>20} {n / best[name]:9.1f} {ms:9.2f} {hf_s / best[name]:6.2f} "
              f"{ms / floor:8.2f}  {same}")
    print(f"{'weights-only floor':>20} {1e3 / floor:9.1f} {floor:9.2f} "
          f"{hf_s / n * 1e3 / floor:6.2f} {1.0:8.2f}  ({n_weights} matvecs)")
    print(f"speculative: {stats['accepted']} of {stats['drafted']} drafts accepted "
          f"({stats['accepted'] / stats['drafted']:.0%}), {stats['rounds']} rounds, "
          f"k={args.draft_tokens}; compiling took {compile_s:.0f} s (once per process)")
    distinct = len(set(out["HF generate"][0, 16:].tolist()))
    print(f"HF tokens == ours fp32: {torch.equal(out['HF generate'], out['ours fp32'])} "
          f"({distinct} distinct of {n})")


def train(text, out_dir, *overrides):
    cmd = [sys.executable, "train.py", "configs/shakespeare_char.yaml", f"--data={text}",
           f"--out_dir={out_dir}", "--sample_tokens=0", "--overwrite=true", *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return from_checkpoint(load_checkpoint(Path(out_dir) / "ckpt.pt")).eval()


@torch.no_grad()
def val_loss(model, val, T=64, batch=64):
    windows = val[:(len(val) - 1) // T * T + 1]
    xs, ys = windows[:-1].view(-1, T), windows[1:].view(-1, T)
    losses = [model(xs[i:i + batch], targets=ys[i:i + batch]).loss.item() * len(xs[i:i + batch])
              for i in range(0, len(xs), batch)]
    return sum(losses) / len(xs)


def bench_quality(args):
    from data.prepare import load_tokens, prepare
    with tempfile.TemporaryDirectory() as tmp:
        iters = ["--max_iters=300", "--eval_interval=300"] if args.quick else []
        model = train(args.text, f"{tmp}/target", *iters)
        draft = train(args.text, f"{tmp}/draft", "--n_layer=1", "--d_model=64", "--n_head=2",
                      "--d_ff=112", *iters)
        meta = prepare(args.text, f"{tmp}/data", "char")
        val = load_tokens(Path(tmp) / "data" / "val.bin", meta["dtype"]).long()
    int8 = quantize(copy.deepcopy(model), "int8", min_weights=0)
    default = quantize(copy.deepcopy(model), "int8")
    fp, q = val_loss(model, val), val_loss(int8, val)
    n_int8 = sum(type(m).__name__ == "DynamicInt8Linear" for m in default.modules())
    print(f"\n== int8 quality, configs/shakespeare_char.yaml trained on {args.text}")
    print(f"val loss fp32 {fp:.4f}, every Linear int8 {q:.4f}: change {q - fp:+.4f} "
          f"(bound 0.02); at the default size threshold {n_int8} Linears are int8")
    x = val[None, :16]
    n = args.new_tokens
    stats = {}
    best, out = timed({"plain": lambda: model.generate(x, n, temperature=0),
                       "speculative": lambda: speculative_generate(
                           model, draft, x, n, args.draft_tokens, temperature=0, stats=stats)},
                      args.reps)
    print(f"speculative with a 1-layer draft trained on the same text (k={args.draft_tokens}): "
          f"{stats['accepted'] / stats['drafted']:.0%} of drafts accepted, "
          f"{best['plain'] / best['speculative']:.2f}x plain greedy "
          f"(tokens identical: {torch.equal(out['plain'], out['speculative'])})")


def bench_gpu(args):
    """bf16 on CUDA: the compiled static-cache step (CUDA graphs) against HF's static cache."""
    if not torch.cuda.is_available():
        print("\n== gpu: no CUDA device here; skipped")
        return
    sync = torch.cuda.synchronize
    big = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")        # 256 MiB
    copy_best = min(copy_seconds(big, sync) for _ in range(5))
    bandwidth = 2 * big.numel() / copy_best                             # read + write, bytes/s
    print(f"\n== gpu: {torch.cuda.get_device_name()}, bf16, batch 1, greedy, 16 + "
          f"{args.new_tokens} tokens; device copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'model':>16} {'ours tok/s':>11} {'HF tok/s':>9} {'x HF':>6} {'HBM ours':>9} "
          f"{'HBM HF':>7}  same")
    sizes = [(1408, 512, 8, 8, 2), (11008, 512, 8, 8, 2), (8192, 2048, 16, 32, 8)]
    for size in sizes:
        bench_gpu_size(args, bandwidth, *size)
        torch.cuda.empty_cache()


def bench_gpu_size(args, bandwidth, inter, hidden, layers, heads, kv):
    hf, ours = hf_llama(inter, hidden, layers, heads, kv, torch.bfloat16, "cuda")
    x = torch.randint(0, 32000, (1, 16), device="cuda",
                      generator=torch.Generator("cuda").manual_seed(0))
    n = args.new_tokens
    hf.generation_config.cache_implementation = "static"
    hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    runs = {"ours": lambda: ours.generate(x, n, temperature=0, compile=True),
            "HF": lambda: hf_greedy(hf, x, n)}
    timed(runs, 2, torch.cuda.synchronize)                      # compile, record the graphs
    best, out = timed(runs, args.reps, torch.cuda.synchronize)
    # bytes a step must read: every matrix (the head's too, not the embedding table: one row of
    # it) and the static cache's keys and values (all 16 + n slots)
    cfg = ours.config
    weights = sum(m.weight.numel() for m in ours.modules() if isinstance(m, torch.nn.Linear))
    cache = 2 * cfg.n_layer * cfg.kv_heads * cfg.hs * (16 + n)
    hbm = {k: 2 * (weights + cache) * n / best[k] / bandwidth for k in runs}      # bf16: 2 bytes
    print(f"{f'{hidden}/{inter}':>16} {n / best['ours']:11.1f} {n / best['HF']:9.1f} "
          f"{best['HF'] / best['ours']:6.2f} {hbm['ours']:9.0%} {hbm['HF']:7.0%}  "
          f"{torch.equal(out['ours'], out['HF'])}")


def copy_seconds(t, sync):
    dst = torch.empty_like(t)
    sync()
    t0 = time.perf_counter()
    dst.copy_(t)
    sync()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per context")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--intermediates", type=int, nargs="+", default=[1408, 11008],
                   help="Llama FFN widths (11008: LlamaConfig's default)")
    p.add_argument("--draft_tokens", type=int, default=4, help="speculative: tokens per draft")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--text", help="quality: the text to train shakespeare_char on")
    p.add_argument("--no_compile", action="store_true", help="hf: skip the compiled row")
    p.add_argument("--only", choices=("context", "hf", "quality", "gpu"))
    p.add_argument("--quick", action="store_true", help="contexts 64 and 256, 32 new tokens, 1 "
                   "rep, 300 training iterations")
    args = p.parse_args()
    if args.quick:
        args.contexts, args.steps, args.new_tokens, args.reps = [64, 256], 8, 32, 1
    torch.set_num_threads(args.threads)
    sections = {"context": bench_context, "hf": bench_hf, "quality": bench_quality,
                "gpu": bench_gpu}
    for name, run in sections.items():
        if args.only in (None, name) and (name != "quality" or args.text):
            run(args)


if __name__ == "__main__":
    main()
