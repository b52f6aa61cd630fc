"""Train a model.py Transformer on text: nanoGPT's train.py, with typed configs instead of exec.

  python train.py                                         # configs/tiny.yaml on the stdlib corpus
  python train.py configs/shakespeare_char.yaml --data=shakespeare
  python train.py --data=my.txt --tokenizer=bpe --max_iters=5000 --n_layer=6
  python train.py configs/bert_base.yaml --data=my.txt    # masked LM + next-sentence prediction
  python train.py configs/t5_small.yaml --data=my.txt     # T5 span corruption
  python train.py configs/t5_small.yaml --data=pairs.tsv  # seq2seq on source<TAB>target lines
  python train.py configs/bert_base.yaml --data=labels.tsv   # classify text<TAB>label lines
  python train.py configs/brt_enwik8.yaml                 # block-recurrent, truncated BPTT
  python train.py --resume --out_dir=out --max_iters=4000 # continue exactly where ckpt.pt stopped
  python train.py --init_from=path/to/hf_dir --data=my.txt --export=hf  # fine-tune a HF model
  python train.py --init_from=out/ckpt_best.pt --data=my.txt --out_dir=out_ft
  python train.py --init_from=path/to/hf_dir --data=my.txt --eval_only  # loss, perplexity only
  torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_small.yaml --tokenizer=gpt2

Arguments: at most one YAML file, then --key=value overrides (a bare --flag means true). In the YAML
file the model keys (model.Config) sit at the top level and the training keys (TrainConfig below) in
a `train:` section; on the command line both are flat --key=value. Values are checked against the
field types and ranges before anything is written. Without a YAML file (and without --resume or
--init_from) the model is configs/tiny.yaml. The objective follows the architecture
(data/objectives.py): lm for a decoder, mlm for an encoder, span corruption for an encoder-decoder;
on a .tsv file an encoder classifies text<TAB>label lines and an encoder-decoder learns seq2seq on
source<TAB>target lines (--objective=classify also fine-tunes a decoder's classifier; a decoder
that has one classifies a .tsv file by default). The objectives frame examples with a HF
tokenizer.json's own special tokens ([CLS], [MASK], </s>, <extra_id_0>, ...) where it has them all,
else with ours appended after the tokenizer's ids.
--init_from starts from the weights, config and tokenizer of a checkpoint or a HF-format directory
(a Hub model id such as gpt2 is downloaded once into ~/.cache/anyformer); model keys may then only
change what keeps the weights' shapes (dropout, grad_checkpoint, a smaller block_size, ...);
--resume continues such a run as any other.
Writes to out_dir: ckpt.pt (last; resumable), ckpt_best.pt (weights of the best val loss),
metrics.jsonl, data/ (the tokenised corpus) and, with --export, model_fp16.pt / model_bf16.pt or
hf/ (config.json, model.safetensors, tokenizer.json: what transformers' Auto classes load; a
classifier as the family's *ForSequenceClassification, its classes as id2label).
--eval_only writes nothing at all.
Nothing is lost: a fresh run refuses an out_dir that holds another run's checkpoints (pass --resume,
another --out_dir, or --overwrite=true), and a run replaces checkpoints already there only after its
first step, so a run that fails early leaves them as they were.
"""
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import types
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple, get_args

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data.objectives import (
    OBJECTIVES,
    PAIR_TASKS,
    check_objective,
    config_overrides,
    default_objective,
    lm_batch,
    load_labeled,
    load_pairs,
    needs,
    show,
    special_tokens,
    spelled,
)
from data.prepare import (
    CORPORA,
    VAL_FRACTION,
    cached_meta,
    fingerprint,
    get_tokenizer,
    load_tokens,
    prepare,
)
from hf import (
    check_target,
    class_names,
    from_pretrained,
    hf_config,
    hub_dir,
    read_json,
    save_pretrained,
)
from model import (
    FOREIGN_KEYS,
    Config,
    Transformer,
    check_choice,
    check_type,
    from_seed_schema,
    load_checkpoint,
    read_yaml,
    save_checkpoint,
)

DEFAULT_MODEL = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# model keys no weight depends on: a resumed run may change them
RESUMABLE = ("grad_checkpoint", "dropout", "drop_path", "state_dropout", "memory_dropout")
# dense bf16 peak TFLOPS by GPU name, for MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
CHECKPOINTS = ("ckpt.pt", "ckpt_best.pt", "model_fp16.pt", "model_bf16.pt", "hf")  # a run's
EXPORTED = ("model_fp16.pt", "model_bf16.pt", "hf")  # written at a run's end, not on the way
RESUME_KEYS = ("optimizer", "scaler", "iter", "best_val_loss", "tokens", "train_config", "rng")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# other training scripts' flags (the Enhanced Transformer seed's), named in the error with ours.
# No --epochs: batches are random windows of the token stream, so a pass over the data is only
# an expectation; the schedule (warmup, cosine, eval, checkpoints) counts optimizer steps.
FOREIGN_FLAGS = {
    "model_size": "a config file as the first argument: configs/enhanced_small.yaml (or "
                  "enhanced_medium, enhanced_large)",
    "epochs": "--max_iters (optimizer steps; one pass over the data is about train tokens / "
              "(batch_size x block_size) of them)",
    "mixed_precision": "--dtype=bf16 (or fp16, with a gradient scaler)",
    "use_rotary_embeddings": "--position=rope", "gradient_checkpointing": "--grad_checkpoint",
    "gradient_accumulation_steps": "--grad_accum", "learning_rate": "--lr",
    "warmup_steps": "--warmup_iters", "max_steps": "--max_iters", "output_dir": "--out_dir",
    "save_dir": "--out_dir", "checkpoint_dir": "--out_dir",
    **{k: f"--{v}" for k, v in FOREIGN_KEYS.items()},
}


@dataclass
class TrainConfig:
    """Everything about a run except the architecture (that is model.Config)."""

    # data
    data: str = "stdlib"              # stdlib | shakespeare | a UTF-8 text file | a prepared dir
    tokenizer: str = "auto"           # auto (init_from's, or char) | char | byte | bpe | hf:PATH
    bpe_vocab_size: int = 1024        # vocabulary trained on the text when tokenizer is bpe
    # objective (data/objectives.py)
    objective: str = "auto"           # auto (by model) | lm | mlm | span | seq2seq | classify
    pair_task: str = "auto"           # mlm's cls head: auto (nsp if cls_head) | none | nsp | sop
    # classify: SiFT, adversarial training on the normalized embeddings (see sift_loss)
    sift: bool = False                # add SiFT's symmetric-KL term to the loss
    sift_eps: float = 1e-2            # std of the perturbation's random start
    sift_step: float = 1e-3           # its ascent step: each token's largest coordinate moves this
    sift_weight: float = 1.0          # weight of the term in the loss
    segments: int = 1                 # block-recurrent: calls per window, state carried, BPTT cut
    # starting point: fine-tuning
    init_from: str | None = None      # start from a ckpt.pt, ckpt_best.pt, HF-format dir or Hub id
    # output, evaluation, sampling
    out_dir: str = "out"
    resume: bool = False              # continue out_dir/ckpt.pt: weights, optimizer, RNG, data
    eval_only: bool = False           # load (init_from or resume), evaluate once, write nothing
    overwrite: bool = False           # let a fresh run replace another run's checkpoints in out_dir
    eval_interval: int = 250
    eval_iters: int = 20              # batches per split per evaluation
    log_interval: int = 10
    sample_tokens: int = 256          # sampled after training (absolute positions: to block_size)
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8
    export: str = "none"              # none | fp16 | bf16 (model_<export>.pt) | hf (out_dir/hf/)
    # batch: tokens per step = batch_size * grad_accum * world size * block_size
    batch_size: int = 16
    grad_accum: int = 1
    max_iters: int = 2000
    # optimizer and schedule
    optimizer: str = "adamw"          # adamw | muon (torch.optim.Muon on hidden 2-D matrices)
    lr: float = 1e-3                  # peak; Muon uses it too (adjust_lr_fn="match_rms_adamw")
    min_lr: float | None = None       # None -> lr / 10 (nanoGPT's rule of thumb)
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # cosine reaches min_lr here; None -> max_iters
    weight_decay: float = 0.1         # matrices only; norms, biases and gains are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0            # max global grad norm; 0 disables
    # system
    device: str = "auto"              # auto (cuda if any, else cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"               # auto (GPU: bf16 or fp16; CPU: fp32) | fp32 | bf16 | fp16
    compile: bool = False             # torch.compile the model
    fsdp: bool = False                # under torchrun: FSDP2 fully_shard per block instead of DDP
    seed: int = 1337
    peak_tflops: float | None = None  # accelerator peak for MFU; None -> PEAK_TFLOPS by GPU name

    def __post_init__(self):
        """Every value's type and range, and what this machine can run: one line naming the key
        and the fix."""
        for f in dataclasses.fields(self):  # int -> float where a float is due, as YAML gives 3
            setattr(self, f.name, check_type(f.name, getattr(self, f.name), f.type))
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        check_choice("dtype", self.dtype, ("auto", *DTYPES))
        check_choice("export", self.export, ("none", "fp16", "bf16", "hf"))
        check_choice("objective", self.objective, ("auto", *OBJECTIVES))
        check_choice("pair_task", self.pair_task, ("auto", *PAIR_TASKS))
        finite = lambda v: v is None or math.isfinite(v)
        counts = ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval",
                  "segments")
        rules = {  # key: (its value is allowed, what is)
            **{k: (getattr(self, k) >= 1, ">= 1") for k in counts},
            **{k: (getattr(self, k) >= 0, ">= 0") for k in ("max_iters", "warmup_iters",
                                                             "sample_tokens")},
            "bpe_vocab_size": (self.bpe_vocab_size >= 256, ">= 256 (one token per byte)"),
            "lr": (finite(self.lr) and self.lr > 0, "> 0 and finite"),
            "min_lr": (0 <= self.min_lr <= self.lr, f"in [0, lr={self.lr}]"),
            "lr_decay_iters": (self.lr_decay_iters is None
                               or self.lr_decay_iters >= self.warmup_iters,
                               f">= warmup_iters={self.warmup_iters}, or null (= max_iters)"),
            "weight_decay": (finite(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
            "beta1": (0 <= self.beta1 < 1, "in [0, 1)"),
            "beta2": (0 <= self.beta2 < 1, "in [0, 1)"),
            "grad_clip": (finite(self.grad_clip) and self.grad_clip >= 0,
                          ">= 0 (0 disables clipping)"),
            "sift_eps": (finite(self.sift_eps) and self.sift_eps > 0, "> 0 and finite"),
            "sift_step": (finite(self.sift_step) and self.sift_step >= 0, ">= 0 and finite"),
            "sift_weight": (finite(self.sift_weight) and self.sift_weight >= 0, ">= 0 and finite"),
            "sample_temperature": (finite(self.sample_temperature) and self.sample_temperature >= 0,
                                   ">= 0 (0 = greedy)"),
            "peak_tflops": (self.peak_tflops is None or finite(self.peak_tflops)
                            and self.peak_tflops > 0, "> 0, or null"),
            "seed": (0 <= self.seed < 2 ** 63, "in [0, 2**63)"),
            "data": (self.data != "", "a text file, a prepared directory or a corpus name"),
            "out_dir": (self.out_dir != "", "a directory"),
            "init_from": (self.init_from != "", "a checkpoint file, a HF-format directory, a Hub "
                          "model id, or null"),
            "eval_only": (not self.eval_only or self.init_from is not None or self.resume,
                          "false unless there are weights to evaluate: pass --init_from=PATH or "
                          "--resume"),
            "export": (not self.eval_only or self.export == "none",
                       "none with eval_only=true, which writes nothing"),
        }
        for key, (ok, allowed) in rules.items():
            if not ok:
                what = "must name" if isinstance(getattr(self, key), str) else "must be"
                raise ValueError(f"{key}={getattr(self, key)!r} {what} {allowed}")
        check_device(self.device)
        if self.fsdp and self.optimizer == "muon":
            raise ValueError("optimizer=muon needs whole matrices; use it with DDP, not fsdp=true")
        if self.fsdp and "RANK" not in os.environ:
            raise ValueError("fsdp=true shards over processes: launch with torchrun "
                             "--nproc_per_node=N")


def check_device(device):
    """device names one that torch finds on this machine: a one-line error naming the fix."""
    if not DEVICE.fullmatch(device):
        raise ValueError(f"device={device!r} is not auto, cpu, cuda, cuda:N or mps (a GPU is "
                         f"cuda)")
    kind, _, index = device.partition(":")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "cuda" and int(index or 0) >= gpus:
        found = f"only {gpus} CUDA GPU(s)" if gpus else "no CUDA GPU"
        raise ValueError(f"device={device!r} but torch finds {found}; pass --device=cpu (or auto)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} but torch finds no Apple GPU (MPS); pass "
                         f"--device=cpu (or auto)")


def usage():
    """--help: the docstring, then every TrainConfig key with its default and comment."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    lines = [__doc__, "Training keys (the train: section of a YAML file, or --key=value) and their "
             "defaults:"]
    for line in inspect.getsource(TrainConfig).splitlines():
        field = re.match(r"    (\w+): [^=]+=[^#]*(?:# (.*))?$", line)
        if field and field[1] in defaults:
            v = defaults[field[1]]
            v = "null" if v is None else str(v).lower() if isinstance(v, bool) else v
            v = json.dumps(v) if isinstance(v, str) and not v.isprintable() else v  # "\n"
            lines.append((f"  --{field[1]}={v}".ljust(30) + (field[2] or "")).rstrip())
        elif line.startswith("    # "):
            lines.append(f"  {line.strip()}")
    lines.append("Model keys: the fields of Config in model.py (the top level of a YAML file, or "
                 "--key=value).")
    return "\n".join(lines)


def parse_config(argv):
    """[config.yaml] [--key=value ...] -> (TrainConfig, model keys given, checkpoint to resume).

    Without a YAML file the model keys come from configs/tiny.yaml, or with --resume from the
    checkpoint, whose train config is then the base too. A model key that differs from the
    checkpoint's is an error (its weights would not fit), except the RESUMABLE ones.
    """
    if "-h" in argv or "--help" in argv:
        print(usage())
        raise SystemExit(0)
    files = [a for a in argv if not a.startswith("--")]
    if len(files) > 1 or any(not f.endswith((".yaml", ".yml")) for f in files):
        pairs = [f"{a}={b}" for a, b in zip(argv, argv[1:]) if a.startswith("--") and "=" not in a
                 and not b.startswith("--")]  # --key value: the same with '='
        fix = f"; write {' '.join(pairs)}" if pairs else ""
        raise ValueError(f"expected at most one YAML config file, then --key=value overrides "
                         f"(with '='); got {files}{fix}")
    cli = dict(a[2:].partition("=")[::2] if "=" in a else (a[2:], "true")
               for a in argv if a.startswith("--"))
    bare = {a[2:] for a in argv if a.startswith("--") and "=" not in a}  # --flag: true
    resume = str(cli.get("resume", "false")).lower() in ("true", "1", "yes")
    init = str(cli.get("init_from", "null")).lower() not in ("null", "none")
    # a run that loads weights takes its model from them, not from configs/tiny.yaml
    path = files[0] if files else None if resume or init else DEFAULT_MODEL
    raw = typed_keys(read_config_file(path) if path is not None else {}, cli, bare)
    model_fields = {f.name for f in dataclasses.fields(Config)}
    train = {k: v for k, v in raw.items() if k not in model_fields}
    model_keys = {k: v for k, v in raw.items() if k in model_fields}
    ckpt = None
    if train.get("resume"):  # asked for on the command line or in the YAML file
        train, ckpt = resume_config(train, model_keys)
    return TrainConfig(**train), model_keys, ckpt


def read_config_file(path):
    """A YAML config's keys: the model's at the top level, the training keys under train:, each
    in its place (so that model.py reads the file too)."""
    model_fields = {f.name for f in dataclasses.fields(Config)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    raw = read_yaml(path)
    section = raw.pop("train", None) or {}
    raw = from_seed_schema(raw)  # the Modern Transformer seed's key names, as model.py reads them
    if not isinstance(section, dict):
        raise ValueError(f"train: in {path} must be a mapping: training keys indented under it, "
                         f"one per line")
    for key in raw:
        if key in train_fields:
            raise ValueError(f"{key!r} in {path} is a training key (TrainConfig in train.py): move "
                             f"it under train:")
    for key in section:
        if key in model_fields:
            raise ValueError(f"{key!r} under train: in {path} is a model key (Config in model.py): "
                             f"move it to the top level")
    return {**raw, **section}


def typed_keys(raw: dict, cli: dict, bare: set):
    """The file's keys (raw) overridden by the command line's (cli: strings, read as YAML scalars
    unless the field is a string; bare: given as --flag), each a known key with a value of its
    field's type (Config's or TrainConfig's)."""
    import yaml
    fields = {f.name: f.type for cls in (Config, TrainConfig) for f in dataclasses.fields(cls)}
    unknown = [k for k in {**raw, **cli} if k not in fields]
    if any(k in FOREIGN_FLAGS for k in unknown):  # every other project's flag at once, with ours
        raise ValueError("unknown config keys: " + "; ".join(
            f"--{k}: use {FOREIGN_FLAGS[k]}" if k in FOREIGN_FLAGS else f"--{k}" for k in unknown))
    typed = {}
    for key, value in {**raw, **cli}.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint} (keys: TrainConfig in train.py, "
                             f"Config in model.py)")
        allowed = get_args(fields[key]) or (fields[key],)
        if key in bare and bool not in allowed:
            raise ValueError(f"--{key} needs a value: --{key}=... (only true/false keys may be "
                             f"given bare)")
        if key in cli and type(None) in allowed and value.lower() in ("null", "none"):
            value = None
        elif key in cli and str not in allowed:  # a YAML scalar or list, unless a string field
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError(f"--{key}={value} is not a valid value") from None
        if isinstance(value, str) and float in allowed:
            try:  # YAML 1.1 reads 3e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        typed[key] = check_type(key, value, fields[key])
    return typed


def resume_config(train: dict, model_keys: dict):
    """--resume: out_dir/ckpt.pt, and the training keys this run continues with (the checkpoint's,
    overridden by those given); the checkpoint must be one train.py wrote, with the same model
    config (but RESUMABLE keys), optimizer and init_from. Returns (training keys, checkpoint)."""
    ckpt_path = Path(train.get("out_dir", TrainConfig.out_dir)) / "ckpt.pt"
    if not ckpt_path.is_file():
        raise ValueError(f"resume=true but {ckpt_path} does not exist; pass the --out_dir of "
                         f"an earlier run or drop --resume")
    ckpt = load_checkpoint(ckpt_path)
    if any(k not in ckpt for k in RESUME_KEYS):
        raise ValueError(f"{ckpt_path} holds weights only, so it cannot resume a run (as "
                         f"ckpt_best.pt and exports); pass the out_dir of a ckpt.pt that "
                         f"train.py wrote, or drop --resume")
    differ = {k: (ckpt["config"].get(k), v) for k, v in model_keys.items()
              if k not in RESUMABLE and Config.from_dict({**ckpt["config"], k: v})
              != Config.from_dict(ckpt["config"])}
    for key in ("optimizer", "init_from"):  # a resumed run keeps its optimizer and start
        if key in train and train[key] != ckpt["train_config"].get(key):
            differ[key] = (ckpt["train_config"].get(key), train[key])
    if differ:
        what = ", ".join(f"{k}={old!r} (this run: {new!r})" for k, (old, new) in differ.items())
        raise ValueError(f"cannot resume {ckpt_path}: it was trained with {what}; pass the "
                         f"same model config and optimizer, or a new --out_dir")
    given, train = set(train), {**ckpt["train_config"], **train}
    if train.get("eval_only") and "export" not in given:  # evaluating exports nothing
        train["export"] = "none"
    if train.get("max_iters", TrainConfig.max_iters) < ckpt["iter"]:
        raise ValueError(f"cannot resume {ckpt_path} at iter {ckpt['iter']} with "
                         f"max_iters={train['max_iters']}; pass --max_iters={ckpt['iter']} "
                         f"or more")
    return train, ckpt


def get_lr(it, tc: TrainConfig):
    """Linear warmup to lr, then cosine decay to min_lr at lr_decay_iters (nanoGPT; SGDR,
    arXiv:1608.03983)."""
    decay_iters = tc.max_iters if tc.lr_decay_iters is None else tc.lr_decay_iters
    if it < tc.warmup_iters:
        return tc.lr * (it + 1) / (tc.warmup_iters + 1)
    if it >= decay_iters:
        return tc.min_lr
    ratio = (it - tc.warmup_iters) / max(1, decay_iters - tc.warmup_iters)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.lr - tc.min_lr)


# ----------------------------------------------------------------------------------------------
# Set-up: checks, device and processes, data, optimizer


def check_run(tc: TrainConfig, arch: Config, objective: str, pair_task: str):
    """What needs the model config too, checked before anything is written: out_dir, and whether
    the objective, the data and segments fit the model (the vocabulary waits for the data).
    Returns the checkpoints already in out_dir."""
    out_dir = Path(tc.out_dir)
    parent = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if tc.eval_only:  # writes nothing: out_dir need not be writable, its checkpoints stay
        parent = None
    elif not parent.is_dir():
        where = "is a file" if parent == out_dir else f"is inside {parent}, a file"
        raise ValueError(f"out_dir={tc.out_dir!r} {where}, not a directory; pass another --out_dir")
    if parent and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir={tc.out_dir!r} cannot be written ({parent}: permission denied); "
                         f"pass another --out_dir")
    found = [name for name in CHECKPOINTS if (out_dir / name).exists()]
    if found and not (tc.resume or tc.overwrite or tc.eval_only):
        raise ValueError(f"out_dir={tc.out_dir!r} holds {', '.join(found)} from another run; pass "
                         f"--resume to continue it, another --out_dir, or --overwrite=true to "
                         f"replace it")
    check_objective(objective, arch, None, pair_task)
    tsv = {"seq2seq": ("source<TAB>target", "pairs"), "classify": ("text<TAB>label", "labels")}
    if objective in tsv and (tc.data in CORPORA or Path(tc.data).is_dir()):
        lines, example = tsv[objective]
        raise ValueError(f"objective={objective} reads {lines} lines from a text file, not "
                         f"data={tc.data!r}; pass --data={example}.tsv")
    if tc.sift and objective != "classify":
        raise ValueError(f"sift=true perturbs a classifier's inputs: it needs objective=classify "
                         f"(here {objective}); drop --sift")
    K, T = tc.segments, arch.block_size
    if K > 1 and not (arch.block_width and objective == "lm"):
        raise ValueError(f"segments={K} carries block-recurrent state from call to call: it needs "
                         f"objective=lm and a config with block_width > 0 (here {objective}, "
                         f"block_width={arch.block_width}); use segments=1 or a block-recurrent "
                         f"config such as configs/brt_enwik8.yaml")
    if K > 1 and arch.grad_checkpoint:  # the recomputation would run on the advanced cache
        raise ValueError(f"grad_checkpoint recomputes each block in backward, and with "
                         f"segments={K} that would update the carried state a second time; turn "
                         f"one of them off")
    if K > 1 and arch.positions_bounded:
        raise ValueError(f"segments={K} runs positions up to {K * T - 1}, past the {arch.position} "
                         f"position table of block_size={T}; use position: rope or dynamic_bias, "
                         f"or segments=1")
    if tc.export == "hf":  # the family is matched now: no run ends in an export that cannot be
        try:
            hf_config(arch)
            check_target(out_dir / "hf")
        except ValueError as e:
            raise ValueError(f"export=hf: {e}") from None
    return found


class Init(NamedTuple):
    """What --init_from starts a run from."""
    config: dict                      # the model's Config fields
    model: dict                       # its state dict (named as in a checkpoint)
    tokenizer: str | None             # the --tokenizer that rebuilds its tokenizer; None: none does
    tokenizer_meta: dict | None       # that tokenizer as the data must give it back (char, bpe)
    token_ids: dict                   # a HF directory's bos/eos/pad ids, for --export=hf
    classes: list | None = None       # a classifier's labels (a checkpoint's, id2label's)
    specials: str | None = None       # our checkpoint's special tokens: own | appended


# a checkpoint's tokenizer -> the --tokenizer name that makes it again; char and bpe are fitted to
# the text they are prepared from, so train() checks that the data gives them back unchanged
TOKENIZER_NAMES = {"byte": lambda meta, path: "byte", "tiktoken": lambda meta, path: meta["name"],
                   "char": lambda meta, path: "char", "bpe": lambda meta, path: "bpe",
                   "hf": lambda meta, path: f"hf:{path}"}  # the checkpoint keeps its json
HF_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def load_init(path) -> Init:
    """--init_from: a HF-format directory (hf.from_pretrained, its tokenizer.json if it has one) or
    a checkpoint of ours (ckpt.pt, ckpt_best.pt, an fp16/bf16 export; its tokenizer); a Hub model
    id (gpt2, org/name) is such a directory once hf.hub_dir has downloaded it."""
    path = hub_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"init_from={str(path)!r} is a directory without config.json, so not "
                             f"a HF-format one; pass such a directory, or a checkpoint file (e.g. "
                             f"{path / 'ckpt_best.pt'})")
        model = from_pretrained(path)
        source = read_json(path / "config.json")
        source = {**source, **source.get("text_config", {})}  # multimodal: the text model's ids
        tok = f"hf:{path}" if (path / "tokenizer.json").is_file() else None
        return Init(dataclasses.asdict(model.config), model.state_dict(), tok, None,
                    {k: source[k] for k in HF_TOKEN_IDS if source.get(k) is not None},
                    class_names(path) if model.config.cls_head else None)
    ckpt = load_checkpoint(path)
    meta = ckpt.get("tokenizer")
    name = TOKENIZER_NAMES[meta["kind"]](meta, path) if meta and meta["kind"] in TOKENIZER_NAMES \
        else None
    # (written before "specials" existed: ours were appended)
    return Init(ckpt["config"], ckpt["model"], name, meta, ckpt.get("hf_token_ids") or {},
                ckpt.get("classes"), ckpt.get("specials", "appended"))


def shapes(raw: dict) -> dict:
    """Every weight's shape in a model of these Config fields (built on the meta device: no memory,
    no time)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in Transformer(Config.from_dict(raw)).state_dict().items()}


def croppable(got, want):
    """A table the weights hold with more rows than the model now has: a learned position table
    under a smaller block_size, cut to its first rows (nanoGPT's crop_block_size)."""
    return len(got) == len(want) and got[0] > want[0] and got[1:] == want[1:]


def check_overrides(init: Init, model_keys: dict, source):
    """init_from: model keys may change what the weights do (dropout, drop_path, grad_checkpoint,
    ...), or crop a position table, but not a weight's shape: the first key that does is a one-line
    error."""
    want = shapes(init.config)
    for key, value in model_keys.items():
        got = shapes({**init.config, key: value})
        crop = key == "block_size"
        if got.keys() != want.keys() or any(got[k] != v and not (crop and croppable(v, got[k]))
                                            for k, v in want.items()):
            raise ValueError(f"{key}={value!r} changes the shape of weights that init_from="
                             f"{source} holds (there {key}={init.config.get(key)!r}); drop it to "
                             f"fine-tune those weights, or train a new model without init_from")


def starting_point(tc: TrainConfig, model_keys: dict, ckpt: dict | None):
    """What a run starts from, checked before anything is written: the weights and model config of
    the resumed checkpoint, of init_from (whose tokenizer is then the default) or of the model keys
    alone. Returns (tc with its tokenizer named, Init or None, Config)."""
    init = load_init(tc.init_from) if tc.init_from is not None and ckpt is None else None
    if init is not None:
        check_overrides(init, model_keys, tc.init_from)
        if tc.tokenizer == "auto" and init.tokenizer is None:
            raise ValueError(f"init_from={tc.init_from} brings no tokenizer (a HF directory "
                             f"without tokenizer.json): pass --tokenizer (hf:PATH, byte, ...), "
                             f"its ids within vocab_size={init.config['vocab_size']}")
    if tc.tokenizer == "auto":
        tc = dataclasses.replace(tc, tokenizer=init.tokenizer if init is not None else "char")
    source = ckpt["config"] if ckpt else init.config if init is not None else {}
    return tc, init, Config.from_dict({**source, **model_keys})


def check_vocab(vocab_size, arch: Config, tok, sp, objective, source):
    """init_from: the weights fix the vocabulary, so the tokenizer's ids (and the special tokens of
    ours appended after them, when the tokenizer lacks its own: special_tokens) must fit it."""
    if vocab_size > arch.vocab_size:
        extra = vocab_size - tok.vocab_size
        ours = f" + {extra} special tokens of objective {objective}" if extra else ""
        why = ""
        fix = f"pass a --tokenizer with at most {arch.vocab_size - extra} ids (byte has 256)"
        if extra and sp.missing and tok.specials:  # a tokenizer with special tokens, not these
            why = f": it has no {spelled(sp.missing)} token of its own, which {objective} needs, " \
                  f"so ours are appended after its ids"
            fix = f"use another objective, or {fix}"
        raise ValueError(f"the tokenizer's {tok.vocab_size} ids{ours} do not fit the "
                         f"{arch.vocab_size} embeddings of init_from={source}{why}; {fix}")


class Env(NamedTuple):
    """Where this process runs: rank and world size (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE),
    device and training precision."""
    rank: int
    world: int
    device: str
    dtype: str                        # fp32 | bf16 | fp16
    distributed: bool

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return self.device.split(":")[0]

    def autocast(self):
        if self.dtype == "fp32":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.dtype])


def init_env(tc: TrainConfig) -> Env:
    """Device, precision and the process group."""
    distributed = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) \
        if distributed else (0, 0, 1)
    device = tc.device if tc.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    if distributed and cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    dtype = tc.dtype
    if dtype == "auto":
        dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Env(rank, world, device, dtype, distributed)


def data_dir_name(data, tokenizer):
    """out_dir/data/<this>: one safe path component for any data and tokenizer string (a tokenizer
    may be a path, hf:/dir/tokenizer.json); a hash keeps strings apart that replacing unsafe
    characters (or cutting a long name) would merge."""
    name = f"{data if data in CORPORA else Path(data).stem}-{tokenizer}"
    safe = re.sub(r"[^\w.-]", "_", name)[:80]
    return safe if safe == name else f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"


def read_meta(data_dir):
    """meta.json of a prepared data directory, with its .bin files there: a one-line ValueError
    naming the file otherwise."""
    path, fix = data_dir / "meta.json", "prepare the data again (data/prepare.py)"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tokenizer"), dict) \
            or meta.get("dtype") not in ("uint16", "uint32"):
        raise ValueError(f"{path} lacks a tokenizer entry or a uint16/uint32 dtype; {fix}")
    for name in ("train.bin", "val.bin"):
        if not (data_dir / name).is_file():
            raise ValueError(f"{data_dir} has meta.json but no {name}; {fix}")
    return meta


def load_data(tc: TrainConfig, arch: Config, objective: str, env: Env, scratch=None):
    """(tokenizer, {"train": ..., "val": ...}): the corpus tokenised once into out_dir/data by
    rank 0, then mapped by every rank, or the lines of a .tsv file for seq2seq (source/target
    pairs) and classify (labeled texts). Token ids are checked against the tokenizer here, once,
    so that no step needs a device sync to check them. With a scratch directory (eval_only,
    which writes nothing) data that out_dir does not hold prepared yet is prepared there, by every
    rank."""
    if (Path(tc.data) / "meta.json").is_file():
        data_dir = Path(tc.data)
    else:
        name = data_dir_name(tc.data, tc.tokenizer)
        data_dir = Path(tc.out_dir) / "data" / name
        stamp = fingerprint(tc.data, tc.tokenizer, tc.bpe_vocab_size)
        if scratch and not (stamp and cached_meta(data_dir / "meta.json").get("fingerprint")
                            == stamp):
            data_dir = Path(scratch) / name  # not prepared in out_dir yet
        if env.master or scratch:
            prepare(tc.data, data_dir, tc.tokenizer, tc.bpe_vocab_size)
        if env.distributed:
            dist.barrier()
    meta = read_meta(data_dir)
    tok = get_tokenizer(meta["tokenizer"])
    if objective == "seq2seq":  # source<TAB>target lines (the tokenizer was fitted to the file)
        pairs = load_pairs(tc.data, tok)
        n_val = int(len(pairs) * VAL_FRACTION)
        if n_val < 1:
            raise ValueError(f"data={tc.data!r} has {len(pairs)} source/target lines; a train/val "
                             f"split needs at least {math.ceil(1 / VAL_FRACTION)} (pass a longer "
                             f"file)")
        return tok, {"train": pairs[:-n_val], "val": pairs[-n_val:]}
    if objective == "classify":  # text<TAB>label lines; the classes are the train lines' labels
        train, val = load_labeled(tc.data, tok)
        return tok, {"train": train, "val": val}
    splits = {s: load_tokens(data_dir / f"{s}.bin", meta["dtype"]) for s in ("train", "val")}
    window = tc.segments * arch.block_size
    for s, d in splits.items():
        if len(d) <= window:
            what = f"{tc.segments} segments x block_size={arch.block_size}" if tc.segments > 1 \
                else f"block_size={arch.block_size}"
            raise ValueError(f"the {s} split of data={tc.data!r} has {len(d)} tokens, not more "
                             f"than {what}; use a longer text or a smaller --block_size")
        top = max(int(chunk.long().max()) for chunk in d.split(1 << 24))  # no uint16 max kernel
        if top >= tok.vocab_size:
            raise ValueError(f"{data_dir / f'{s}.bin'} holds token id {top}, outside its "
                             f"tokenizer's {tok.vocab_size} ids; prepare the data again "
                             f"(data/prepare.py) or pass the text file")
    return tok, splits


def check_same_data(tc: TrainConfig, ckpt, init: Init | None, tok, classes, arch: Config):
    """The data must give back what the loaded weights were trained with: the resumed run's
    tokenizer and classes, and init_from's tokenizer when it is fitted to its text (char, bpe)."""
    if ckpt is not None and ckpt["tokenizer"] != tok.meta:
        raise ValueError(f"cannot resume {Path(tc.out_dir) / 'ckpt.pt'}: its tokenizer "
                         f"({ckpt['tokenizer']['kind']}) differs from the one prepared for "
                         f"data={tc.data!r}; pass the data it was trained on")
    if ckpt is not None and classes is not None and ckpt.get("classes") != classes:
        raise ValueError(f"cannot resume {Path(tc.out_dir) / 'ckpt.pt'}: it classifies "
                         f"{ckpt.get('classes')}, the train lines of data={tc.data!r} have "
                         f"{classes}; pass the data it was trained on")
    if init is not None and init.tokenizer_meta not in (None, tok.meta) \
            and tc.tokenizer == init.tokenizer:
        raise ValueError(f"init_from={tc.init_from}'s {tok.meta['kind']} tokenizer is fitted to "
                         f"the text it was trained on, and data={tc.data!r} gives another; "
                         f"fine-tune on text that gives the same vocabulary, or pass a "
                         f"--tokenizer whose ids fit vocab_size={arch.vocab_size}")


def with_classes(model, n_classes):
    """A pretrained model (an --init_from checkpoint or HF directory) with a new n_classes-way
    classifier for objective=classify: every other weight as it was, including a pretrained
    encoder's pooler (as HF's *ForSequenceClassification keeps it); the classifier (and a pooler
    the model lacks) freshly initialized."""
    cfg = dataclasses.replace(model.config, cls_head=True, n_classes=n_classes)
    new = Transformer(cfg).to(next(model.parameters()).device)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("cls.")}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and {k.split(".")[0] for k in missing} <= {"cls", "pooler"}, missing
    return new


def build_model(tc: TrainConfig, model_keys: dict, arch: Config, ckpt, init: Init | None, tok,
                sp, objective, classes, env: Env):
    """The model to train, on env.device: arch with the tokenizer's vocabulary and the keys the
    objective needs (config_overrides: the decoder starts from our [PAD] when ours are appended,
    not the YAML's id) and, for classify, a classifier of the train split's classes; the weights of
    the resumed checkpoint or init_from, where the run has them. init_from's weights fix every
    shape: a classifier of other classes is replaced by a new one (with_classes)."""
    need = {"vocab_size": tok.vocab_size, **config_overrides(objective, sp, arch.architecture)}
    need["vocab_size"] = model_keys.get("vocab_size", need["vocab_size"])
    if classes is not None:  # the classifier's width is the train split's label count
        if model_keys.get("n_classes", len(classes)) != len(classes):
            raise ValueError(f"n_classes={model_keys['n_classes']} but the train lines of "
                             f"data={tc.data!r} have {len(classes)} labels; drop --n_classes")
        need.update(cls_head=True, n_classes=len(classes))
    if init is not None:  # the weights fix the vocabulary; the objective's other keys keep shapes
        check_vocab(need.pop("vocab_size"), arch, tok, sp, objective, tc.init_from)
        need = {k: v for k, v in need.items() if k not in ("cls_head", "n_classes")}
        cfg = dataclasses.replace(arch, **{k: v for k, v in need.items() if k not in model_keys})
    else:
        cfg = arch if ckpt is not None else Config.from_dict({**model_keys, **need})
    model = Transformer(cfg).to(env.device)
    weights = ckpt["model"] if ckpt else init.model if init is not None else None
    if weights is not None:  # (a position table longer than block_size: its first rows)
        want = model.state_dict()
        model.load_state_dict({k: v[:len(want[k])] if k in want and v.shape != want[k].shape
                               else v for k, v in weights.items()})
    if init is not None and classes is not None and init.classes != classes:
        model = with_classes(model, len(classes))
    return model


def summary(model, tok, sp, splits, objective, pair_task, init: Init | None, tc: TrainConfig,
            env: Env):
    """The run in one line: size, architecture, objective, tokenizer, data and device."""
    classes = splits["train"].classes if objective == "classify" else None
    task = objective + (f" + {pair_task}" if pair_task != "none" else "") + \
        (f" of {len(classes)} classes" if classes else "") + (" + SiFT" if tc.sift else "")
    unit = {"seq2seq": "pairs", "classify": "texts"}.get(objective, "tokens")
    start = f"; from {tc.init_from}" if init is not None else ""
    ours = f" + {sp.n_ids - sp.vocab} special tokens" if sp.appended else ""
    return (f"{model.get_num_params() / 1e6:.2f}M parameters, {model.config.architecture}, "
            f"objective {task}{start}; {tok.meta.get('name', tok.meta['kind'])} tokenizer, vocab "
            f"{tok.vocab_size}{ours}; {len(splits['train']):,} train / {len(splits['val']):,} "
            f"val {unit}; {env.device} {env.dtype}, world {env.world}")


def shard(model):
    """FSDP2: one all-gather per block in forward, then the rest (embeddings, heads)."""
    from torch.distributed.fsdp import fully_shard
    stacks = (model.encoder, model.decoder) if model.config.architecture == "encoder_decoder" \
        else (model,)
    for block in (b for stack in stacks for b in stack.blocks):
        fully_shard(block)
    fully_shard(model)


def make_optimizers(model, tc: TrainConfig, env: Env):
    """AdamW with weight decay on matrices (MoE expert stacks (E, out, in) too), not on biases
    (MoE's (E, out) ones too) or norm gains. With muon the hidden nn.Linear matrices go to Muon,
    which takes 2-D matrices and, as its authors advise, not the embeddings or output heads."""
    params = dict(model.named_parameters())
    hidden = {id(m.weight) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not n.endswith(("lm_head", "cls"))}
    hidden -= {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}  # tied
    muon = {n for n, p in params.items() if tc.optimizer == "muon" and id(p) in hidden}
    decay = [p for n, p in params.items() if n not in muon and p.dim() >= 2
             and not n.endswith("bias")]
    no_decay = [p for n, p in params.items() if p.dim() < 2 or n.endswith("bias")]
    # fused: one kernel over all tensors (CUDA, and CPU since torch 2.4: 2-3x the per-tensor loop)
    optimizers = [torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr,
                                    betas=(tc.beta1, tc.beta2),
                                    fused=env.device_type in ("cuda", "cpu"))]
    if muon:  # Jordan et al. 2024; Moonlight's RMS matching (arXiv:2502.16982) shares AdamW's lr
        optimizers.append(torch.optim.Muon([params[n] for n in sorted(muon)], lr=tc.lr,
                                           weight_decay=tc.weight_decay,
                                           adjust_lr_fn="match_rms_adamw"))
    return optimizers


def load_state(ckpt, model, optimizers, scaler, data_gen, tc: TrainConfig, env: Env):
    """Continue where ckpt stopped: optimizer and scaler state, the data position and every rank's
    RNG; returns (iter, best val loss, tokens seen). The optimizers keep this run's hyperparameters
    (betas, weight decay): loading a state dict would bring back the checkpoint's."""
    hyper = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
             for opt in optimizers]
    if tc.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )
        for opt, sd in zip(optimizers, ckpt["optimizer"]):
            if sd:  # {}: saved before the first step (see full_state)
                set_optimizer_state_dict(model, opt, sd,
                                         options=StateDictOptions(full_state_dict=True))
    else:
        for opt, sd in zip(optimizers, ckpt["optimizer"]):
            opt.load_state_dict(sd)
    for opt, groups in zip(optimizers, hyper):
        for group, h in zip(opt.param_groups, groups):
            group.update(h)
    if ckpt["scaler"]:  # empty when saved by a disabled (non-fp16) scaler
        scaler.load_state_dict(ckpt["scaler"])
    data_gen.set_state(ckpt["rng"]["data"])
    if len(ckpt["rng"]["torch"]) == env.world:
        torch.set_rng_state(ckpt["rng"]["torch"][env.rank])
        if env.device_type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][env.rank])
    if env.master:
        print(f"resumed {Path(tc.out_dir) / 'ckpt.pt'} at iter {ckpt['iter']} (best val loss "
              f"{ckpt['best_val_loss']:.4f})")
    return ckpt["iter"], ckpt["best_val_loss"], ckpt["tokens"]


# ----------------------------------------------------------------------------------------------
# The loop's parts: batches, micro-steps, evaluation, checkpoints, metrics, sample, export


def get_batch(data, gen, n, make, tc: TrainConfig, env: Env, model):
    """n micro-batches for this rank from data (a split), each a list of forward()'s keyword
    arguments: one dict, or with segments > 1 one per segment, all sharing a fresh cache that
    carries the state from one to the next. make(data, rows, gen) draws a batch dict. Every rank
    draws the whole global batch from the same generator and keeps its rows: the run is the same
    for any world size."""
    B, K, T = tc.batch_size, tc.segments, model.config.block_size
    for _ in range(n):
        batch = make(data, env.world * B, gen)
        batch = {k: v[env.rank * B:(env.rank + 1) * B] for k, v in batch.items()}      # (B, ...)
        if env.device_type == "cuda":
            batch = {k: v.pin_memory().to(env.device, non_blocking=True) for k, v in batch.items()}
        else:
            batch = {k: v.to(env.device) for k, v in batch.items()}
        if K == 1:
            yield [batch]
            continue
        x, y = batch["input_ids"], batch["targets"]                               # (B, K * T)
        cache = model.setup_cache(B, K * T, device=env.device)
        yield [{"input_ids": x[:, i * T:(i + 1) * T], "targets": y[:, i * T:(i + 1) * T],
                "cache": cache, "input_pos": torch.arange(i * T, (i + 1) * T, device=env.device)}
               for i in range(K)]


def forward_backward(model, micro_batches, tc: TrainConfig, env: Env, scaler, raw_model=None):
    """The gradients of one optimizer step: each of the grad_accum x segments losses is divided by
    their number, so the sum is the gradient of their mean. DDP (and FSDP) sync only on the last
    backward. With sift, each loss also gets SiFT's term (sift_loss, run on raw_model, the model
    unwrapped). Returns the mean loss (without SiFT's term) over micro-batches and ranks, a tensor
    (no device sync here)."""
    n = tc.grad_accum * tc.segments
    loss_sum = torch.zeros((), device=env.device)
    for micro, segments in enumerate(micro_batches):
        for i, batch in enumerate(segments):
            last = micro == tc.grad_accum - 1 and i == len(segments) - 1
            if tc.fsdp:
                model.set_requires_gradient_sync(last)
            with model.no_sync() if env.distributed and not tc.fsdp and not last else nullcontext():
                with env.autocast():
                    out = model(**batch)
                    loss = (out.loss + out.aux_loss) / n
                    if tc.sift:
                        loss = loss + tc.sift_weight / n * sift_loss(raw_model, batch,
                                                                     out.cls_logits, tc)
                loss_sum += out.loss.detach().float() / n
                del out  # the logits: backward does not need them, so they go before it runs
                scaler.scale(loss).backward()
            for c in batch.get("cache", ()):  # truncated backprop: the next segment's stop here
                c.detach()
    if env.distributed:
        dist.all_reduce(loss_sum)  # SUM (gloo has no AVG): every rank sees it and stops together
        loss_sum /= env.world
    return loss_sum


def sift_loss(model, batch, clean, tc: TrainConfig):
    """SiFT, DeBERTa's virtual adversarial training for fine-tuning (He et al. 2020,
    arXiv:2006.03654 sec. 3.3; VAT, Miyato et al. 2018; SMART, Jiang et al. 2020): the symmetric
    KL between the classifier's logits `clean` (B, n_classes) on the batch and its logits when the
    normalized embeddings carry the adversarial perturbation (sift_perturbation). Gradients reach
    the model through both."""
    with perturbed_embeddings(model, sift_perturbation(model, batch, clean, tc)):
        adversarial = model(**batch).cls_logits
    return symmetric_kl(clean, adversarial)


def sift_perturbation(model, batch, clean, tc: TrainConfig):
    """The perturbation (B, T, E) of the normalized embeddings that most changes the prediction,
    by one power-iteration step: a random start d ~ N(0, sift_eps^2), then one ascent step on the
    symmetric KL to the (fixed) clean logits, scaled per token by its largest coordinate as
    DeBERTa's and SMART's code do: d + sift_step * g / max|g|."""
    ids = batch["input_ids"]
    d = torch.randn(*ids.shape, model.wte.embedding_dim, device=ids.device) * tc.sift_eps
    d.requires_grad_()
    with perturbed_embeddings(model, d):
        divergence = symmetric_kl(clean.detach(), model(**batch).cls_logits)
    g, = torch.autograd.grad(divergence, d)
    largest = g.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)  # 0: padding
    return (d + tc.sift_step * g / largest).detach()


@contextmanager
def perturbed_embeddings(model, d):
    """Inside, the model's summed embeddings e (B, T, E) enter its embedding norm as e + s * d,
    s each token's standard deviation: d is added to the normalized embeddings (e - mean) / s,
    a perturbation relative to their scale (SiFT's scale invariance). Under a LayerNorm (BERT,
    DeBERTa) that is LN((e - mean) / s + d), where DeBERTa's code adds it; a model without an
    embedding norm (an identity there) reads e + s * d."""
    hook = model.embed_norm.register_forward_pre_hook(
        lambda module, args: (args[0] + args[0].std(-1, keepdim=True, correction=0) * d,))
    try:
        yield
    finally:
        hook.remove()


def symmetric_kl(p_logits, q_logits):
    """KL(p || q) + KL(q || p) of two (B, C) logits, in fp32, averaged over the rows."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1).mean()


@torch.no_grad()
def estimate_loss(model, batches, tc: TrainConfig, env: Env):
    """Mean loss per split over eval_iters batches (and their segments), the same batches at every
    evaluation; batches(split, gen, n) is get_batch for that split. Classification batches (cls
    targets only) also give the classifier's accuracy over them, as "<split>_accuracy"."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        total, correct = torch.zeros((), device=env.device), torch.zeros((), device=env.device)
        for segments in batches(split, torch.Generator().manual_seed(tc.seed + 1), tc.eval_iters):
            for batch in segments:
                with env.autocast():
                    result = model(**batch)
                total += result.loss.float() / len(segments)
                classifying = "cls_targets" in batch and "targets" not in batch
                if classifying:
                    right = result.cls_logits.argmax(-1) == batch["cls_targets"]
                    correct += right.float().mean()
        if env.distributed:
            dist.all_reduce(total)
            dist.all_reduce(correct)
        out[split] = total.item() / (tc.eval_iters * env.world)
        if classifying:
            out[f"{split}_accuracy"] = correct.item() / (tc.eval_iters * env.world)
    model.train()
    return out


def check_finite(what, value, it, lr, last_good):
    """A NaN/inf loss ends the run before it steps or saves on it."""
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value} at iter {it} (lr {lr:.3g}); stopped; "
                                 f"{last_good}; lower --lr or raise --warmup_iters")


def checkpoint_meta(tok, objective, pair_task, sp, cfg: Config, classes, init: Init | None,
                    ckpt):
    """What every checkpoint and export holds besides weights and config: the tokenizer, the
    objective, its special tokens (own or appended), a classifier's labels, and a HF directory's
    bos/eos/pad ids for --export=hf (kept by resumed and re-initialised runs too)."""
    meta = {"tokenizer": tok.meta, "objective": objective, "pair_task": pair_task,
            **({"specials": "appended" if sp.appended else "own"}   # objectives that use them
               if needs(objective, cfg.architecture) else {}),
            **({"classes": classes} if classes else {})}
    token_ids = init.token_ids if init is not None else ckpt.get("hf_token_ids", {}) if ckpt \
        else {}
    if token_ids:
        meta["hf_token_ids"] = token_ids
    return meta


def full_state(model, optimizers, tc: TrainConfig):
    """(a model-like object save_checkpoint reads, optimizer state dicts) with whole tensors: FSDP
    gathers its shards here, every rank taking part."""
    if not tc.fsdp:
        return model, [opt.state_dict() for opt in optimizers]
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    # before the first step there is no state to save, and asking would create it with a zero-lr
    # step that Adam counts, shrinking the first real update by its bias correction
    optim = [get_optimizer_state_dict(model, opt, options=opts) if opt.state else {}
             for opt in optimizers]
    return types.SimpleNamespace(state_dict=lambda: weights, config=model.config), optim


def save_checkpoints(out_dir, model, optimizers, scaler, data_gen, progress, improved, meta,
                     replaced, tc: TrainConfig, env: Env):
    """ckpt.pt (everything to resume: progress, RNG of every rank, data position) and, when the
    val loss improved, ckpt_best.pt (weights for generate.py); then the files of a run this one
    replaces (--overwrite) that it will not rewrite go. Every rank takes part, rank 0 writes;
    save_checkpoint writes a temp file and renames it."""
    torch_rng = [torch.get_rng_state()]
    cuda_rng = [torch.cuda.get_rng_state()] if env.device_type == "cuda" else []
    if env.distributed:  # every rank's RNG, so that dropout resumes exactly on each
        torch_rng, cuda_rng = [None] * env.world, [None] * env.world if cuda_rng else []
        dist.all_gather_object(torch_rng, torch.get_rng_state())
        if cuda_rng:
            dist.all_gather_object(cuda_rng, torch.cuda.get_rng_state().cpu())
    state, optim = full_state(model, optimizers, tc)
    if env.master:
        rng = {"torch": torch_rng, "cuda": cuda_rng, "data": data_gen.get_state()}
        save_checkpoint(out_dir / "ckpt.pt", state, optimizer=optim, scaler=scaler.state_dict(),
                        train_config=dataclasses.asdict(tc), rng=rng, **progress, **meta)
        if improved:
            save_checkpoint(out_dir / "ckpt_best.pt", state, iter=progress["iter"],
                            val_loss=progress["best_val_loss"], **meta)
        for name in replaced:
            path = out_dir / name
            if path.is_dir():  # hf/
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def report_eval(metrics, it, losses, bits, ppl, improved, env: Env):
    """The eval line and its metrics record; ppl=True (a mean loss per token) adds perplexity,
    bits=True (a loss per byte) bits per byte."""
    record = {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"]}
    if ppl:
        record.update(train_ppl=math.exp(losses["train"]), val_ppl=math.exp(losses["val"]))
    if bits:
        record.update(train_bpb=losses["train"] / math.log(2), val_bpb=losses["val"] / math.log(2))
    if "val_accuracy" in losses:  # a classifier
        record.update(train_accuracy=losses["train_accuracy"], val_accuracy=losses["val_accuracy"])
    if env.master:
        line = ", ".join(f"{split} loss {losses[split]:.4f}"
                         + (f" (ppl {record[f'{split}_ppl']:.2f})" if ppl else "")
                         for split in ("train", "val"))
        print(f"eval iter {it}: {line}"
              + (f", val {record['val_bpb']:.4f} bits/byte" if bits else "")
              + (f", val accuracy {losses['val_accuracy']:.4f}" if "val_accuracy" in losses
                 else "")
              + (" (best)" if improved else ""))
    metrics.write(**record)


class Metrics:
    """out_dir/metrics.jsonl, one JSON record a line (rank 0; other ranks pass path=None). A resumed
    run appends; a fresh run starts the file at its first checkpoint, keeping its lines until then,
    so that a run that stops before saving leaves an earlier run's file as it was."""

    def __init__(self, path, append):
        self.path, self.lines = path, []
        self.file = open(path, "a") if path and append else None

    def write(self, **record):
        if self.path:
            self.lines.append(json.dumps(record) + "\n")
            if self.file:
                self.flush()

    def flush(self):  # called at every checkpoint: opens the file the first time
        if self.path:
            self.file = self.file or open(self.path, "w")
            self.file.writelines(self.lines)
            self.file.flush()
            self.lines.clear()

    def close(self):
        if self.file:
            self.file.close()


def estimate_mfu(model, tok_s, tc: TrainConfig, env: Env):
    """MFU: the model's FLOPs at tok_s tokens/s, 6N + 12 L H hs T per token (PaLM, appendix B),
    over all ranks' peak (peak_tflops, else PEAK_TFLOPS by GPU name); None when no peak is known."""
    cfg = model.config
    flops_per_token = 6 * model.get_num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.hs * \
        cfg.block_size
    gpu_name = torch.cuda.get_device_name() if env.device_type == "cuda" else ""
    peak = tc.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu_name), None)
    return flops_per_token * tok_s / (env.world * peak * 1e12) if peak else None


def cannot_sample(model, objective):
    """Why the end-of-run sample cannot run, or None. Generation decodes with a cache, which a model
    that cannot decode causally (expert-choice MoE) refuses; mlm and classify need one forward
    pass."""
    if objective in ("mlm", "classify"):
        return None
    try:
        model.setup_cache(1, 1)
    except ValueError as e:
        return str(e)
    return None


def sample_text(model, tok, sp, splits, objective, tc: TrainConfig, env: Env, max_tokens=None):
    """Free text from a language model (tc.sample_prompt, then sample_tokens, or max_tokens); for
    the other objectives one val example and the model's answer (data/objectives.show), at most
    max_tokens of it."""
    was_training = model.training
    model.eval()
    if objective == "lm":
        try:
            prompt = tok.encode(tc.sample_prompt) or splits["val"][:1].tolist()
        except ValueError as e:  # the default "\n" may be missing from a char vocabulary
            if tc.sample_prompt != TrainConfig.sample_prompt:
                raise ValueError(f"sample_prompt={tc.sample_prompt!r}: {e}") from None
            prompt = splits["val"][:1].tolist()  # then start from the first val token
        T = model.config.block_size
        prompt = prompt[-(T // 2):]
        n = tc.sample_tokens if max_tokens is None else max_tokens
        gen = torch.Generator(device=env.device).manual_seed(tc.seed)
        with env.autocast():
            ids = model.generate(torch.tensor([prompt], device=env.device), n,
                                 temperature=tc.sample_temperature, generator=gen)
        # an untrained model draws the padding ids of a vocab_size set larger than the tokenizer's
        text = tok.decode([i for i in ids[0].tolist() if i < tok.vocab_size])
    else:
        gen = torch.Generator().manual_seed(tc.seed)  # on the CPU, as the batch makers draw there
        with env.autocast():
            text = show(model, objective, splits["val"], tok, sp, gen, max_tokens)
    model.train(was_training)
    return text


def export(path, model, dtype, meta, tc: TrainConfig, env: Env):
    """Weights only, in half precision (for generate.py or sharing); every rank takes part."""
    state, _ = full_state(model, [], tc)
    if env.master:
        sd = state.state_dict()
        cast = {(v.data_ptr(), v.shape): v.to(dtype) for v in sd.values() if v.is_floating_point()}
        half = {k: cast.get((v.data_ptr(), v.shape), v) for k, v in sd.items()}  # tied: saved once
        save_checkpoint(path, types.SimpleNamespace(state_dict=lambda: half, config=model.config),
                        **meta)
        print(f"wrote {path} ({tc.export} weights)")


def export_hf(path, model, tok, sp, meta, tc: TrainConfig, env: Env):
    """out_dir/hf: a HF-format directory (hf.save_pretrained), with the tokenizer.json the
    tokenizer came from and the bos/eos/pad ids: a HF directory's (meta), and those of the special
    tokens an objective other than lm framed with; a classifier (meta's classes: its labels) as
    the family's *ForSequenceClassification. Every rank takes part (FSDP gathers its shards)."""
    token_ids = dict(meta.get("hf_token_ids", {}))
    if meta["objective"] != "lm":
        token_ids.update(pad_token_id=sp.pad, **{f"{k}_token_id": sp.ids[name] for k, name in
                                                 (("eos", "[EOS]"), ("bos", "[BOS]"))
                                                 if name in sp.ids})
    state, _ = full_state(model, [], tc)
    if env.master:
        if tc.fsdp:  # whole tensors in a plain module: save_pretrained reads its parameters
            model = Transformer(model.config)
            model.load_state_dict(state.state_dict())
        hf_tok = tok if tok.meta["kind"] == "hf" else None
        save_pretrained(model, path, hf_tok, token_ids, meta.get("classes"))
        family = json.loads((path / "config.json").read_text())["model_type"]
        print(f"wrote {path} (HF {family}: config.json, model.safetensors"
              + (", tokenizer.json)" if hf_tok else ")"))


# ----------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    """Run training; returns {"model": the trained (unwrapped) model, "val_loss": last val loss,
    "sample": str, or None when the model cannot sample}."""
    tc, model_keys, ckpt = parse_config(sys.argv[1:] if argv is None else argv)
    try:
        result = train(tc, model_keys, ckpt)
        # gloo aborts the process if the group is destroyed under collectives still in flight
        # (FSDP's prefetches): wait for them
        if dist.is_initialized():
            dist.barrier()
        return result
    finally:  # every exit, errors included, leaves the process group
        if dist.is_initialized():
            dist.destroy_process_group()


def train(tc: TrainConfig, model_keys: dict, ckpt: dict | None):
    """Sections 1-8: check, set up, loop, export, sample; main() returns what this returns."""
    # 1. Config, and every check that does not need the data: nothing is written before them
    tc, init, arch = starting_point(tc, model_keys, ckpt)
    objective = default_objective(arch, tc.data) if tc.objective == "auto" else tc.objective
    pair_task = tc.pair_task if tc.pair_task != "auto" else \
        "nsp" if objective == "mlm" and arch.cls_head else "none"
    kept = check_run(tc, arch, objective, pair_task)  # checkpoints in out_dir: resumed or replaced
    out_dir = Path(tc.out_dir)

    # 2. Device, precision and distributed init
    env = init_env(tc)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank

    # 3. Data: tokenised once into out_dir/data, or the source/target pairs, or the labeled texts
    scratch = tempfile.TemporaryDirectory() if tc.eval_only else None  # eval_only writes nothing
    tok, splits = load_data(tc, arch, objective, env, scratch and scratch.name)
    classes = splits["train"].classes if objective == "classify" else None
    check_same_data(tc, ckpt, init, tok, classes, arch)

    # 4. Model: the tokenizer's ids and the objective's special tokens (data/objectives.py): the
    #    tokenizer's own where it has them all, else ours appended after its ids; a resumed or
    #    re-initialised checkpoint of ours keeps what it was trained with
    choice = ckpt.get("specials", "appended") if ckpt else init.specials if init else None
    sp = special_tokens(tok, objective, arch.architecture, choice)
    raw_model = build_model(tc, model_keys, arch, ckpt, init, tok, sp, objective, classes, env)
    model, cfg = raw_model, raw_model.config  # model is compiled and wrapped; raw_model is saved
    check_objective(objective, cfg, sp, pair_task)
    if env.master:
        print(summary(raw_model, tok, sp, splits, objective, pair_task, init, tc, env))
    T, K = cfg.block_size, tc.segments
    make = partial(lm_batch, T=K * T) if K > 1 else \
        partial(OBJECTIVES[objective], cfg=cfg, sp=sp, pair_task=pair_task)
    batches = lambda split, gen, n: get_batch(splits[split], gen, n, make, tc, env, raw_model)
    bits = tok.meta["kind"] == "byte" and objective == "lm"  # a loss per byte: also bits per byte
    ppl = pair_task == "none" and objective != "classify"  # a mean loss per token
    if tc.eval_only:
        losses = estimate_loss(model, batches, tc, env)
        report_eval(Metrics(None, False), ckpt["iter"] if ckpt else 0, losses, bits, ppl, False,
                    env)
        scratch.cleanup()
        return {"model": raw_model, "val_loss": losses["val"], "sample": None}
    # the end-of-run sample, rehearsed with one token: what it would refuse is refused now
    no_sample = cannot_sample(raw_model, objective)
    if no_sample is None:
        sample_text(raw_model, tok, sp, splits, objective, tc, env, max_tokens=1)
    if tc.fsdp:
        shard(raw_model)

    # 5. Optimizer, scaler, and the state a resumed run continues from
    optimizers = make_optimizers(raw_model, tc, env)
    scaler = torch.amp.GradScaler(env.device_type, enabled=env.dtype == "fp16")  # fp16 underflows
    data_gen = torch.Generator().manual_seed(tc.seed)  # picks the windows: the data position
    iter_num, best_val, tokens_seen = 0, float("inf"), 0
    torch.manual_seed(tc.seed + env.rank)  # dropout differs per rank
    if ckpt is not None:
        iter_num, best_val, tokens_seen = load_state(ckpt, raw_model, optimizers, scaler, data_gen,
                                                     tc, env)

    # 6. Compile and wrap: DDP all-reduces gradients; FSDP2 already wrapped the model in section 4
    if tc.compile:
        model = torch.compile(model)
    if env.distributed and not tc.fsdp:
        # parameters a step's last backward does not reach: a cls head trained without its pair
        # task, the LM head when classifying, and with segments the initial states (only segment
        # 1 reads them)
        unused = cfg.cls_head and pair_task == "none" or tc.segments > 1
        ids = [int(env.device.split(":")[1])] if env.device_type == "cuda" else None
        model = DDP(model, device_ids=ids, find_unused_parameters=unused)

    # 7. Training loop
    meta = checkpoint_meta(tok, objective, pair_task, sp, cfg, classes, init, ckpt)
    tokens_per_iter = tc.batch_size * tc.grad_accum * env.world * K * T
    start = iter_num
    replaced = [name for name in kept if name in EXPORTED] if ckpt is None else []
    last_good = f"{out_dir / 'ckpt.pt'} (iter {start}) is the last good checkpoint" if ckpt \
        else f"{out_dir} holds {', '.join(kept) or 'no checkpoint'}, as before this run"
    val_loss, t_log, iters_logged = None, time.time(), 0
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(out_dir / "metrics.jsonl" if env.master else None, append=tc.resume)
    while True:
        # evaluate; save only checkpoints that hold progress over out_dir's: after this run's
        # first step, or into an out_dir without any (--resume, --overwrite: nothing replaced yet)
        if iter_num % tc.eval_interval == 0 or iter_num == tc.max_iters:
            losses = estimate_loss(model, batches, tc, env)
            for split, value in losses.items():
                check_finite(f"evaluated {split} loss", value, iter_num, get_lr(iter_num, tc),
                             last_good)
            val_loss = losses["val"]
            saving = iter_num > start or not kept
            improved = saving and val_loss < best_val
            best_val = val_loss if improved else best_val
            report_eval(metrics, iter_num, losses, bits, ppl, improved, env)
            if saving:
                progress = {"iter": iter_num, "best_val_loss": best_val, "tokens": tokens_seen}
                save_checkpoints(out_dir, raw_model, optimizers, scaler, data_gen, progress,
                                 improved, meta, replaced, tc, env)
                metrics.flush()
                last_good = f"{out_dir / 'ckpt.pt'} (iter {iter_num}) is the last good checkpoint"
            t_log, iters_logged = time.time(), 0  # evaluation time is not training throughput
        if iter_num >= tc.max_iters:
            break

        # one optimizer step over grad_accum micro-batches
        lr = get_lr(iter_num, tc)
        for group in (g for opt in optimizers for g in opt.param_groups):
            group["lr"] = lr
        loss = forward_backward(model, batches("train", data_gen, tc.grad_accum), tc, env, scaler,
                                raw_model)
        lossf = loss.item()  # one sync per step: the price of never stepping on a NaN
        check_finite("training loss", lossf, iter_num, lr, last_good)
        if tc.grad_clip > 0:
            for opt in optimizers:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        for opt in optimizers:
            scaler.step(opt)  # skipped when fp16 gradients overflowed; the scaler lowers its scale
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_iter
        iters_logged += 1

        if iter_num % tc.log_interval == 0 and env.master:
            dt = (time.time() - t_log) / iters_logged
            tok_s = tokens_per_iter / dt
            eta = dt * (tc.max_iters - iter_num - 1)
            mfu = estimate_mfu(raw_model, tok_s, tc, env)
            print(f"iter {iter_num}/{tc.max_iters}: loss {lossf:.4f}, lr {lr:.2e}, {tok_s:,.0f} "
                  f"tok/s, {1000 * dt:.0f} ms/iter" + (f", mfu {100 * mfu:.1f}%" if mfu else "")
                  + f", eta {int(eta) // 60}m{int(eta) % 60:02d}s", flush=True)
            metrics.write(iter=iter_num, loss=lossf, lr=lr, tok_per_s=tok_s, ms_per_iter=1000 * dt,
                          tokens=tokens_seen)
            t_log, iters_logged = time.time(), 0
        iter_num += 1
    metrics.close()

    # 8. Export, then sample (every rank: FSDP shards need all of them; rank 0 prints)
    if tc.export == "hf":
        export_hf(out_dir / "hf", raw_model, tok, sp, meta, tc, env)
    elif tc.export != "none":
        export(out_dir / f"model_{tc.export}.pt", raw_model, DTYPES[tc.export], meta, tc, env)
    # an encoder-decoder's generate() encodes outside forward(), where FSDP would not gather
    if tc.fsdp and cfg.architecture == "encoder_decoder":
        raw_model.unshard()
    sample = None if no_sample else sample_text(raw_model, tok, sp, splits, objective, tc, env)
    if env.master:
        print(f"val loss {val_loss:.4f}; " + (f"no sample: {no_sample}" if no_sample
                                              else f"sample:\n{sample}\n"))
    return {"model": raw_model, "val_loss": val_loss, "sample": sample}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FloatingPointError, OSError) as e:  # user errors: one line, no traceback
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted; --resume continues from the last checkpoint in out_dir")
