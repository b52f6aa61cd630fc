"""Mixture of experts vs a dense FFN with the same active parameters, on CPU: tokens per second.

    python tests/bench/bench_moe.py [--threads 1] [--batches 1 4 16] [--seq 256] [--reps 5] \\
        [--quick]

One FFN layer on (B, seq, d_model 256) inputs, with no attention around it, so that the table shows
the cost of routing and dispatch alone:
  dense   SwiGLU of width 1024 (3 x 256 x 1024 = 786k parameters, all active)
  moe     top-2 of 8 SwiGLU experts of width 512 (each token runs 2 x 3 x 256 x 512 = 786k
          parameters, plus the 2k-parameter router), token choice, dispatched through F.grouped_mm
          (model.py's path)
  loop    the same MoE with expert_linear replaced by a Python loop over the experts (the fallback)
fwd: forward only, under no_grad. fwd+bwd: forward and backward of y.square().mean() (and the MoE's
aux loss). Time: the best of --reps runs after a warm-up, the three layers interleaved so that a
busy machine slows them alike. dense/moe: dense tokens/s over moe tokens/s (the goal: at most 2).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import model  # noqa: E402
from model import GLU, Config, MoE  # noqa: E402

D_MODEL, N_EXPERT, TOP_K, EXPERT_WIDTH = 256, 8, 2, 512


def loop_expert_linear(x, w, b, counts):
    """model.expert_linear without the grouped matmul: one matmul per expert."""
    y = torch.cat([xe @ we.T for xe, we in zip(x.split(counts.tolist()), w.unbind(0))])
    return y if b is None else y + b.repeat_interleave(counts, dim=0)


def make(kind):
    cfg = Config(d_model=D_MODEL, n_head=4, ffn="glu", activation="silu", bias=False,
                 ffn_pattern=["moe"], n_expert=N_EXPERT, moe_top_k=TOP_K, moe_d_ff=EXPERT_WIDTH,
                 d_ff=TOP_K * EXPERT_WIDTH)
    torch.manual_seed(0)
    return GLU(cfg) if kind == "dense" else MoE(cfg)


def seconds(layer, x, backward):
    """Wall time of one forward (no_grad) or forward + backward."""
    t0 = time.perf_counter()
    if backward:
        y = layer(x)
        (y.square().mean() + (layer.aux_loss if isinstance(layer, MoE) else 0)).backward()
        layer.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            layer(x)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true",
                   help="batches 1 and 4, 2 reps: checks the script runs")
    args = p.parse_args()
    if args.quick:
        args.batches, args.reps = [1, 4], 2
    torch.set_num_threads(args.threads)
    grouped = model.expert_linear
    layers = {k: make("dense" if k == "dense" else "moe") for k in ("dense", "moe", "loop")}
    n_params = {k: sum(q.numel() for q in m.parameters()) for k, m in layers.items()}
    active = TOP_K * 3 * D_MODEL * EXPERT_WIDTH + N_EXPERT * D_MODEL
    print(f"torch {torch.__version__}, {args.threads} threads, seq {args.seq}, d_model {D_MODEL}; "
          f"parameters: dense {n_params['dense'] / 1e3:.0f}k, moe {n_params['moe'] / 1e3:.0f}k "
          f"({active / 1e3:.0f}k active)")
    print(f"{'pass':>8} {'tokens':>7} {'dense tok/s':>12} {'moe tok/s':>10} {'loop tok/s':>11} "
          f"{'dense/moe':>10}")
    for backward in (False, True):
        for B in args.batches:
            x = torch.randn(B, args.seq, D_MODEL, requires_grad=backward)
            best = dict.fromkeys(layers, float("inf"))
            for rep in range(args.reps + 1):                                    # rep 0 warms up
                for k, layer in layers.items():  # interleaved: load hits all alike
                    model.expert_linear = loop_expert_linear if k == "loop" else grouped
                    t = seconds(layer, x, backward)
                    best[k] = min(best[k], t) if rep else best[k]
            model.expert_linear = grouped
            rate = {k: B * args.seq / t for k, t in best.items()}
            print(f"{'fwd+bwd' if backward else 'fwd':>8} {B * args.seq:>7} {rate['dense']:>12.0f} "
                  f"{rate['moe']:>10.0f} {rate['loop']:>11.0f} "
                  f"{rate['dense'] / rate['moe']:>10.2f}")


if __name__ == "__main__":
    main()
