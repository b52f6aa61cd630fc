"""Train a model.py Transformer on text: nanoGPT's train.py, with typed configs instead of exec.

  python train.py                                          # configs/tiny.yaml on the stdlib corpus, CPU
  python train.py configs/shakespeare_char.yaml --data=shakespeare
  python train.py --data=my.txt --tokenizer=bpe --max_iters=5000 --n_layer=6
  python train.py --resume --out_dir=out --max_iters=4000  # continue exactly where out/ckpt.pt stopped
  torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_small.yaml --data=my.txt --tokenizer=gpt2

Arguments: at most one YAML file, then --key=value overrides (a bare --flag means true). Keys are the
fields of TrainConfig below or of model.Config; one YAML may hold both. Values are checked against the
field types. Without a YAML file (and without --resume) the model is configs/tiny.yaml.
Writes to out_dir: ckpt.pt (last; resumable), ckpt_best.pt (weights of the best val loss),
metrics.jsonl, data/ (the tokenised corpus) and, with --export, model_fp16.pt / model_bf16.pt.
"""
import dataclasses
import difflib
import json
import math
import os
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data.prepare import CORPORA, get_tokenizer, load_tokens, prepare
from model import Config, Transformer, check_choice, check_type, load_checkpoint, save_checkpoint

DEFAULT_MODEL = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESUMABLE = ("grad_checkpoint", "dropout", "drop_path", "state_dropout")  # model keys no weight depends on
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}  # dense bf16, for MFU


@dataclass
class TrainConfig:
    """Everything about a run except the architecture (that is model.Config)."""

    # data
    data: str = "stdlib"              # stdlib | shakespeare | a UTF-8 text file | a directory made by data/prepare.py
    tokenizer: str = "char"           # char | byte | bpe | a tiktoken encoding (gpt2, cl100k_base, ...)
    bpe_vocab_size: int = 1024        # vocabulary trained on the text when tokenizer is bpe
    # output, evaluation, sampling
    out_dir: str = "out"
    resume: bool = False              # continue out_dir/ckpt.pt: weights, optimizer, scaler, iteration, RNG, data
    eval_interval: int = 250
    eval_iters: int = 20              # batches per split per evaluation
    log_interval: int = 10
    sample_tokens: int = 256          # sampled after training (absolute positions: at most block_size - prompt)
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8
    export: str = "none"              # none | fp16 | bf16: also write out_dir/model_<export>.pt, weights only
    # batch: tokens per step = batch_size * grad_accum * world size * block_size
    batch_size: int = 16
    grad_accum: int = 1
    max_iters: int = 2000
    # optimizer and schedule
    optimizer: str = "adamw"          # adamw | muon (torch.optim.Muon on hidden matrices, AdamW on the rest)
    lr: float = 1e-3                  # peak; Muon uses it too (adjust_lr_fn="match_rms_adamw")
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # cosine reaches min_lr here; None -> max_iters
    weight_decay: float = 0.1         # matrices only; norms, biases and gains are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0            # max global grad norm; 0 disables
    # system
    device: str = "auto"              # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"               # auto (bf16, or fp16 + GradScaler on GPUs without bf16; fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False             # torch.compile the model
    fsdp: bool = False                # under torchrun: FSDP2 fully_shard per block instead of DDP
    seed: int = 1337
    peak_tflops: float | None = None  # accelerator peak for MFU; None -> looked up in PEAK_TFLOPS by GPU name

    def __post_init__(self):
        check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        check_choice("dtype", self.dtype, ("auto", *DTYPES))
        check_choice("export", self.export, ("none", "fp16", "bf16"))
        for key in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval", "bpe_vocab_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be a positive integer")
        if self.max_iters < 0 or self.warmup_iters < 0:
            raise ValueError(f"max_iters={self.max_iters} and warmup_iters={self.warmup_iters} must be >= 0")


def parse_config(argv):
    """[config.yaml] [--key=value ...] -> (TrainConfig, model keys given, checkpoint to resume or None).

    Without a YAML file the model keys come from configs/tiny.yaml, or with --resume from the
    checkpoint, whose train config is then the base too. A model key that differs from the
    checkpoint's is an error (its weights would not fit), except the RESUMABLE ones.
    """
    import yaml
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    fields.update({f.name: f.type for f in dataclasses.fields(TrainConfig)})
    files = [a for a in argv if not a.startswith("--")]
    if len(files) > 1 or any(not f.endswith((".yaml", ".yml")) for f in files):
        raise ValueError(f"expected at most one YAML config file, then --key=value overrides; got {files}")
    cli = dict(a[2:].partition("=")[::2] if "=" in a else (a[2:], "true") for a in argv if a.startswith("--"))
    resume = str(cli.get("resume", "false")).lower() in ("true", "1", "yes")
    path = files[0] if files else None if resume else DEFAULT_MODEL
    if path is not None and not Path(path).is_file():
        raise ValueError(f"config file {path} does not exist; see configs/ for the named models")
    raw = (yaml.safe_load(Path(path).read_text()) or {}) if path is not None else {}
    for key, value in {**raw, **cli}.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint} (keys: TrainConfig in train.py, Config in model.py)")
        allowed = get_args(fields[key]) or (fields[key],)
        if key in cli and type(None) in allowed and value.lower() in ("null", "none"):
            value = None
        elif key in cli and str not in allowed:  # a CLI string is a YAML scalar or list, unless the field is a string
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError(f"--{key}={value} is not a valid value") from None
        if isinstance(value, str) and float in allowed:
            try:  # YAML 1.1 reads 3e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        raw[key] = check_type(key, value, fields[key])
    train = {k: v for k, v in raw.items() if k in train_keys}
    model_keys = {k: v for k, v in raw.items() if k not in train_keys}
    ckpt = None
    if train.get("resume"):  # asked for on the command line or in the YAML file
        ckpt_path = Path(train.get("out_dir", TrainConfig.out_dir)) / "ckpt.pt"
        if not ckpt_path.is_file():
            raise ValueError(f"resume=true but {ckpt_path} does not exist; pass the --out_dir of an earlier run "
                             f"or drop --resume")
        ckpt = load_checkpoint(ckpt_path)
        train = {**ckpt["train_config"], **train}
        differ = {k: (ckpt["config"].get(k), v) for k, v in model_keys.items() if k not in RESUMABLE
                  and Config.from_dict({**ckpt["config"], k: v}) != Config.from_dict(ckpt["config"])}
        if differ:
            what = ", ".join(f"{k}={old!r} (this run: {new!r})" for k, (old, new) in differ.items())
            raise ValueError(f"cannot resume {ckpt_path}: it was trained with {what}; pass the same model config "
                             f"or a new --out_dir")
        if train.get("max_iters", TrainConfig.max_iters) < ckpt["iter"]:
            raise ValueError(f"cannot resume {ckpt_path} at iter {ckpt['iter']} with max_iters={train['max_iters']}; "
                             f"pass --max_iters={ckpt['iter']} or more")
    return TrainConfig(**train), model_keys, ckpt


def get_lr(it, tc: TrainConfig):
    """Linear warmup to lr, then cosine decay to min_lr at lr_decay_iters (nanoGPT, SGDR arXiv:1608.03983)."""
    decay_iters = tc.lr_decay_iters or tc.max_iters
    if it < tc.warmup_iters:
        return tc.lr * (it + 1) / (tc.warmup_iters + 1)
    if it >= decay_iters:
        return tc.min_lr
    ratio = (it - tc.warmup_iters) / max(1, decay_iters - tc.warmup_iters)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.lr - tc.min_lr)


def main(argv=None):
    """Run training; returns {"model": the trained (unwrapped) model, "val_loss": last val loss, "sample": str}."""
    # ------------------------------------------------------------------------------------------
    # 1. Config
    tc, model_keys, ckpt = parse_config(sys.argv[1:] if argv is None else argv)
    try:
        return train(tc, model_keys, ckpt)
    finally:  # every exit, errors included, leaves the process group
        if dist.is_initialized():
            dist.destroy_process_group()


def train(tc: TrainConfig, model_keys: dict, ckpt: dict | None):
    """Sections 2-9: set up, loop, sample, export."""
    out_dir = Path(tc.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir={tc.out_dir!r} is a file, not a directory; pass another --out_dir")

    # ------------------------------------------------------------------------------------------
    # 2. Device, precision and distributed init (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)
    distributed = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if distributed else (0, 0, 1)
    device = tc.device if tc.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    device_type = device.split(":")[0]
    if distributed and device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    master = rank == 0
    dtype = tc.dtype
    if dtype == "auto":
        cuda_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bf16" if cuda_bf16 else "fp16" if device_type == "cuda" else "fp32"
    autocast = nullcontext() if dtype == "fp32" else torch.autocast(device_type, dtype=DTYPES[dtype])
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ------------------------------------------------------------------------------------------
    # 3. Data: tokenise once into out_dir/data (rank 0), then every rank maps the .bin files
    if (Path(tc.data) / "meta.json").is_file():
        data_dir = Path(tc.data)
    else:
        name = tc.data if tc.data in CORPORA else Path(tc.data).stem
        data_dir = out_dir / "data" / f"{name}-{tc.tokenizer}"
        if master:
            prepare(tc.data, data_dir, tc.tokenizer, tc.bpe_vocab_size)
        if distributed:
            dist.barrier()
    meta = json.loads((data_dir / "meta.json").read_text())
    tok = get_tokenizer(meta["tokenizer"])
    splits = {s: load_tokens(data_dir / f"{s}.bin", meta["dtype"]) for s in ("train", "val")}

    # ------------------------------------------------------------------------------------------
    # 4. Model
    if ckpt is not None:
        if ckpt["tokenizer"] != tok.meta:
            raise ValueError(f"cannot resume {out_dir / 'ckpt.pt'}: its tokenizer ({ckpt['tokenizer']['kind']}) "
                             f"differs from the one prepared for data={tc.data!r}; pass the data it was trained on")
        cfg = Config.from_dict({**ckpt["config"], **model_keys})  # parse_config let only RESUMABLE keys differ
    else:
        vocab = model_keys.get("vocab_size", tok.vocab_size)
        if vocab < tok.vocab_size:
            raise ValueError(f"vocab_size={vocab} is smaller than the {tc.tokenizer} tokenizer's "
                             f"{tok.vocab_size} tokens; raise it or drop the key")
        cfg = Config.from_dict({**model_keys, "vocab_size": vocab})
    if cfg.architecture != "decoder_only":
        raise ValueError(f"train.py trains decoder-only language models; this config is {cfg.architecture}")
    T = cfg.block_size
    for s, d in splits.items():
        if len(d) <= T:
            raise ValueError(f"the {s} split of data={tc.data!r} has {len(d)} tokens, not more than "
                             f"block_size={T}; use a longer text or a smaller --block_size")
    model = Transformer(cfg).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    raw_model = model  # unwrapped: what is saved and sampled from
    if master:
        print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters; {tc.tokenizer} tokenizer, vocab {tok.vocab_size}; "
              f"{len(splits['train']):,} train / {len(splits['val']):,} val tokens; {device} {dtype}, world {world}")
    if tc.fsdp:
        if not distributed:
            raise ValueError("fsdp=true shards over processes: launch with torchrun --nproc_per_node=N")
        from torch.distributed.fsdp import fully_shard
        for block in raw_model.blocks:  # one all-gather per block in forward, then the rest (embeddings, head)
            fully_shard(block)
        fully_shard(raw_model)

    # ------------------------------------------------------------------------------------------
    # 5. Optimizer: weight decay on matrices only; with muon, hidden matrices go to Muon instead
    params = dict(raw_model.named_parameters())
    tables = {id(m.weight) for m in raw_model.modules() if isinstance(m, torch.nn.Embedding)} | {id(raw_model.lm_head.weight)}
    muon = {n for n, p in params.items() if tc.optimizer == "muon" and p.dim() == 2 and id(p) not in tables}
    decay = [p for n, p in params.items() if p.dim() >= 2 and n not in muon]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    # fused: one kernel over all tensors (CUDA, and CPU since torch 2.4: 2-3x faster than the per-tensor loop)
    optimizers = [torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr,
                                    betas=(tc.beta1, tc.beta2), fused=device_type in ("cuda", "cpu"))]
    if muon:  # Jordan et al. 2024; Moonlight's RMS matching (arXiv:2502.16982) lets it share AdamW's lr
        if tc.fsdp:
            raise ValueError("optimizer=muon needs whole matrices; use it with DDP, not fsdp=true")
        optimizers.append(torch.optim.Muon([params[n] for n in sorted(muon)], lr=tc.lr,
                                           weight_decay=tc.weight_decay, adjust_lr_fn="match_rms_adamw"))
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "fp16")  # fp16 gradients underflow unscaled
    data_gen = torch.Generator().manual_seed(tc.seed)  # picks the training windows; its state is the data position
    iter_num, best_val, tokens_seen = 0, float("inf"), 0
    torch.manual_seed(tc.seed + rank)  # dropout differs per rank
    if ckpt is not None:
        if tc.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            for opt, sd in zip(optimizers, ckpt["optimizer"]):
                set_optimizer_state_dict(raw_model, opt, sd, options=StateDictOptions(full_state_dict=True))
        else:
            for opt, sd in zip(optimizers, ckpt["optimizer"]):
                opt.load_state_dict(sd)
        if ckpt["scaler"]:  # empty when saved by a disabled (non-fp16) scaler
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val, tokens_seen = ckpt["iter"], ckpt["best_val_loss"], ckpt["tokens"]
        data_gen.set_state(ckpt["rng"]["data"])
        if len(ckpt["rng"]["torch"]) == world:
            torch.set_rng_state(ckpt["rng"]["torch"][rank])
            if device_type == "cuda" and ckpt["rng"]["cuda"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"][rank])
        if master:
            print(f"resumed {out_dir / 'ckpt.pt'} at iter {iter_num} (best val loss {best_val:.4f})")

    # ------------------------------------------------------------------------------------------
    # 6. Compile and wrap: DDP all-reduces gradients; FSDP2 already wrapped the model in section 4
    if tc.compile:
        model = torch.compile(model)
    if distributed and not tc.fsdp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    def get_batch(split, gen, n):
        """n (x, y) pairs of (batch_size, T) windows for this rank. Every rank draws the whole global
        batch from the same generator and keeps its rows: the run is the same for any world size."""
        d, B = splits[split], tc.batch_size
        ix = torch.randint(len(d) - T, (world * n, B), generator=gen)[rank * n:(rank + 1) * n]
        for row in ix.tolist():
            xy = torch.stack([d[i:i + T + 1] for i in row]).long()        # (B, T + 1)
            if device_type == "cuda":
                xy = xy.pin_memory().to(device, non_blocking=True)
            else:
                xy = xy.to(device)
            yield xy[:, :-1].contiguous(), xy[:, 1:].contiguous()         # (B, T) each

    @torch.no_grad()
    def estimate_loss():
        """Mean loss per split over eval_iters batches, the same batches at every evaluation."""
        model.eval()
        out = {}
        for split in ("train", "val"):
            total = torch.zeros((), device=device)
            for x, y in get_batch(split, torch.Generator().manual_seed(tc.seed + 1), tc.eval_iters):
                with autocast:
                    total += model(x, y).loss.float()
            if distributed:
                dist.all_reduce(total)
            out[split] = total.item() / (tc.eval_iters * world)
        model.train()
        return out

    # ------------------------------------------------------------------------------------------
    # 7. Training loop
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = open(out_dir / "metrics.jsonl", "a" if tc.resume else "w") if master else None
    tokens_per_iter = tc.batch_size * tc.grad_accum * world * T
    flops_per_token = 6 * raw_model.get_num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.hs * T  # PaLM appendix B
    name = torch.cuda.get_device_name() if device_type == "cuda" else ""
    peak = tc.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    last_saved = iter_num if ckpt is not None else None
    val_loss, t_log, iters_logged = None, time.time(), 0

    def stop_if_not_finite(what, value):
        """A NaN/inf loss ends the run before it touches the weights or the checkpoints."""
        if not math.isfinite(value):
            saved = f"{out_dir / 'ckpt.pt'} (iter {last_saved}) is the last good checkpoint" \
                if last_saved is not None else "no checkpoint was written"
            raise FloatingPointError(f"{what} is {value} at iter {iter_num} (lr {get_lr(iter_num, tc):.3g}); "
                                     f"stopped; {saved}; lower --lr or raise --warmup_iters")

    while True:
        # evaluate and write checkpoints (last: everything to resume; best: weights for generate.py)
        if iter_num % tc.eval_interval == 0 or iter_num == tc.max_iters:
            losses = estimate_loss()
            for split, value in losses.items():
                stop_if_not_finite(f"evaluated {split} loss", value)
            val_loss, improved = losses["val"], losses["val"] < best_val
            best_val = min(best_val, val_loss)
            torch_rng = [torch.get_rng_state()]
            cuda_rng = [torch.cuda.get_rng_state()] if device_type == "cuda" else []
            if distributed:  # every rank's RNG, so dropout resumes exactly on each
                torch_rng, cuda_rng = [None] * world, [None] * world if cuda_rng else []
                dist.all_gather_object(torch_rng, torch.get_rng_state())
                if cuda_rng:
                    dist.all_gather_object(cuda_rng, torch.cuda.get_rng_state().cpu())
            state = raw_model
            optim_state = [opt.state_dict() for opt in optimizers]
            if tc.fsdp:  # gather the shards (every rank takes part); rank 0 writes whole tensors
                from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                     get_optimizer_state_dict)
                opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
                full = get_model_state_dict(raw_model, options=opts)
                optim_state = [get_optimizer_state_dict(raw_model, opt, options=opts) for opt in optimizers]
                state = types.SimpleNamespace(state_dict=lambda: full, config=cfg)  # what save_checkpoint reads
            if master:
                print(f"eval iter {iter_num}: train loss {losses['train']:.4f}, val loss {val_loss:.4f}"
                      + (" (best)" if improved else ""))
                metrics.write(json.dumps({"iter": iter_num, "train_loss": losses["train"], "val_loss": val_loss}) + "\n")
                metrics.flush()
                save_checkpoint(out_dir / "ckpt.pt", state, optimizer=optim_state, scaler=scaler.state_dict(),
                                iter=iter_num, best_val_loss=best_val, tokens=tokens_seen, tokenizer=tok.meta,
                                train_config=dataclasses.asdict(tc),
                                rng={"torch": torch_rng, "cuda": cuda_rng, "data": data_gen.get_state()})
                if improved:
                    save_checkpoint(out_dir / "ckpt_best.pt", state, iter=iter_num, val_loss=val_loss, tokenizer=tok.meta)
            last_saved = iter_num
            t_log, iters_logged = time.time(), 0  # evaluation time is not training throughput
        if iter_num >= tc.max_iters:
            break

        # one optimizer step over grad_accum micro-batches; DDP all-reduces only on the last one
        lr = get_lr(iter_num, tc)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro, (x, y) in enumerate(get_batch("train", data_gen, tc.grad_accum)):
            last = micro == tc.grad_accum - 1
            if tc.fsdp:
                raw_model.set_requires_gradient_sync(last)
            with model.no_sync() if distributed and not tc.fsdp and not last else nullcontext():
                with autocast:
                    out = model(x, y)
                    loss = (out.loss + out.aux_loss) / tc.grad_accum
                scaler.scale(loss).backward()
            loss_sum += out.loss.detach().float() / tc.grad_accum
        if distributed:
            dist.all_reduce(loss_sum)  # SUM (gloo has no AVG); every rank sees the same value and stops together
            loss_sum /= world
        lossf = loss_sum.item()  # one sync per step: the price of never stepping on a NaN
        stop_if_not_finite("training loss", lossf)
        if tc.grad_clip > 0:
            for opt in optimizers:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        for opt in optimizers:
            scaler.step(opt)  # skipped when fp16 gradients overflowed; the scaler then lowers its scale
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_iter
        iters_logged += 1

        if iter_num % tc.log_interval == 0 and master:
            dt = (time.time() - t_log) / iters_logged
            tok_s = tokens_per_iter / dt
            eta = dt * (tc.max_iters - iter_num - 1)
            mfu = f", mfu {100 * flops_per_token * tok_s / (world * peak * 1e12):.1f}%" if peak else ""
            print(f"iter {iter_num}/{tc.max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s, "
                  f"{1000 * dt:.0f} ms/iter{mfu}, eta {int(eta) // 60}m{int(eta) % 60:02d}s", flush=True)
            metrics.write(json.dumps({"iter": iter_num, "loss": lossf, "lr": lr, "tok_per_s": tok_s,
                                      "ms_per_iter": 1000 * dt, "tokens": tokens_seen}) + "\n")
            metrics.flush()
            t_log, iters_logged = time.time(), 0
        iter_num += 1
    if metrics:
        metrics.close()

    # ------------------------------------------------------------------------------------------
    # 8. Sample (every rank runs it, since FSDP shards need all ranks; rank 0 prints)
    raw_model.eval()
    try:
        prompt = tok.encode(tc.sample_prompt) or splits["val"][:1].tolist()
    except ValueError:  # e.g. a char vocabulary without "\n": start from the first val token instead
        prompt = splits["val"][:1].tolist()
    prompt = prompt[-(T // 2):]
    absolute = cfg.position in ("learned", "sinusoidal")  # a position table ends at block_size; RoPE runs on
    n = max(0, min(tc.sample_tokens, T - len(prompt))) if absolute else tc.sample_tokens
    gen = torch.Generator(device=device).manual_seed(tc.seed)
    with autocast:
        ids = raw_model.generate(torch.tensor([prompt], device=device), n, temperature=tc.sample_temperature,
                                 generator=gen)
    sample = tok.decode(ids[0].tolist())
    if master:
        print(f"val loss {val_loss:.4f}; sample:\n{sample}\n")

    # ------------------------------------------------------------------------------------------
    # 9. Export: weights only, in half precision (for generate.py or sharing)
    if tc.export != "none" and master:
        sd = state.state_dict() if tc.fsdp else raw_model.state_dict()
        cast = {(v.data_ptr(), v.shape): v.to(DTYPES[tc.export]) for v in sd.values() if v.is_floating_point()}
        half = {k: cast.get((v.data_ptr(), v.shape), v) for k, v in sd.items()}  # a tied head is saved once
        path = out_dir / f"model_{tc.export}.pt"
        save_checkpoint(path, types.SimpleNamespace(state_dict=lambda: half, config=cfg), tokenizer=tok.meta)
        print(f"wrote {path} ({tc.export} weights)")
    return {"model": raw_model, "val_loss": val_loss, "sample": sample}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FloatingPointError) as e:  # user errors: one line, no traceback
        sys.exit(f"error: {e}")
