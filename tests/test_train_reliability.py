"""train.py's reliability promises (issue 10), each held by a test that fails when it breaks:

- one line: every bad input (a value out of range, a YAML syntax error, a device the machine
  lacks, an out_dir that cannot be written, a checkpoint that cannot resume, data outside the
  vocabulary) ends in one line naming the key or file and the fix; `python train.py` prints no
  traceback;
- nothing lost: a failing run leaves the checkpoints already in its out_dir byte-identical, whether
  it is refused at the start, stops on a NaN, or is a resumed run that stops before its next step;
- atomic checkpoints: a save that dies half-way leaves the previous file loadable and unchanged;
- the LR schedule's values, and gradient accumulation equal to one bigger batch (gradients compared
  before the optimizer step and its clipping, so an undivided loss is off by a factor of 2);
- bits per byte on byte-level data; an expert-choice MoE skips the sample and still exports; the
  data cache's directory name is one safe path component for any tokenizer string."""
import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import test_train
import torch
from test_train import ENCDEC, ROOT, TINY, run

import train
from data.objectives import lm_batch
from data.prepare import load_tokens, prepare
from model import Config, Transformer, load_checkpoint, save_checkpoint

text = test_train.text                # the same fixture: ~25 KB of words (a module-scoped copy)

KEPT = ("ckpt.pt", "ckpt_best.pt", "model_bf16.pt")


@pytest.fixture(scope="module")
def good(tmp_path_factory, text):
    """A finished 4-step run: ckpt.pt at iter 4, ckpt_best.pt, model_bf16.pt, metrics.jsonl."""
    out = tmp_path_factory.mktemp("good")
    run(out, text, "--max_iters=4", "--eval_interval=2", "--export=bf16")
    assert all((out / name).is_file() for name in KEPT)
    return out


@pytest.fixture(scope="module")
def bad(tmp_path_factory, text, good):
    """Files for the bad inputs: broken YAML, unusable checkpoints, data outside its vocabulary."""
    d = tmp_path_factory.mktemp("bad")
    (d / "tab.yaml").write_text("n_layer: 1\n\tn_head: 2\n")
    (d / "indent.yaml").write_text("n_layer: 1\n  n_head: 2\nd_model: 32\n")
    (d / "flow.yaml").write_text("n_layer: 1\nlayer_pattern: [attn\nd_model: 32\n")
    (d / "latin1.yaml").write_bytes("# crème\nn_layer: 1\n".encode("latin-1"))
    (d / "dir.yaml").mkdir()
    (d / "a_file").write_text("x")
    (d / "weights_only").mkdir()                                      # ckpt_best.pt renamed ckpt.pt
    (d / "weights_only" / "ckpt.pt").write_bytes((good / "ckpt_best.pt").read_bytes())
    (d / "corrupt").mkdir()
    (d / "corrupt" / "ckpt.pt").write_bytes((good / "ckpt.pt").read_bytes()[:3000])
    prepare(text, d / "ids", "byte")                                  # then one id past 255
    val = load_tokens(d / "ids" / "val.bin", "uint16").clone()
    val[7] = 300
    (d / "ids" / "val.bin").write_bytes(val.numpy().tobytes())
    broken = [("bad_json", "{bad", None), ("no_tokenizer", '{"dtype": "uint16"}', None),
              ("no_bin", None, "train.bin")]                          # prepared dirs, then broken
    for name, meta, gone in broken:
        prepare(text, d / name, "char")
        if meta:
            (d / name / "meta.json").write_text(meta)
        if gone:
            (d / name / gone).unlink()
    return d


# (arguments, what the one line must say: the key or file, the problem and the fix)
BAD = [
    (["--lr=-1e-3"], ["lr=-0.001 must be > 0"]),
    (["--lr=0"], ["lr=0.0 must be > 0"]),
    (["--lr=nan"], ["lr=nan must be > 0"]),
    (["--lr=inf"], ["lr=inf must be > 0 and finite"]),
    (["--min_lr=0.1"], ["min_lr=0.1 must be in [0, lr=0.01]"]),
    (["--min_lr=-1e-4"], ["min_lr=-0.0001 must be in [0, lr=0.01]"]),
    (["--weight_decay=-0.1"], ["weight_decay=-0.1 must be >= 0"]),
    (["--beta1=1"], ["beta1=1.0 must be in [0, 1)"]),
    (["--beta2=-0.5"], ["beta2=-0.5 must be in [0, 1)"]),
    (["--grad_clip=-1"], ["grad_clip=-1.0 must be >= 0 (0 disables clipping)"]),
    (["--sample_tokens=-1"], ["sample_tokens=-1 must be >= 0"]),
    (["--sample_temperature=-1"], ["sample_temperature=-1.0 must be >= 0 (0 = greedy)"]),
    (["--warmup_iters=-1"], ["warmup_iters=-1 must be >= 0"]),
    (["--max_iters=-1"], ["max_iters=-1 must be >= 0"]),
    (["--lr_decay_iters=2"], ["lr_decay_iters=2 must be >= warmup_iters=5", "null"]),
    (["--batch_size=0"], ["batch_size=0 must be >= 1"]),
    (["--grad_accum=0"], ["grad_accum=0 must be >= 1"]),
    (["--eval_interval=0"], ["eval_interval=0 must be >= 1"]),
    (["--eval_iters=0"], ["eval_iters=0 must be >= 1"]),
    (["--log_interval=0"], ["log_interval=0 must be >= 1"]),
    (["--segments=0"], ["segments=0 must be >= 1"]),
    (["--bpe_vocab_size=100"], ["bpe_vocab_size=100 must be >= 256"]),
    (["--peak_tflops=0"], ["peak_tflops=0.0 must be > 0"]),
    (["--seed=-1"], ["seed=-1 must be in [0, 2**63)"]),
    (["--out_dir="], ["out_dir='' must name a directory"]),
    (["--data="], ["data='' must name"]),
    (["--out_dir"], ["--out_dir needs a value: --out_dir=..."]),
    (["--max_iters", "100"], ["expected at most one YAML config file", "(with '='); got ['100']"]),
    (["--dtype=fp8"], ["dtype='fp8' is not one of"]),
    (["--export=fp8"], ["export='fp8' is not one of ['bf16', 'fp16', 'hf', 'none']"]),
    (["--optimizer=sgd"], ["optimizer='sgd' is not one of ['adamw', 'muon']"]),
    (["--device=gpu"], ["device='gpu' is not auto, cpu, cuda, cuda:N or mps", "a GPU is cuda"]),
    (["--device=cuda"], ["device='cuda' but torch finds no CUDA GPU", "--device=cpu"]),
    (["--device=cuda:1"], ["device='cuda:1' but torch finds no CUDA GPU", "--device=cpu"]),
    (["--device=mps"], ["device='mps' but torch finds no Apple GPU (MPS)", "--device=cpu"]),
    (["--fsdp"], ["fsdp=true shards over processes: launch with torchrun"]),
    (["--fsdp", "--optimizer=muon"], ["optimizer=muon needs whole matrices", "not fsdp=true"]),
    (["{bad}/tab.yaml"], ["config file {bad}/tab.yaml is not valid YAML at line 2, column 1",
                          "cannot start any token", "spaces, never tabs"]),
    (["{bad}/indent.yaml"], ["{bad}/indent.yaml is not valid YAML at line 2, column 9",
                             "mapping values are not allowed here"]),
    (["{bad}/flow.yaml"], ["{bad}/flow.yaml is not valid YAML at line 3, column 8"]),
    (["{bad}/latin1.yaml"], ["config file {bad}/latin1.yaml is not UTF-8", "save it as UTF-8"]),
    (["{bad}/dir.yaml"], ["config file {bad}/dir.yaml is a directory"]),
    (["--out_dir={bad}/a_file/run"], ["out_dir='{bad}/a_file/run' is inside {bad}/a_file, a file",
                                      "pass another --out_dir"]),
    (["--out_dir={good}"], ["out_dir='{good}' holds ckpt.pt, ckpt_best.pt, model_bf16.pt from "
                            "another run",
                            "--resume", "another --out_dir", "--overwrite=true"]),
    (["--resume", "--out_dir={bad}/weights_only"],
     ["{bad}/weights_only/ckpt.pt holds weights only", "cannot resume",
      "ckpt.pt that train.py wrote"]),
    (["--resume", "--out_dir={bad}/corrupt"], ["{bad}/corrupt/ckpt.pt is truncated or corrupt"]),
    (["--data={bad}/ids"], ["{bad}/ids/val.bin holds token id 300", "256 ids", "prepare"]),
    (["--data={bad}/bad_json"], ["{bad}/bad_json/meta.json is not readable JSON",
                                 "prepare the data again"]),
    (["--data={bad}/no_tokenizer"], ["{bad}/no_tokenizer/meta.json lacks a tokenizer entry",
                                     "prepare the data again"]),
    (["--data={bad}/no_bin"], ["{bad}/no_bin has meta.json but no train.bin",
                               "prepare the data again"]),
    (["--resume", "--out_dir={good}", "--n_layer=2", "--max_iters=8"],
     ["cannot resume {good}/ckpt.pt: it was trained with n_layer=1 (this run: 2)"]),
    (["--resume", "--out_dir={good}", "--optimizer=muon", "--max_iters=8"],
     ["cannot resume {good}/ckpt.pt: it was trained with optimizer='adamw' (this run: 'muon')",
      "a new --out_dir"]),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_naming_the_key_and_the_fix(tmp_path, text, good, bad, monkeypatch,
                                                           args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)     # the same on every machine
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    fill = {"bad": bad, "good": good}
    argv = [f"--data={text}", f"--out_dir={tmp_path / 'out'}", *TINY, "--max_iters=2",
            *(a.format(**fill) for a in args)]
    with pytest.raises(ValueError) as e:                              # __main__: one line
        train.main(argv)
    msg = str(e.value)
    assert "\n" not in msg and all(m.format(**fill) in msg for m in message), msg
    assert not (tmp_path / "out").exists()                            # refused before any writing


def test_an_unwritable_out_dir_is_one_line(tmp_path, text, monkeypatch):
    """(The tests run as root, which may write anywhere: os.access stands in for the permission.)"""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    with pytest.raises(ValueError) as e:
        train.main([f"--data={text}", f"--out_dir={tmp_path / 'run'}", *TINY])
    assert str(e.value) == (f"out_dir='{tmp_path / 'run'}' cannot be written ({tmp_path}: "
                            f"permission denied); pass another --out_dir")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": "fast"}, "config key lr='fast' must be float"),
    ({"batch_size": 2.5}, "config key batch_size=2.5 must be int"),
    ({"resume": 1}, "config key resume=1 must be bool"),
    ({"lr_decay_iters": "10"}, "config key lr_decay_iters='10' must be int or null"),
])
def test_train_config_checks_types_too(kwargs, message):
    """TrainConfig is Python API too: a wrong type is the same one line as on the command line
    (and an int where a float is due becomes the float)."""
    with pytest.raises(ValueError) as e:
        train.TrainConfig(**kwargs)
    assert str(e.value) == message
    assert train.TrainConfig(lr=3).lr == 3.0 and isinstance(train.TrainConfig(lr=3).lr, float)


@pytest.mark.parametrize("args, start", [
    (["--device=gpu"], "error: device='gpu' is not auto, cpu, cuda"),
    (["{bad}/tab.yaml"], "error: config file {bad}/tab.yaml is not valid YAML at line 2"),
    (["--out_dir={good}"], "error: out_dir='{good}' holds ckpt.pt, ckpt_best.pt, model_bf16.pt"),
    (["--lr=1e12", "--warmup_iters=0", "--max_iters=3"], "error: training loss is nan at iter 1"),
], ids=["device", "yaml", "fresh_run_into_a_run", "nan"])
def test_cli_prints_one_line_and_no_traceback(tmp_path, text, good, bad, args, start):
    argv = [f"--data={text}", f"--out_dir={tmp_path}", *TINY, "--eval_interval=100",
            *(a.format(bad=bad, good=good) for a in args)]
    p = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.splitlines() == [p.stderr.strip()], p.stderr
    assert p.stderr.startswith(start.format(bad=bad, good=good)), p.stderr


def test_the_sample_is_rehearsed_before_the_first_step(tmp_path, text):
    """A sample prompt the tokenizer cannot encode ends the run before its first checkpoint (not
    after training); the default prompt falls back to the first val token instead."""
    with pytest.raises(ValueError) as e:
        run(tmp_path, text, "--sample_prompt=crème", "--max_iters=2")
    msg = str(e.value)
    assert msg.startswith("sample_prompt='crème': character 'è' (U+00E8) is not in this char "
                          "vocabulary") and "\n" not in msg, msg
    assert not any((tmp_path / name).exists() for name in (*KEPT, "metrics.jsonl"))


def test_a_vocabulary_larger_than_the_tokenizer_samples(tmp_path, text):
    """vocab_size 64 over a 17-character tokenizer: the untrained model draws ids past the
    tokenizer's, which the sample leaves out instead of failing at the end of training."""
    result, _ = run(tmp_path, text, "--vocab_size=64", "--max_iters=2", "--eval_interval=2",
                    "--sample_tokens=12")
    assert result["model"].config.vocab_size == 64
    chars = set(text.read_text())
    assert isinstance(result["sample"], str) and set(result["sample"]) <= chars


def test_a_resumed_run_steps_with_its_own_betas_and_weight_decay(tmp_path, text):
    """Loading the optimizer's state would bring back the checkpoint's betas and weight decay
    with it; the resumed run steps with (and saves) the values it was given."""
    run(tmp_path, text, "--max_iters=2", "--eval_interval=2")
    run(tmp_path, text, "--max_iters=4", "--eval_interval=2", "--resume", "--beta2=0.5",
        "--weight_decay=0.01")
    groups = load_checkpoint(tmp_path / "ckpt.pt")["optimizer"][0]["param_groups"]
    assert [(tuple(g["betas"]), g["weight_decay"]) for g in groups] == [((0.9, 0.5), 0.01),
                                                                       ((0.9, 0.5), 0.0)]


# ----------------------------------------------------------------------------------------------
# nothing lost: a failing run leaves out_dir's checkpoints as they were

FAILING = [
    [],                                                   # a fresh run without --overwrite
    ["--overwrite", "--lr=1e12", "--warmup_iters=0"],     # NaN at iter 1, after its iter-0 eval
    ["--resume", "--max_iters=10", "--lr=1e12", "--warmup_iters=0"],   # resumed at 4, NaN at iter 5
    ["--overwrite", "--sample_temperature=-1"],
    ["--overwrite", "--sample_tokens=-5"],
    ["--overwrite", "--sliding_window=-1", "--layer_pattern=[local_attn]"],
    ["--overwrite", "--device=gpu"],
    ["--overwrite", "{bad}/tab.yaml"],
    ["--overwrite", "--export=fp8"],
    ["--overwrite", "--objective=mlm"],
    ["--overwrite", "--fsdp"],
    ["--overwrite", "--vocab_size=5"],
    ["--overwrite", "--tokenizer=no_such_encoding"],
    ["--overwrite", "--data={bad}/ids"],
    ["--resume", "--max_iters=10", "--n_layer=2"],
    ["--resume", "--max_iters=10", "--optimizer=muon"],
    ["--resume", "--max_iters=2"],
]


@pytest.mark.parametrize("args", FAILING, ids=[" ".join(a) or "fresh" for a in FAILING])
def test_a_failing_run_leaves_the_checkpoints_as_they_were(good, bad, text, args):
    before = {name: (good / name).read_bytes() for name in KEPT}
    log = (good / "metrics.jsonl").read_text()
    argv = [f"--data={text}", f"--out_dir={good}", *TINY, "--eval_interval=2",
            *(a.format(bad=bad) for a in args)]
    with pytest.raises(Exception):  # noqa: B017  (which error is the one-line tests' business)
        train.main(argv)
    for name in KEPT:
        assert (good / name).read_bytes() == before[name], name
    assert (good / "metrics.jsonl").read_text().startswith(log)      # appended to, never cut


@pytest.mark.parametrize("args, last_good", [
    (["--overwrite"], "training loss is nan at iter 1 (lr 1e+12); stopped; {good} holds ckpt.pt, "
                      "ckpt_best.pt, model_bf16.pt, as before this run; lower --lr"),
    (["--resume", "--max_iters=10"], "training loss is nan at iter 5 (lr 5e+11); stopped; "
                                     "{good}/ckpt.pt (iter 4) is the last good checkpoint"),
], ids=["overwrite", "resume"])
def test_a_nan_names_the_checkpoints_left_as_they_were(good, text, args, last_good):
    with pytest.raises(FloatingPointError) as e:
        train.main([f"--data={text}", f"--out_dir={good}", *TINY, "--eval_interval=2",
                    "--lr=1e12", "--warmup_iters=0", *args])
    assert str(e.value).startswith(last_good.format(good=good)), str(e.value)


def test_overwrite_replaces_the_run_once_it_has_stepped(tmp_path, text, capsys):
    """--overwrite=true: the old files stay until this run's first checkpoint after a step; then
    ckpt.pt, ckpt_best.pt and metrics.jsonl are this run's alone, and the old run's export (which
    this run does not rewrite) is gone rather than left beside them."""
    run(tmp_path, text, "--max_iters=4", "--eval_interval=2", "--export=fp16")
    assert (tmp_path / "model_fp16.pt").is_file()
    result, metrics = run(tmp_path, text, "--max_iters=3", "--eval_interval=2", "--overwrite",
                          "--seed=7")
    assert not (tmp_path / "model_fp16.pt").exists()
    assert [m["iter"] for m in metrics if "val_loss" in m] == [0, 2, 3]   # the old run's are gone
    ckpt, best = (load_checkpoint(tmp_path / name) for name in ("ckpt.pt", "ckpt_best.pt"))
    val = {m["iter"]: m["val_loss"] for m in metrics if "val_loss" in m}
    assert ckpt["iter"] == 3 and ckpt["train_config"]["seed"] == 7
    assert best["iter"] in (2, 3) and best["val_loss"] == min(val[2], val[3])  # iter 0: not saved
    assert "eval iter 0: " in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# checkpoint writes, LR schedule, gradient accumulation


def test_a_checkpoint_write_that_dies_half_way_keeps_the_previous_one(tmp_path, monkeypatch):
    """save_checkpoint (model.py) writes a temp file and renames it: a torch.save that dies after
    writing half its bytes leaves the first checkpoint loadable and byte-identical. Written in
    place, the file would be cut in half."""
    model = Transformer(Config(vocab_size=32, n_layer=1, n_head=2, d_model=16, block_size=8))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, iter=1)
    first, weights = path.read_bytes(), {k: v.clone() for k, v in model.state_dict().items()}
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        half = buf.getvalue()[:len(buf.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(half)
        else:
            f.write(half)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError):
        save_checkpoint(path, model, iter=2)
    monkeypatch.undo()
    assert path.read_bytes() == first
    ckpt = load_checkpoint(path)
    assert ckpt["iter"] == 1 and all(torch.equal(ckpt["model"][k], v) for k, v in weights.items())


def test_lr_schedule_values():
    """Linear warmup reaching lr at warmup_iters (nanoGPT: lr * (it + 1) / (warmup + 1)), cosine to
    min_lr at lr_decay_iters, min_lr after; lr_decay_iters null means max_iters, and 0 means 0."""
    tc = train.TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, max_iters=200)
    cos = lambda frac: 0.1 + 0.45 * (1 + math.cos(math.pi * frac))
    expect = {0: 1 / 11, 4: 5 / 11, 9: 10 / 11, 10: 1.0, 35: cos(0.25), 60: 0.55, 85: cos(0.75),
              109: cos(0.99), 110: 0.1, 111: 0.1, 199: 0.1, 200: 0.1}
    got = {it: train.get_lr(it, tc) for it in expect}
    assert got == pytest.approx(expect, rel=1e-12, abs=0), got
    tc = train.TrainConfig(lr=2.0, min_lr=0.0, warmup_iters=0, max_iters=100)   # decay: max_iters
    got = [train.get_lr(it, tc) for it in (0, 50, 100)]
    assert got == pytest.approx([2.0, 1.0, 0.0], abs=1e-12)
    tc = train.TrainConfig(lr=2.0, min_lr=0.5, warmup_iters=0, lr_decay_iters=0, max_iters=100)
    assert [train.get_lr(it, tc) for it in (0, 50)] == [0.5, 0.5]
    # min_lr unset follows lr (a fine-tune's --lr=2e-5 alone is valid): lr / 10
    assert train.TrainConfig(lr=2e-5).min_lr == pytest.approx(2e-6, rel=1e-12)
    assert train.TrainConfig().min_lr == pytest.approx(1e-4, rel=1e-12)


CPU = train.Env(rank=0, world=1, device="cpu", dtype="fp32", distributed=False)


@pytest.mark.parametrize("segments", [1, 2], ids=["dense", "brt_segments"])
def test_grad_accum_gradients_equal_one_bigger_batch(segments):
    """train.forward_backward over 2 micro-batches of 4 rows, and over 1 micro-batch of the same 8
    rows, against the mean loss of those rows written out by hand: the loss it returns and every
    gradient before the optimizer step (and before clipping, which would hide a factor of 2). With
    segments (a block-recurrent model carrying its state from call to call, detached in between)
    the loss is the mean over the segments too."""
    brt = dict(block_width=8, recurrent_layers=(0,), n_states=4, position="dynamic_bias")
    cfg = Config(vocab_size=64, n_layer=2, n_head=2, d_model=32, block_size=16,
                 **(brt if segments > 1 else {}))
    T, K = 16, segments
    data = torch.randint(64, (4000,), generator=torch.Generator().manual_seed(0))
    make = lambda d, rows, gen: lm_batch(d, rows, gen, K * T)
    rows = make(data, 8, torch.Generator().manual_seed(1))           # the 8 windows all three see

    torch.manual_seed(0)
    model = Transformer(cfg)
    cache = model.setup_cache(8, K * T) if K > 1 else []
    losses = []
    for i in range(K):
        at = {"cache": cache, "input_pos": torch.arange(i * T, (i + 1) * T)} if K > 1 else {}
        x, y = rows["input_ids"][:, i * T:(i + 1) * T], rows["targets"][:, i * T:(i + 1) * T]
        losses.append(model(x, y, **at).loss)
        for c in cache:
            c.detach()
    expected = sum(losses) / K
    expected.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert max(g.abs().max().item() for g in grads.values()) > 1e-3   # gradients that matter

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for grad_accum, batch_size in ((2, 4), (1, 8)):
        torch.manual_seed(0)
        model = Transformer(cfg)
        tc = train.TrainConfig(batch_size=batch_size, grad_accum=grad_accum, segments=K)
        micro = train.get_batch(data, torch.Generator().manual_seed(1), grad_accum, make, tc, CPU,
                                model)
        loss = train.forward_backward(model, micro, tc, CPU, scaler)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=0)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-8,
                                       msg=f"grad_accum={grad_accum}: {n}")


# ----------------------------------------------------------------------------------------------
# bits per byte, expert choice, the data cache's name


def test_byte_data_reports_bits_per_byte(tmp_path, text, good, capsys):
    _, metrics = run(tmp_path, text, "--tokenizer=byte", "--max_iters=2", "--eval_interval=2")
    evals = [m for m in metrics if "val_loss" in m]
    assert len(evals) == 2
    for m in evals:
        assert m["val_bpb"] == m["val_loss"] / math.log(2)
        assert m["train_bpb"] == m["train_loss"] / math.log(2)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("eval iter 2: ")]
    assert len(lines) == 1 and f"val {evals[-1]['val_bpb']:.4f} bits/byte" in lines[0], lines
    char = [m for m in (good / "metrics.jsonl").read_text().splitlines() if "val_loss" in m]
    assert char and not any("bpb" in line for line in char)          # chars are not bytes


@pytest.mark.parametrize("model_args", [[], ENCDEC], ids=["decoder", "encoder_decoder"])
def test_expert_choice_moe_skips_the_sample_and_still_exports(tmp_path, text, capsys, model_args):
    """Expert choice cannot decode causally, so generate() refuses it: the run says so in one line
    instead of a sample, and still writes its export."""
    result, _ = run(tmp_path, text, *model_args, "--ffn_pattern=[moe]", "--n_expert=4",
                    "--moe_router=expert_choice", "--max_iters=2", "--eval_interval=2",
                    "--export=bf16")
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "no sample" in line]
    assert len(notes) == 1 and "expert_choice" in notes[0] and "sample:\n" not in out, out
    assert result["sample"] is None
    export = load_checkpoint(tmp_path / "model_bf16.pt")
    assert {v.dtype for v in export["model"].values() if v.is_floating_point()} == {torch.bfloat16}


@pytest.mark.parametrize("data, tokenizer", [
    ("stdlib", "hf:/some/dir/tokenizer.json"),
    ("my.txt", "../../etc"),
    ("notes v2.txt", "hf:C:\\models\\tok.json"),
    ("my.txt", "hf:" + "/deep" * 80 + "/tokenizer.json"),
])
def test_the_data_cache_name_is_one_safe_path_component(data, tokenizer):
    name = train.data_dir_name(data, tokenizer)
    assert re.fullmatch(r"[\w.-]{1,100}", name) and name not in (".", ".."), name
    assert (Path("out") / "data" / name).parent == Path("out") / "data"
    assert name != train.data_dir_name(data, tokenizer + "x")         # distinct strings, dirs


def test_the_data_cache_name_of_plain_values_is_unchanged():
    assert train.data_dir_name("stdlib", "char") == "stdlib-char"
    assert train.data_dir_name("path/to/words.txt", "cl100k_base") == "words-cl100k_base"
