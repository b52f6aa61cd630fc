"""Fine-tuning throughput: train.py's step on a HF Llama-style directory (--init_from) against plain
PyTorch training of the same HF model, in one process, alternating step by step.

    python tests/bench/bench_finetune.py [--threads 2] [--steps 20] [--hidden 256 --layers 4 ...]
    python tests/bench/bench_finetune.py --device cuda --dtype bf16 --hidden 1024 --layers 8

A small random LlamaForCausalLM is saved with save_pretrained; both sides load that directory:
- ours: what train.py --init_from=DIR builds (train.load_init, the model config and weights of the
  directory), stepped as train.py's loop steps: forward_backward (forward, loss, backward), gradient
  clipping at 1.0, train.make_optimizers' AdamW (fused, weight decay on matrices), zero_grad;
- HF: transformers' LlamaForCausalLM.from_pretrained(DIR) (its default attention, sdpa), the same
  batch, cross-entropy over its logits, backward, clipping at 1.0, torch.optim.AdamW as a plain
  loop writes it (the default implementation) and, as a second row, with fused=True (ours' kernel:
  the difference between the two HF rows is the optimizer's, the rest is the model's).
Same batch (random token windows), same dtype (fp32, or --dtype bf16/fp16 autocast on both), same
hyperparameters. Each step is timed alone (a device sync after it); the first --warmup steps are
dropped; reported: the median tokens/s and ms/step of each side, and the first step's loss on both
(equal up to fp32 rounding: the same model on the same batch).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from model import Config, Transformer  # noqa: E402

LR, WD, BETAS, CLIP = 1e-4, 0.1, (0.9, 0.95), 1.0


def hf_directory(args, path):
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.block,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def ours(args, path, env):
    """train.py --init_from=path: the model, its optimizer, and one step of the loop's body."""
    init = train.load_init(path)
    model = Transformer(Config.from_dict(init.config)).to(env.device)
    model.load_state_dict(init.model)
    model.train()
    tc = train.TrainConfig(batch_size=args.batch, lr=LR, weight_decay=WD, beta1=BETAS[0],
                           beta2=BETAS[1], grad_clip=CLIP, device=args.device, dtype=args.dtype)
    optimizers = train.make_optimizers(model, tc, env)
    scaler = torch.amp.GradScaler(env.device_type, enabled=env.dtype == "fp16")

    def step(batch):
        loss = train.forward_backward(model, [[batch]], tc, env, scaler)
        lossf = loss.item()                      # the loop's one sync per step
        for opt in optimizers:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return lossf
    return step


def hf_plain(args, path, env, fused):
    """transformers' model trained by a plain PyTorch loop."""
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(path).to(env.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD,
                            fused=fused or None)
    scaler = torch.amp.GradScaler(env.device_type, enabled=env.dtype == "fp16")

    def step(batch):
        with env.autocast():
            logits = model(input_ids=batch["input_ids"]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())
        scaler.scale(loss).backward()
        lossf = loss.item()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return lossf
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="steps per side not timed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = train.Env(0, 1, args.device, args.dtype, False)
    sync = torch.cuda.synchronize if env.device_type == "cuda" else lambda: None
    with tempfile.TemporaryDirectory() as tmp:
        hf_directory(args, tmp)
        sides = {"ours (train.py step)": ours(args, tmp, env),
                 "HF + torch AdamW": hf_plain(args, tmp, env, fused=False),
                 "HF + fused AdamW": hf_plain(args, tmp, env, fused=True)}
        gen = torch.Generator().manual_seed(0)
        times = {name: [] for name in sides}
        first = {}
        for i in range(args.warmup + args.steps):
            x = torch.randint(args.vocab, (args.batch, args.block + 1), generator=gen)
            batch = {"input_ids": x[:, :-1].to(args.device), "targets": x[:, 1:].to(args.device)}
            for name, step in sides.items():   # alternating: the machine's drift hits all alike
                sync()
                t0 = time.perf_counter()
                loss = step(batch)
                sync()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
                first.setdefault(name, loss)
    tokens = args.batch * args.block
    print(f"torch {torch.__version__}, {args.device} {args.dtype}, {args.threads} thread(s); "
          f"Llama hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
          f"intermediate {args.intermediate}, vocab {args.vocab}; batch {args.batch} x "
          f"{args.block} tokens; median of {args.steps} steps")
    print(f"{'side':<22} | {'tok/s':>9} | {'ms/step':>8} | first loss")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"{name:<22} | {tokens / med:>9,.0f} | {1000 * med:>8.1f} | {first[name]:.6f}")


if __name__ == "__main__":
    main()
