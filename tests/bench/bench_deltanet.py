"""Softmax attention vs Gated DeltaNet on CPU: training cost and decoding cost against sequence
length.

    python tests/bench/bench_deltanet.py [--threads 1] [--lengths 1024 4096 16384] \\
        [--contexts 64 1024 4096]

Two models that differ only in the token mixer (d_model 256, --layers layers, pre-norm RMSNorm,
SwiGLU, RoPE; softmax: 4 heads of 64; DeltaNet: 4 key and 4 value heads of 64, conv 4, chunk 64):
  train   time and peak memory of one forward + backward of a (1, T) batch with targets. Each case
          runs in a fresh subprocess: the peak is ru_maxrss after the step minus ru_maxrss after a
          128-token warm-up step (tracemalloc does not see torch's allocations). Time: the best of
          --reps steps.
  decode  time per generated token after a prefill of `context` tokens, through the model's cache
          (softmax: the static KV cache, which attends over all of its slots; DeltaNet: the O(1)
          state of (B, H, dk, dv) plus the conv window), median of --steps tokens.
Softmax uses torch's fused SDPA (a flash kernel on CPU: O(T) memory, O(T^2) time); a plain
materialised T x T softmax would need 4 heads x T^2 x 4 bytes = 4.3 GB per tensor at 16k.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model import Config, Transformer  # noqa: E402

VOCAB = 256


def config(mixer, layers, block_size):
    return Config(vocab_size=VOCAB, block_size=block_size, n_layer=layers, n_head=4, d_model=256,
                  norm="rmsnorm", position="rope", ffn="glu", activation="silu", bias=False,
                  attention_type={"softmax": "softmax", "deltanet": "linear"}[mixer],
                  dn_heads=4, dn_head_dim=64, dn_chunk=64)


def max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024         # Linux: KiB


def train_case(mixer, T, layers, reps):
    torch.manual_seed(0)
    model = Transformer(config(mixer, layers, T)).train()

    def step(n):
        ids = torch.randint(0, VOCAB, (1, n + 1))
        t0 = time.perf_counter()
        loss = model(ids[:, :-1], targets=ids[:, 1:].contiguous()).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(128)  # warm-up, allocator, grads
    base = max_rss_mb()
    times = [step(T) for _ in range(reps)]
    return {"time_s": min(times), "peak_mb": max_rss_mb() - base}


@torch.no_grad()
def decode_case(mixer, context, layers, steps):
    torch.manual_seed(0)
    model = Transformer(config(mixer, layers, context + steps + 1)).eval()
    cache = model.setup_cache(1, context + steps + 1)
    ids = torch.randint(0, VOCAB, (1, context + steps + 1))
    model(ids[:, :context], cache=cache, input_pos=torch.arange(context))     # prefill
    times = []
    for t in range(context, context + steps):
        t0 = time.perf_counter()
        model(ids[:, t:t + 1], cache=cache, input_pos=torch.tensor([t]))
        times.append(time.perf_counter() - t0)
    return {"ms_per_token": 1e3 * sorted(times)[len(times) // 2]}


def run_worker(args):
    torch.set_num_threads(args.threads)
    if args.worker == "train":
        out = train_case(args.mixer, args.n, args.layers, args.reps)
    else:
        out = decode_case(args.mixer, args.n, args.layers, args.steps)
    print(json.dumps(out))


def spawn(kind, mixer, n, args):
    """One case in a fresh interpreter (so ru_maxrss is this case's alone); None if it fails or runs
    out."""
    cmd = [sys.executable, __file__, "--worker", kind, "--mixer", mixer, "--n", str(n),
           "--threads", str(args.threads), "--layers", str(args.layers), "--reps", str(args.reps),
           "--steps", str(args.steps)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.case_timeout}s"}
    if res.returncode:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 1024, 4096])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=2,
                   help="forward+backward steps per training case (best kept)")
    p.add_argument("--steps", type=int, default=32,
                   help="decoded tokens per decoding case (median kept)")
    p.add_argument("--case-timeout", type=int, default=240)
    p.add_argument("--worker", choices=["train", "decode"], help=argparse.SUPPRESS)
    p.add_argument("--mixer", choices=["softmax", "deltanet"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return run_worker(args)

    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), d_model 256, {args.layers} "
          f"layers, batch 1")
    print("\nforward + backward")
    print(f"{'T':>6} | {'softmax s':>9} {'MB':>7} | {'deltanet s':>10} {'MB':>7} | {'faster':>8}")
    crossover = None
    for T in args.lengths:
        s, d = spawn("train", "softmax", T, args), spawn("train", "deltanet", T, args)
        cells = []
        for r in (s, d):
            ok = "error" not in r
            cells += [f"{r['time_s']:.3f}", f"{r['peak_mb']:.0f}"] if ok else [r["error"], "-"]
        both = "error" not in s and "error" not in d
        winner = ("deltanet" if d["time_s"] < s["time_s"] else "softmax") if both else "-"
        if winner == "deltanet" and crossover is None:
            crossover = T
        print(f"{T:>6} | {cells[0]:>9} {cells[1]:>7} | {cells[2]:>10} {cells[3]:>7} | {winner:>8}",
              flush=True)
    print(f"DeltaNet is faster from T = {crossover}" if crossover
          else "DeltaNet was not faster at these lengths")

    print("\ndecode, ms per token after a prefill of `context` tokens")
    print(f"{'context':>7} | {'softmax':>8} | {'deltanet':>8}")
    for n in args.contexts:
        s, d = spawn("decode", "softmax", n, args), spawn("decode", "deltanet", n, args)
        cells = [f"{r['ms_per_token']:.2f}" if "error" not in r else r["error"] for r in (s, d)]
        print(f"{n:>7} | {cells[0]:>8} | {cells[1]:>8}", flush=True)


if __name__ == "__main__":
    main()
