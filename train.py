"""Train a model.py Transformer on text: nanoGPT's train.py, with typed configs instead of exec.

  python train.py                                          # configs/tiny.yaml on the stdlib corpus, CPU
  python train.py configs/shakespeare_char.yaml --data=shakespeare
  python train.py --data=my.txt --tokenizer=bpe --max_iters=5000 --n_layer=6
  python train.py configs/bert_base.yaml --data=my.txt     # masked LM + next-sentence prediction
  python train.py configs/t5_small.yaml --data=my.txt      # T5 span corruption
  python train.py configs/t5_small.yaml --data=pairs.tsv   # seq2seq on source<TAB>target lines
  python train.py configs/brt_enwik8.yaml                  # block-recurrent: segments with truncated backprop
  python train.py --resume --out_dir=out --max_iters=4000  # continue exactly where out/ckpt.pt stopped
  torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_small.yaml --data=my.txt --tokenizer=gpt2

Arguments: at most one YAML file, then --key=value overrides (a bare --flag means true). In the YAML
file the model keys (model.Config) sit at the top level and the training keys (TrainConfig below) in a
`train:` section; on the command line both are flat --key=value. Values are checked against the field
types. Without a YAML file (and without --resume) the model is configs/tiny.yaml. The objective follows
the architecture (data/objectives.py): lm for a decoder, mlm for an encoder, span corruption for an
encoder-decoder, or seq2seq when the data is a .tsv file of pairs.
Writes to out_dir: ckpt.pt (last; resumable), ckpt_best.pt (weights of the best val loss),
metrics.jsonl, data/ (the tokenised corpus) and, with --export, model_fp16.pt / model_bf16.pt.
"""
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
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

from data.objectives import (OBJECTIVES, PAIR_TASKS, check_objective, config_overrides, default_objective, lm_batch,
                             load_pairs, show)
from data.prepare import CORPORA, VAL_FRACTION, get_tokenizer, load_tokens, prepare
from model import Config, Transformer, check_choice, check_type, load_checkpoint, save_checkpoint

DEFAULT_MODEL = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# model keys no weight depends on: a resumed run may change them
RESUMABLE = ("grad_checkpoint", "dropout", "drop_path", "state_dropout", "memory_dropout")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}  # dense bf16, for MFU


@dataclass
class TrainConfig:
    """Everything about a run except the architecture (that is model.Config)."""

    # data
    data: str = "stdlib"              # stdlib | shakespeare | a UTF-8 text file | a directory made by data/prepare.py
    tokenizer: str = "char"           # char | byte | bpe | a tiktoken encoding (gpt2, cl100k_base, ...)
    bpe_vocab_size: int = 1024        # vocabulary trained on the text when tokenizer is bpe
    # objective (data/objectives.py)
    objective: str = "auto"           # auto | lm | mlm | span | seq2seq (auto: by architecture; seq2seq on a .tsv)
    pair_task: str = "auto"           # mlm's cls-head loss: auto (nsp with cls_head, else none) | none | nsp | sop
    segments: int = 1                 # block-recurrent: windows of segments x block_size, state carried, truncated BPTT
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
    optimizer: str = "adamw"          # adamw | muon (torch.optim.Muon on hidden 2-D matrices, AdamW on the rest)
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
        check_choice("objective", self.objective, ("auto", *OBJECTIVES))
        check_choice("pair_task", self.pair_task, ("auto", *PAIR_TASKS))
        for key in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval", "bpe_vocab_size",
                    "segments"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be a positive integer")
        if self.max_iters < 0 or self.warmup_iters < 0:
            raise ValueError(f"max_iters={self.max_iters} and warmup_iters={self.warmup_iters} must be >= 0")


def usage():
    """--help: this docstring, then every TrainConfig key with its default and comment, grouped as in the class."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    lines = [__doc__, "Training keys (the train: section of a YAML file, or --key=value) and their defaults:"]
    for line in inspect.getsource(TrainConfig).splitlines():
        field = re.match(r"    (\w+): [^=]+=[^#]*(?:# (.*))?$", line)
        if field and field[1] in defaults:
            v = defaults[field[1]]
            v = "null" if v is None else str(v).lower() if isinstance(v, bool) else v
            v = json.dumps(v) if isinstance(v, str) and not v.isprintable() else v    # sample_prompt "\n"
            lines.append((f"  --{field[1]}={v}".ljust(30) + (field[2] or "")).rstrip())
        elif line.startswith("    # "):
            lines.append(f"  {line.strip()}")
    lines.append("Model keys: the fields of Config in model.py (the top level of a YAML file, or --key=value).")
    return "\n".join(lines)


def parse_config(argv):
    """[config.yaml] [--key=value ...] -> (TrainConfig, model keys given, checkpoint to resume or None).

    Without a YAML file the model keys come from configs/tiny.yaml, or with --resume from the
    checkpoint, whose train config is then the base too. A model key that differs from the
    checkpoint's is an error (its weights would not fit), except the RESUMABLE ones.
    """
    import yaml
    if "-h" in argv or "--help" in argv:
        print(usage())
        raise SystemExit(0)
    model_fields = {f.name: f.type for f in dataclasses.fields(Config)}
    train_fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    fields = {**model_fields, **train_fields}
    files = [a for a in argv if not a.startswith("--")]
    if len(files) > 1 or any(not f.endswith((".yaml", ".yml")) for f in files):
        raise ValueError(f"expected at most one YAML config file, then --key=value overrides; got {files}")
    cli = dict(a[2:].partition("=")[::2] if "=" in a else (a[2:], "true") for a in argv if a.startswith("--"))
    resume = str(cli.get("resume", "false")).lower() in ("true", "1", "yes")
    path = files[0] if files else None if resume else DEFAULT_MODEL
    if path is not None and not Path(path).is_file():
        raise ValueError(f"config file {path} does not exist; see configs/ for the named models")
    raw = (yaml.safe_load(Path(path).read_text()) or {}) if path is not None else {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must be a mapping of config keys (key: value lines), not a {type(raw).__name__}")
    section = raw.pop("train", None) or {}
    if not isinstance(section, dict):
        raise ValueError(f"train: in {path} must be a mapping: training keys indented under it, one per line")
    for key in raw:  # each key in its place, so that model.py reads the file too (it drops the train: section)
        if key in train_fields:
            raise ValueError(f"{key!r} in {path} is a training key (TrainConfig in train.py): move it under train:")
    for key in section:
        if key in model_fields:
            raise ValueError(f"{key!r} under train: in {path} is a model key (Config in model.py): move it to the "
                             f"top level")
    raw.update(section)
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
    train = {k: v for k, v in raw.items() if k in train_fields}
    model_keys = {k: v for k, v in raw.items() if k in model_fields}
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
        result = train(tc, model_keys, ckpt)
        if dist.is_initialized():  # let collectives still in flight (FSDP's prefetches) finish before teardown:
            dist.barrier()         # gloo aborts the process if the group is destroyed under them
        return result
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
    # 3. Data and objective: tokenise once into out_dir/data (rank 0), then every rank maps the .bin files (or
    #    reads the source/target pairs); the objective follows the architecture unless given
    if tc.objective == "seq2seq" and (tc.data in CORPORA or Path(tc.data).is_dir()):
        raise ValueError(f"objective=seq2seq reads source<TAB>target lines from a text file, not data={tc.data!r}; "
                         f"pass --data=pairs.tsv")
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
    arch = Config.from_dict(ckpt["config"] if ckpt is not None else model_keys)  # its vocab is settled in section 4
    objective = default_objective(arch, tc.data) if tc.objective == "auto" else tc.objective
    pair_task = ("nsp" if objective == "mlm" and arch.cls_head else "none") if tc.pair_task == "auto" else tc.pair_task
    if objective == "seq2seq":  # source<TAB>target lines (the tokenizer above was built from the whole file)
        pairs = load_pairs(tc.data, tok)
        n_val = int(len(pairs) * VAL_FRACTION)
        if n_val < 1:
            raise ValueError(f"data={tc.data!r} has {len(pairs)} source/target lines; a train/val split needs at "
                             f"least {math.ceil(1 / VAL_FRACTION)} (pass a longer file)")
        splits = {"train": pairs[:-n_val], "val": pairs[-n_val:]}
    else:
        splits = {s: load_tokens(data_dir / f"{s}.bin", meta["dtype"]) for s in ("train", "val")}

    # ------------------------------------------------------------------------------------------
    # 4. Model
    if ckpt is not None:
        if ckpt["tokenizer"] != tok.meta:
            raise ValueError(f"cannot resume {out_dir / 'ckpt.pt'}: its tokenizer ({ckpt['tokenizer']['kind']}) "
                             f"differs from the one prepared for data={tc.data!r}; pass the data it was trained on")
        cfg = Config.from_dict({**ckpt["config"], **model_keys})  # parse_config let only RESUMABLE keys differ
    else:  # the tokenizer's ids, then the objective's special tokens (data/objectives.py); the decoder starts
        need = {"vocab_size": tok.vocab_size, **config_overrides(objective, tok.vocab_size)}  # from our [PAD],
        need["vocab_size"] = model_keys.get("vocab_size", need["vocab_size"])  # not the YAML's HF tokenizer id
        cfg = Config.from_dict({**model_keys, **need})
    check_objective(objective, cfg, tok.vocab_size, pair_task)
    T, K = cfg.block_size, tc.segments
    if K > 1 and not (cfg.block_width and objective == "lm"):
        raise ValueError(f"segments={K} carries block-recurrent state from call to call: it needs objective=lm and a "
                         f"config with block_width > 0 (here {objective}, block_width={cfg.block_width}); use "
                         f"segments=1 or a block-recurrent config such as configs/brt_enwik8.yaml")
    if K > 1 and cfg.grad_checkpoint:  # the recomputation would run on the cache the forward already advanced
        raise ValueError(f"grad_checkpoint recomputes each block in backward, and with segments={K} that would "
                         f"update the carried state a second time; turn one of them off")
    if K > 1 and cfg.position in ("learned", "sinusoidal"):
        raise ValueError(f"segments={K} runs positions up to {K * T - 1}, past the {cfg.position} position table of "
                         f"block_size={T}; use position: rope or dynamic_bias, or segments=1")
    for s, d in splits.items():
        if objective != "seq2seq" and len(d) <= K * T:
            windows = f"{K} segments x block_size={T}" if K > 1 else f"block_size={T}"
            raise ValueError(f"the {s} split of data={tc.data!r} has {len(d)} tokens, not more than {windows}; "
                             f"use a longer text or a smaller --block_size")
    model = Transformer(cfg).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    raw_model = model  # unwrapped: what is saved and sampled from
    if master:
        task = objective + (f" + {pair_task}" if pair_task != "none" else "")
        unit = "pairs" if objective == "seq2seq" else "tokens"
        print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters, {cfg.architecture}, objective {task}; "
              f"{tc.tokenizer} tokenizer, vocab {tok.vocab_size}; {len(splits['train']):,} train / "
              f"{len(splits['val']):,} val {unit}; {device} {dtype}, world {world}")
    if tc.fsdp:
        if not distributed:
            raise ValueError("fsdp=true shards over processes: launch with torchrun --nproc_per_node=N")
        from torch.distributed.fsdp import fully_shard
        stacks = (raw_model.encoder, raw_model.decoder) if cfg.architecture == "encoder_decoder" else (raw_model,)
        for block in (b for stack in stacks for b in stack.blocks):  # one all-gather per block in forward,
            fully_shard(block)                                         # then the rest (embeddings, heads)
        fully_shard(raw_model)

    # ------------------------------------------------------------------------------------------
    # 5. Optimizer: weight decay on matrices (MoE expert stacks (E, out, in) too), not on biases (MoE's (E, out)
    #    ones too) or norm gains. With muon the hidden nn.Linear matrices go to Muon, which takes 2-D matrices
    #    and, as its authors advise, not the embeddings or output heads; those and the expert stacks stay on AdamW.
    params = dict(raw_model.named_parameters())
    hidden = {id(m.weight) for n, m in raw_model.named_modules()
              if isinstance(m, torch.nn.Linear) and not n.endswith(("lm_head", "cls"))}
    hidden -= {id(m.weight) for m in raw_model.modules() if isinstance(m, torch.nn.Embedding)}   # a tied lm_head
    muon = {n for n, p in params.items() if tc.optimizer == "muon" and id(p) in hidden}
    decay = [p for n, p in params.items() if n not in muon and p.dim() >= 2 and not n.endswith("bias")]
    no_decay = [p for n, p in params.items() if p.dim() < 2 or n.endswith("bias")]
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
                if sd:  # {}: saved before the first step (see section 7)
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
    if distributed and not tc.fsdp:  # parameters the last backward of a step does not reach: a cls head trained
        unused = cfg.cls_head and pair_task == "none" or K > 1   # without its pair task, init_states after segment 1
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None,
                    find_unused_parameters=unused)

    def get_batch(split, gen, n):
        """n micro-batches for this rank, each a list of dicts of forward()'s arguments: one dict, or with
        segments > 1 one per segment, all sharing a fresh cache that carries the state from one to the next.
        Every rank draws the whole global batch from the same generator and keeps its rows: the run is the
        same for any world size."""
        B = tc.batch_size
        for _ in range(n):
            if K > 1:  # windows of K * T + 1 tokens
                batch = lm_batch(splits[split], world * B, gen, K * T)
            else:
                batch = OBJECTIVES[objective](splits[split], world * B, gen, cfg, tok.vocab_size, pair_task)
            batch = {k: v[rank * B:(rank + 1) * B] for k, v in batch.items()}                  # (B, ...) each
            if device_type == "cuda":
                batch = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
            else:
                batch = {k: v.to(device) for k, v in batch.items()}
            if K == 1:
                yield [batch]
                continue
            cache, x, y = raw_model.setup_cache(B, K * T, device=device), batch["input_ids"], batch["targets"]
            yield [{"input_ids": x[:, i * T:(i + 1) * T], "targets": y[:, i * T:(i + 1) * T], "cache": cache,
                    "input_pos": torch.arange(i * T, (i + 1) * T, device=device)} for i in range(K)]

    @torch.no_grad()
    def estimate_loss():
        """Mean loss per split over eval_iters batches (and their segments), the same batches at every evaluation."""
        model.eval()
        out = {}
        for split in ("train", "val"):
            total = torch.zeros((), device=device)
            for segments in get_batch(split, torch.Generator().manual_seed(tc.seed + 1), tc.eval_iters):
                for batch in segments:
                    with autocast:
                        total += model(**batch).loss.float() / K
            if distributed:
                dist.all_reduce(total)
            out[split] = total.item() / (tc.eval_iters * world)
        model.train()
        return out

    # ------------------------------------------------------------------------------------------
    # 7. Training loop
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = open(out_dir / "metrics.jsonl", "a" if tc.resume else "w") if master else None
    tokens_per_iter = tc.batch_size * tc.grad_accum * world * K * T
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
                # before the first step there is no state to save, and asking would create it with a zero-lr
                # step that Adam counts, shrinking the first real update by its bias correction
                optim_state = [get_optimizer_state_dict(raw_model, opt, options=opts) if opt.state else {}
                               for opt in optimizers]
                state = types.SimpleNamespace(state_dict=lambda: full, config=cfg)  # what save_checkpoint reads
            if master:
                print(f"eval iter {iter_num}: train loss {losses['train']:.4f}, val loss {val_loss:.4f}"
                      + (" (best)" if improved else ""))
                metrics.write(json.dumps({"iter": iter_num, "train_loss": losses["train"], "val_loss": val_loss}) + "\n")
                metrics.flush()
                save_checkpoint(out_dir / "ckpt.pt", state, optimizer=optim_state, scaler=scaler.state_dict(),
                                iter=iter_num, best_val_loss=best_val, tokens=tokens_seen, tokenizer=tok.meta,
                                objective=objective, pair_task=pair_task, train_config=dataclasses.asdict(tc),
                                rng={"torch": torch_rng, "cuda": cuda_rng, "data": data_gen.get_state()})
                if improved:
                    save_checkpoint(out_dir / "ckpt_best.pt", state, iter=iter_num, val_loss=val_loss,
                                    tokenizer=tok.meta, objective=objective, pair_task=pair_task)
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
        for micro, segments in enumerate(get_batch("train", data_gen, tc.grad_accum)):
            for i, batch in enumerate(segments):
                last = micro == tc.grad_accum - 1 and i == K - 1
                if tc.fsdp:
                    raw_model.set_requires_gradient_sync(last)
                with model.no_sync() if distributed and not tc.fsdp and not last else nullcontext():
                    with autocast:
                        out = model(**batch)
                        loss = (out.loss + out.aux_loss) / (tc.grad_accum * K)
                    scaler.scale(loss).backward()
                loss_sum += out.loss.detach().float() / (tc.grad_accum * K)
                for c in batch.get("cache", ()):  # truncated backprop: the next segment's gradients stop here
                    c.detach()
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
    # 8. Sample (every rank runs it, since FSDP shards need all ranks; rank 0 prints): free text from a language
    #    model; for the other objectives one val example and the model's answer
    raw_model.eval()
    if tc.fsdp and cfg.architecture == "encoder_decoder":  # its generate() encodes outside forward(), where
        raw_model.unshard()                                   # FSDP would gather the root's weights (embeddings)
    if objective == "lm":
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
    else:
        with autocast:
            gen = torch.Generator().manual_seed(tc.seed)  # on the CPU, as the batch makers draw there
            sample = show(raw_model, objective, splits["val"], tok, tok.vocab_size, gen)
    if master:
        print(f"val loss {val_loss:.4f}; sample:\n{sample}\n")

    # ------------------------------------------------------------------------------------------
    # 9. Export: weights only, in half precision (for generate.py or sharing)
    if tc.export != "none" and master:
        sd = state.state_dict() if tc.fsdp else raw_model.state_dict()
        cast = {(v.data_ptr(), v.shape): v.to(DTYPES[tc.export]) for v in sd.values() if v.is_floating_point()}
        half = {k: cast.get((v.data_ptr(), v.shape), v) for k, v in sd.items()}  # a tied head is saved once
        path = out_dir / f"model_{tc.export}.pt"
        save_checkpoint(path, types.SimpleNamespace(state_dict=lambda: half, config=cfg), tokenizer=tok.meta,
                        objective=objective, pair_task=pair_task)
        print(f"wrote {path} ({tc.export} weights)")
    return {"model": raw_model, "val_loss": val_loss, "sample": sample}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FloatingPointError) as e:  # user errors: one line, no traceback
        sys.exit(f"error: {e}")
