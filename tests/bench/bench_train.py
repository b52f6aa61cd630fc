"""train.py on CPU: the shakespeare_char run against nanoGPT's recipe, and what gradient
checkpointing costs and saves.

    python tests/bench/bench_train.py shakespeare tinyshakespeare.txt [--threads 2] [--quick]
    python tests/bench/bench_train.py shakespeare tinyshakespeare.txt --together --threads 1  # busy
    python tests/bench/bench_train.py checkpointing [--threads 2] [--quick] [--before REV]

shakespeare    runs train.py twice on the text, one run after the other (or with --together both
               at once), each in its own process:
               - "nanoGPT recipe": nanoGPT's shakespeare_char CPU run as its README gives it (4
                 layers, 4 heads, width 128, block 64, batch 12, 2000 iterations, dropout 0) with
                 its architecture (LayerNorm without bias, learned positions, GELU MLP, no biases,
                 tied head) and its hyperparameters (lr 1e-3 -> 1e-4, warmup 100, beta2 0.99,
                 weight decay 0.1, clip 1.0); nanoGPT itself reports val loss 1.886 there;
               - configs/shakespeare_char.yaml: the same budget with RMSNorm, RoPE, SwiGLU, one KV
                 head and tuned AdamW.
               Both go through the same train.py loop, so ms/iter compares the models, not two
               codebases. (nanoGPT's own code steps about 5% slower than its recipe here: it runs
               AdamW's per-tensor loop on CPU where train.py uses the fused kernel, and fuses q, k,
               v into one matrix.) Reported: final val loss (eval_iters batches of the val split,
               the same batches for both), the median ms/iter over the log windows (evaluation
               excluded) and the wall time.
checkpointing  one training step (forward, backward, AdamW) of a GPT-2-small-width model (d_model
               768, 12 heads, --layers layers, block 512, batch --batch, vocab 4096 so that the
               logits do not dominate) with and without grad_checkpoint, with this model.py and
               with the one of git revision --before (default: the revision before the fused LM
               loss and per-branch checkpointing). Each case runs in a fresh process, after a
               64-token warm-up step that allocates the weights' gradients and AdamW's state.
               Peak MB: the most bytes of tensors alive at once during the step beyond those (the
               activations and temporaries), counted exactly by a dispatch mode that follows each
               new tensor storage until it is freed (LiveBytes), independent of the allocator and
               of other processes. RSS MB: ru_maxrss after the step minus after the warm-up, what
               the OS saw; glibc keeps freed heap blocks mapped for reuse, so it overstates the
               live peak (MALLOC_MMAP_THRESHOLD_=131072 in the environment brings the two close).
               Tokens/s: the best of --reps steps, timed without the dispatch mode.
"""
import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[2]
BEFORE = "d19ce18"  # full (B, T, V) logits into F.cross_entropy, one checkpoint per block

NANOGPT = ["--norm=layernorm", "--norm_bias=false", "--position=learned", "--ffn=mlp",
           "--activation=gelu", "--n_kv_head=null", "--d_ff=null", "--bias=false", "--lr=1e-3",
           "--min_lr=1e-4", "--warmup_iters=100", "--beta2=0.99", "--weight_decay=0.1",
           "--grad_clip=1.0"]
RUNS = {"nanoGPT recipe": NANOGPT, "shakespeare_char.yaml": []}


def shakespeare(args):
    order = "both runs at once" if args.together else "one run after the other"
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s) per run, {order}; "
          f"data {args.text}")
    print(f"{'run':<22} | {'val loss':>8} | {'ms/iter':>7} | {'wall s':>6}")
    extra = ["--max_iters=200", "--eval_interval=100", "--log_interval=20"] if args.quick else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        procs, wall = {}, {}
        for name, overrides in RUNS.items():
            out = Path(tmp) / name.split()[0]
            cmd = [sys.executable, "train.py", "configs/shakespeare_char.yaml",
                   f"--data={args.text}", f"--out_dir={out}", "--sample_tokens=0", *overrides,
                   *extra]
            with open(f"{out}.err", "w") as err:
                procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                                stderr=err), time.time())
            while len(wall) < len(procs) and (not args.together or len(procs) == len(RUNS)):
                for n, (proc, t0) in procs.items():
                    if n not in wall and proc.poll() is not None:
                        wall[n] = time.time() - t0
                time.sleep(0.1)
        for name, (proc, _) in procs.items():
            out = Path(tmp) / name.split()[0]
            if proc.returncode:
                last = Path(f"{out}.err").read_text().strip().splitlines()[-1]
                print(f"{name:<22} | {last[:60]}")
                continue
            lines = (out / "metrics.jsonl").read_text().splitlines()
            metrics = [json.loads(line) for line in lines]
            val = [m["val_loss"] for m in metrics if "val_loss" in m][-1]
            ms = statistics.median(m["ms_per_iter"] for m in metrics
                                   if "ms_per_iter" in m and m["iter"] > 0)
            print(f"{name:<22} | {val:>8.4f} | {ms:>7.1f} | {wall[name]:>6.0f}", flush=True)


def max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024         # Linux: KiB


class LiveBytes(TorchDispatchMode):
    """While active: `peak`, the most bytes of tensor storages alive at once among those created
    inside (storages of `existing` tensors do not count). Each op's outputs are followed to the
    freeing of their storage (views share it; in-place ops make none)."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self.seen = {t.untyped_storage().data_ptr() for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in self.seen:
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            self.seen.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self.free, key, size)
        return out

    def free(self, key, size):
        self.seen.discard(key)
        self.live -= size


def checkpoint_case(args):
    """One configuration, in this (fresh) process: {"tok_s", "peak_mb", "rss_mb"}."""
    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.model_dir)
    model_py = importlib.import_module("model")
    torch.manual_seed(0)
    cfg = model_py.Config(vocab_size=4096, block_size=args.block, n_layer=args.layers, n_head=12,
                          d_model=args.d_model, norm="rmsnorm", position="rope", ffn="glu",
                          activation="silu", bias=False,
                          grad_checkpoint=bool(args.grad_checkpoint))
    model = model_py.Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(B, T):
        ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
        t0 = time.perf_counter()
        model(ids[:, :-1], ids[:, 1:].contiguous()).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)                 # keep the gradients: not activations
        return time.perf_counter() - t0

    step(1, 64)                                          # allocates gradients and AdamW state
    base = max_rss_mb()
    best = min(step(args.batch, args.block) for _ in range(args.reps))
    rss = max_rss_mb() - base
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    with LiveBytes([*model.parameters(), *(p.grad for p in model.parameters()), *state]) as live:
        step(args.batch, args.block)
    print(json.dumps({"tok_s": args.batch * args.block / best, "peak_mb": live.peak / 2 ** 20,
                      "rss_mb": rss}))


def checkpointing(args):
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s); d_model {args.d_model}, "
          f"{args.layers} layers, 12 heads, block {args.block}, batch {args.batch}, "
          f"RMSNorm/RoPE/SwiGLU, vocab 4096")
    print(f"{'model.py':<16} | {'grad_checkpoint':<15} | {'peak MB':>7} | {'RSS MB':>7} | "
          f"{'tokens/s':>8}")
    rows = {}
    with tempfile.TemporaryDirectory() as before:
        old = subprocess.run(["git", "show", f"{args.before}:model.py"], cwd=ROOT,
                             capture_output=True, text=True)
        if old.returncode:
            print(f"(no 'before' rows: git show {args.before}:model.py failed)")
        Path(before, "model.py").write_text(old.stdout)
        for version, where in (("before", before), ("this", str(ROOT))):
            for on in (0, 1):
                if version == "before" and old.returncode:
                    continue
                sizes = ("threads", "d_model", "layers", "block", "batch", "reps")
                cmd = [sys.executable, __file__, "checkpointing", "--worker",
                       f"--grad_checkpoint={on}", f"--model_dir={where}",
                       *(f"--{k}={getattr(args, k)}" for k in sizes)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                name = f"{version} {args.before}" if version == "before" else version
                if res.returncode:
                    print(f"{name:<16} | {bool(on)!s:<15} | "
                          f"{res.stderr.strip().splitlines()[-1][:60]}")
                    return
                r = rows[version, on] = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"{name:<16} | {bool(on)!s:<15} | {r['peak_mb']:>7.0f} | "
                      f"{r['rss_mb']:>7.0f} | {r['tok_s']:>8.0f}", flush=True)
    for version in ("before", "this"):
        if (version, 1) in rows:
            off, on = rows[version, 0], rows[version, 1]
            print(f"{version}: checkpointing keeps x{on['peak_mb'] / off['peak_mb']:.2f} of the "
                  f"peak activation memory (RSS x{on['rss_mb'] / off['rss_mb']:.2f}) at "
                  f"x{off['tok_s'] / on['tok_s']:.2f} time per token")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bench", choices=["shakespeare", "checkpointing"])
    p.add_argument("text", nargs="?", help="shakespeare: the tiny-shakespeare text file")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true",
                   help="shakespeare: 200 iterations; checkpointing: a smaller model")
    p.add_argument("--together", action="store_true",
                   help="shakespeare: start both runs at once (use --threads 1): on a shared "
                        "machine both then see the same load, which makes their ms/iter comparable")
    p.add_argument("--d_model", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--before", default=BEFORE, help="checkpointing: the git revision whose "
                   "model.py the 'before' rows run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--grad_checkpoint", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model_dir", default=str(ROOT), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bench == "shakespeare":
        if not args.text or not Path(args.text).is_file():
            p.error("shakespeare needs the tiny-shakespeare text file as its second argument")
        args.text = str(Path(args.text).resolve())
        return shakespeare(args)
    if args.quick and not args.worker:
        args.d_model, args.layers, args.block, args.batch = 384, 2, 256, 2
    return checkpoint_case(args) if args.worker else checkpointing(args)


if __name__ == "__main__":
    main()
