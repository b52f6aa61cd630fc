"""train.py end to end on a tiny model and a synthetic text: learning, checkpoints, exact resume,
NaN stop, gradient accumulation, gradient checkpointing, Muon, half-precision export, the objectives
(mlm, span, seq2seq), block-recurrent segments, MoE parameter groups, DDP under torchrun, the YAML
layout (every config in configs/ builds in model.py and parses in train.py), --help, and one-line
errors for bad input (more of those, and the other reliability promises, in
test_train_reliability.py)."""
import dataclasses
import json
import os
import re
import runpy
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

import generate
import train
from data.objectives import lm_batch
from data.prepare import load_tokens
from model import Config, from_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# a 1-layer modern decoder (RMSNorm, RoPE, SwiGLU) small enough for a step in a few milliseconds
TINY = ["--n_layer=1", "--n_head=2", "--d_model=32", "--block_size=16", "--batch_size=4",
        "--norm=rmsnorm", "--position=rope", "--ffn=glu", "--activation=silu", "--bias=false",
        "--eval_iters=4", "--log_interval=1", "--sample_tokens=8", "--warmup_iters=5", "--lr=1e-2",
        "--min_lr=1e-3"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """~25 KB of words drawn from a small list: a char model learns the spellings within tens of
    steps."""
    g = torch.Generator().manual_seed(0)
    words = ("the king and queen walked to a castle where knight kept his sword horse people "
             "sang").split()
    ids = torch.randint(len(words), (5000,), generator=g).tolist()
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(words[i] for i in ids) + "\n")
    return path


@pytest.fixture(scope="module")
def pairs(text):
    """source<TAB>target lines: two words, then both reversed (the decoder must read the source)."""
    words = text.read_text().split()[:1500]
    path = text.with_name("reverse.tsv")
    path.write_text("".join(f"{w} {v}\t{v[::-1]} {w[::-1]}\n" for w, v in zip(words, words[1:])))
    return path


# tiny versions of the other architectures (on top of TINY), a block-recurrent decoder (blocks of 8)
ENCODER = ["--architecture=encoder_only", "--type_vocab_size=2", "--cls_head"]
ENCDEC = ["--architecture=encoder_decoder"]
BRT = ["--block_width=8", "--recurrent_layers=[0]", "--n_states=4", "--position=dynamic_bias"]


def run(out_dir, text, *args):
    """train.main in this process -> (its result, metrics.jsonl as a list of dicts)."""
    result = train.main([f"--data={text}", f"--out_dir={out_dir}", *TINY, *args])
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    return result, metrics


def losses(metrics, key):
    return {m["iter"]: m[key] for m in metrics if key in m}


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text):
    """One 60-step AdamW run whose outputs several tests read."""
    out = tmp_path_factory.mktemp("trained")
    result, metrics = run(out, text, "--max_iters=60", "--eval_interval=20")
    return out, result, metrics


def test_loss_goes_down_and_checkpoints_load(trained):
    out, result, metrics = trained
    val = losses(metrics, "val_loss")
    assert list(val) == [0, 20, 40, 60]
    assert val[0] > 2.8 and val[60] < val[0] - 1.2, val      # ln(17 chars) = 2.83 at first
    assert result["val_loss"] == val[60] and len(losses(metrics, "loss")) == 60
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)    # only tensors, plain containers
    best = torch.load(out / "ckpt_best.pt", weights_only=True)
    assert ckpt["iter"] == 60 and ckpt["best_val_loss"] == min(val.values())
    assert best["val_loss"] == min(val.values()) and "optimizer" not in best
    assert_same_weights(ckpt["model"], weights(result["model"]))
    model = from_checkpoint(load_checkpoint(out / "ckpt_best.pt"))        # what generate.py does
    assert_same_weights(weights(model), best["model"])


def test_exact_resume(tmp_path, text):
    """N steps in one go == N/2 steps, then --resume to N: same losses at every step, same final
    weights. Dropout and gradient accumulation are on, so the torch RNG and the data position must
    both resume. The second half turns on grad_checkpoint, a model key a resumed run may change (it
    recomputes the same dropout masks)."""
    args = ["--dropout=0.1", "--grad_accum=2", "--eval_interval=10", "--lr_decay_iters=20"]
    full, m_full = run(tmp_path / "full", text, "--max_iters=20", *args)
    run(tmp_path / "split", text, "--max_iters=10", *args)
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["iter"] == 10
    resumed, m_split = run(tmp_path / "split", text, "--max_iters=20", "--resume",
                           "--grad_checkpoint")
    for key in ("loss", "val_loss", "train_loss"):
        assert losses(m_split, key) == losses(m_full, key), key
    assert len(losses(m_split, "loss")) == 20
    assert_same_weights(weights(resumed["model"]), weights(full["model"]))
    assert resumed["sample"] == full["sample"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, text):
    """A huge lr sends the weights to inf/NaN after the first update; the run must stop before it
    saves or steps on a non-finite loss, whether an evaluation or a training step sees it first."""
    for eval_interval, what in [(1, "evaluated train loss"), (100, "training loss")]:
        out = tmp_path / f"every_{eval_interval}"
        with pytest.raises(FloatingPointError) as e:
            run(out, text, "--lr=1e12", "--warmup_iters=0", "--max_iters=10",
                f"--eval_interval={eval_interval}")
        msg = str(e.value)
        assert msg.startswith(f"{what} is nan at iter 1") and "\n" not in msg, msg
        assert f"{out / 'ckpt.pt'} (iter 0) is the last good checkpoint" in msg
        assert "lower --lr" in msg
        ckpt = load_checkpoint(out / "ckpt.pt")
        assert ckpt["iter"] == 0 and all(v.isfinite().all() for v in ckpt["model"].values())


def test_grad_accum_matches_a_bigger_batch(tmp_path, text):
    """grad_accum=2 x batch 4 draws the same 8 windows per step as batch 8; the mean loss and the
    summed gradients agree up to float rounding."""
    a, m_a = run(tmp_path / "accum", text, "--max_iters=5", "--eval_interval=5", "--grad_accum=2")
    b, m_b = run(tmp_path / "batch", text, "--max_iters=5", "--eval_interval=5", "--batch_size=8")
    la, lb = losses(m_a, "loss"), losses(m_b, "loss")
    assert la.keys() == lb.keys() and len(la) == 5
    for it in la:
        assert abs(la[it] - lb[it]) < 1e-5, (it, la[it], lb[it])
    assert_same_weights(weights(a["model"]), weights(b["model"]), atol=1e-5)


def test_grad_checkpoint_gives_the_same_losses(tmp_path, text):
    args = ["--max_iters=5", "--eval_interval=5", "--n_layer=2"]
    a, m_a = run(tmp_path / "plain", text, *args)
    b, m_b = run(tmp_path / "ckpt", text, *args, "--grad_checkpoint")
    for key in ("loss", "val_loss"):
        la, lb = losses(m_a, key), losses(m_b, key)
        assert la.keys() == lb.keys() and all(abs(la[i] - lb[i]) < 1e-6 for i in la), key
    assert_same_weights(weights(a["model"]), weights(b["model"]), atol=1e-6)


def test_muon_trains(tmp_path, text):
    result, metrics = run(tmp_path, text, "--optimizer=muon", "--max_iters=60",
                          "--eval_interval=30")
    val = losses(metrics, "val_loss")
    assert val[60] < val[0] - 1.0, val
    opt = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]
    assert len(opt) == 2
    assert len(opt[1]["param_groups"][0]["params"]) == 7     # Muon: q, k, v, o, gate, up, down


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_export_half_precision_loads_in_generate(tmp_path, text, dtype):
    result, _ = run(tmp_path, text, "--max_iters=3", "--eval_interval=3", f"--export={dtype}")
    path = tmp_path / f"model_{dtype}.pt"
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "config", "tokenizer", "objective", "pair_task"}   # no optimizer
    assert (raw["objective"], raw["pair_task"]) == ("lm", "none")
    assert {v.dtype for v in raw["model"].values()} == {train.DTYPES[dtype]}
    tied = raw["model"]["lm_head.weight"], raw["model"]["wte.weight"]
    assert tied[0].data_ptr() == tied[1].data_ptr()                       # tied: saved once
    loaded = generate.load(generate.parse_args(["--checkpoint", str(path)]))
    model, tok = loaded.model, loaded.tok
    rounded = {k: v.to(train.DTYPES[dtype]).float() for k, v in weights(result["model"]).items()}
    assert_same_weights(weights(model), rounded)                          # trained, rounded once
    assert tok.decode(tok.encode("the king")) == "the king"


# ----------------------------------------------------------------------------------------------
# objectives (data/objectives.py), block-recurrent segments, MoE parameter groups


@pytest.mark.parametrize("model_args, data, objective, pair_task, shown", [
    (ENCODER, "text", "mlm", "nsp", "input: [CLS]"),                       # auto: nsp, as cls_head
    (ENCODER + ["--pair_task=sop"], "text", "mlm", "sop", "input: [CLS]"),
    (ENCDEC, "text", "span", "none", "input:  "),
    (ENCDEC, "pairs", "seq2seq", "none", "input:  "),                      # auto: seq2seq on .tsv
], ids=["mlm_nsp", "mlm_sop", "span", "seq2seq"])
def test_objective_trains(tmp_path, text, pairs, model_args, data, objective, pair_task, shown):
    """40 steps of each objective on its architecture: the val loss (for mlm with the NSP/SOP term)
    falls by more than 1.5 nats; checkpoints and the export record the objective; the sample is its
    example."""
    data = {"text": text, "pairs": pairs}[data]
    result, metrics = run(tmp_path, data, *model_args, "--max_iters=40", "--eval_interval=20",
                          "--export=bf16")
    val = losses(metrics, "val_loss")
    assert val[40] < val[0] - 1.5, val
    for name in ("ckpt.pt", "ckpt_best.pt", "model_bf16.pt"):
        ckpt = torch.load(tmp_path / name, weights_only=True)
        assert (ckpt["objective"], ckpt["pair_task"]) == (objective, pair_task), name
    assert result["sample"].startswith(shown) and "\nmodel: " in result["sample"]
    cfg = result["model"].config
    base = len(set(data.read_text()))                      # the char tokenizer's vocabulary
    assert cfg.vocab_size == base + 105                    # + [PAD] [MASK] [CLS] [SEP] [EOS] + 100
    if objective in ("span", "seq2seq"):
        assert cfg.decoder_start_token_id == base          # [PAD], as T5 starts its decoder


def test_segments_carry_the_block_recurrent_state(tmp_path, text):
    """segments=2 on a block-recurrent decoder: windows of 2 x 16 tokens, the second call reading
    the state and memories the first left. The reported val loss is exactly that two-call mean, and
    the carried memory is what lets the second segment's first token see the tokens before it."""
    result, metrics = run(tmp_path, text, *BRT, "--segments=2", "--max_iters=40",
                          "--eval_interval=20")
    val = losses(metrics, "val_loss")
    assert val[40] < val[0] - 0.8, val
    model = result["model"]
    meta = json.loads(next((tmp_path / "data").glob("*/meta.json")).read_text())
    data = load_tokens(next((tmp_path / "data").glob("*/val.bin")), meta["dtype"])

    def two_calls(b):
        x, y, cache = b["input_ids"], b["targets"], model.setup_cache(len(b["input_ids"]), 32)
        first = model(x[:, :16], y[:, :16], cache=cache, input_pos=torch.arange(16)).loss
        return first, model(x[:, 16:], y[:, 16:], cache=cache, input_pos=torch.arange(16, 32))

    with torch.no_grad():
        gen = torch.Generator().manual_seed(1337 + 1)                       # evaluation's batches
        calls = (two_calls(lm_batch(data, 4, gen, 32)) for _ in range(4))
        mean = sum((first + second.loss) / 2 for first, second in calls) / 4
        b = lm_batch(data, 256, torch.Generator().manual_seed(0), 32)
        carried = two_calls(b)[1].logits[:, 0]                              # (B, V) at token 17
        alone = model(b["input_ids"][:, 16:]).logits[:, 0]                  # no state or memory
    assert abs(mean.item() - val[40]) < 1e-5
    y = b["targets"][:, 16]
    ce = [torch.nn.functional.cross_entropy(logits, y).item() for logits in (carried, alone)]
    assert ce[1] - ce[0] > 0.1, ce


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_moe_parameter_groups(tmp_path, text, optimizer):
    """A MoE layer with biases: the (E, out, in) expert stacks are decayed and stay on AdamW (Muon
    takes 2-D matrices only), their (E, out) biases and the norm gains are not decayed, Muon gets
    the hidden nn.Linear matrices (q, k, v, o, router); the model learns either way."""
    E, C, F = 4, 32, 128
    result, metrics = run(tmp_path, text, "--ffn_pattern=[moe]", f"--n_expert={E}",
                          f"--moe_d_ff={F}", "--ffn_bias", f"--optimizer={optimizer}",
                          "--max_iters=40", "--eval_interval=40")
    val = losses(metrics, "val_loss")
    assert val[40] < val[0] - 1.0, val
    V = result["model"].config.vocab_size
    shapes = [[Counter(tuple(opt["state"][i][key].shape) for i in group["params"])
               for group in opt["param_groups"]]
              for opt, key in zip(torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"],
                                  ("exp_avg", "momentum_buffer"))]
    stacks, biases = {(E, F, C): 2, (E, C, F): 1}, {(E, F): 2, (E, C): 1}  # glu: gate, up; down
    gains = {(C,): 3}
    hidden = {(C, C): 4, (E, C): 1}                                        # q, k, v, o; the router
    if optimizer == "adamw":
        assert shapes == [[Counter({(V, C): 1, **stacks}) + Counter(hidden),
                           Counter({**biases, **gains})]]
    else:
        assert shapes == [[Counter({(V, C): 1, **stacks}), Counter({**biases, **gains})],
                          [Counter(hidden)]]


# ----------------------------------------------------------------------------------------------
# bad input: one line naming the problem and the fix


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("too short")
    (d / "latin1.txt").write_bytes("crème brûlée ".encode("latin-1") * 20)
    (d / "small.txt").write_text("abcdefghij" * 15)                       # 15 val tokens < 16
    (d / "a_file").write_text("x")
    for name in ("a.yaml", "b.yaml"):
        (d / name).write_text("n_layer: 1\n")
    (d / "top.yaml").write_text("n_layer: 1\nmax_iters: 5\n")
    (d / "nested.yaml").write_text("train:\n  max_iters: 5\n  n_layer: 1\n")
    (d / "pairs.tsv").write_text("ab ba\tba ab\n" * 20)
    (d / "missing_col.tsv").write_text("ab ba\tba ab\n" * 5 + "\nab cd\n")     # line 7: no TAB
    return d


@pytest.mark.parametrize("args, message", [
    (["--data={d}/missing.txt"], "missing.txt' does not exist; pass a UTF-8 text file"),
    (["--data={d}/empty.txt"], "empty.txt' is empty; pass a file with some text in it"),
    (["--data={d}/short.txt"], "gives only 9 tokens; a train/val split needs at least 20 (pass a "
                               "longer text)"),
    (["--data={d}/latin1.txt"], "is not UTF-8 text (byte 0xe8 at offset 2); convert it first"),
    (["--data={d}/small.txt"], "val split of data='{d}/small.txt' has 15 tokens, not more than "
                               "block_size=16; use a longer text or a smaller --block_size"),
    (["--out_dir={d}/a_file"], "out_dir='{d}/a_file' is a file, not a directory; pass another "
                               "--out_dir"),
    (["--n_layr=2"], "unknown config key 'n_layr'; did you mean 'n_layer'?"),
    (["--lr_schedule=cos"], "unknown config key 'lr_schedule'"),
    (["--n_layer=two"], "config key n_layer='two' must be int"),
    (["--lr=fast"], "config key lr='fast' must be float"),
    (["{d}/a.yaml", "{d}/b.yaml"], "expected at most one YAML config file"),
    (["--resume", "--out_dir={d}/nothing"], "resume=true but {d}/nothing/ckpt.pt does not exist"),
    (["{d}/top.yaml"], "'max_iters' in {d}/top.yaml is a training key (TrainConfig in train.py): "
                       "move it under train:"),
    (["{d}/nested.yaml"], "'n_layer' under train: in {d}/nested.yaml is a model key (Config in "
                          "model.py): move it to the top level"),
    (["--objective=mln"], "objective='mln' is not one of ['auto', 'classify', 'lm', 'mlm', "
                          "'seq2seq', 'span']; did you mean 'mlm'?"),
    (["--objective=mlm"], "objective='mlm' trains encoder_only models but this config is "
                          "decoder_only; use objective=lm, or a config with architecture: "
                          "encoder_only"),
    (["--data={d}/pairs.tsv", "--objective=seq2seq"], "objective='seq2seq' trains encoder_decoder "
                                                      "models but this config is decoder_only"),
    (ENCDEC + ["--data={d}/missing_col.tsv"], "missing_col.tsv line 7 has 1 tab-separated columns; "
                                              "each line must be source<TAB>target"),
    (ENCDEC + ["--objective=seq2seq", "--data=stdlib"], "objective=seq2seq reads source<TAB>target "
                                                        "lines from a text file, not "
                                                        "data='stdlib'; pass --data=pairs.tsv"),
    (ENCODER + ["--pair_task=sop", "--cls_head=false"], "pair_task='sop' trains an encoder's cls "
                                                        "head on segments A and B: it needs "
                                                        "objective=mlm, cls_head: true"),
    (["--segments=2"], "segments=2 carries block-recurrent state from call to call: it needs "
                       "objective=lm and a config with block_width > 0 (here lm, block_width=0); "
                       "use segments=1 or a block-recurrent config"),
    (BRT + ["--segments=2", "--grad_checkpoint"], "grad_checkpoint recomputes each block in "
                                                  "backward, and with segments=2 that would update "
                                                  "the carried state a second time"),
    (BRT + ["--segments=2", "--position=learned"], "segments=2 runs positions up to 31, past the "
                                                   "learned position table of block_size=16; use "
                                                   "position: rope or dynamic_bias"),
])
def test_bad_input_is_one_line_error(tmp_path, text, files, args, message):
    argv = [f"--data={text}", f"--out_dir={tmp_path}", *TINY, "--max_iters=2",
            *(a.format(d=files) for a in args)]
    with pytest.raises(ValueError) as e:
        train.main(argv)
    assert message.format(d=files) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_resume_with_another_model_config_is_an_error(trained, text):
    out, _, _ = trained
    with pytest.raises(ValueError) as e:
        train.main([f"--data={text}", f"--out_dir={out}", *TINY, "--n_layer=2", "--max_iters=80",
                    "--resume"])
    msg = str(e.value)
    assert f"cannot resume {out / 'ckpt.pt'}: it was trained with n_layer=1 (this run: 2)" in msg
    assert "\n" not in msg
    with pytest.raises(ValueError, match="with max_iters=30; pass --max_iters=60 or more"):
        train.main([f"--out_dir={out}", "--max_iters=30", "--resume"])


def test_cli_error_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--bad_key=1", f"--out_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith("error: unknown config key 'bad_key'")


# ----------------------------------------------------------------------------------------------
# the YAML layout (model keys at the top level, training keys under train:) and --help

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_builds_in_model_py_and_parses_in_train_py(path, monkeypatch, capsys):
    """`python model.py X.yaml --meta` (what its __main__ runs) builds every config and counts its
    parameters; a small one also runs `python model.py X.yaml`, one forward pass on the CPU.
    train.py reads the same file into the same model config, and its train: section into
    TrainConfig."""
    def model_py(*flags):
        monkeypatch.setattr(sys, "argv", ["model.py", str(path), *flags])
        runpy.run_path(str(ROOT / "model.py"), run_name="__main__")
        return capsys.readouterr().out

    cfg = Config.from_yaml(path)
    m = re.match(r"(\w+): ([\d.]+)M parameters, ([\d.]+)M without embeddings\n", model_py("--meta"))
    assert m and m[1] == cfg.architecture and float(m[2]) > float(m[3]) > 0, m
    if float(m[2]) < 20:
        assert model_py().endswith(f"logits (1, {min(16, cfg.block_size)}, {cfg.vocab_size})\n")
    tc, model_keys, _ = train.parse_config([str(path)])
    assert Config.from_dict(model_keys) == cfg
    section = (yaml.safe_load(path.read_text()) or {}).get("train", {})
    assert {k: getattr(tc, k) for k in section} == section
    assert {k: v for k, v in dataclasses.asdict(tc).items() if k not in section} == \
        {k: v for k, v in dataclasses.asdict(train.TrainConfig()).items() if k not in section}


def test_command_line_keys_go_to_their_dataclass(tmp_path):
    """--key=value stays flat and lands in TrainConfig or the model keys, over the YAML file's
    value."""
    path = tmp_path / "c.yaml"
    path.write_text("n_layer: 3\nd_model: 64\ntrain:\n  max_iters: 7\n  lr: 3e-4\n")
    tc, model_keys, _ = train.parse_config([str(path), "--n_layer=2", "--lr=1e-3", "--segments=2"])
    assert model_keys == {"n_layer": 2, "d_model": 64}
    assert (tc.max_iters, tc.lr, tc.segments) == (7, 1e-3, 2)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_training_keys(flag, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(train.__doc__)
    listed = dict(re.findall(r"^  --(\w+)=(.*?)(?:  +.*)?$", out, re.M))
    assert listed.keys() == {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert (listed["lr"], listed["optimizer"], listed["lr_decay_iters"],
            listed["sample_prompt"]) == ("0.001", "adamw", "null", '"\\n"')


# ----------------------------------------------------------------------------------------------
# DDP: torchrun, two CPU processes over gloo

DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train
torch.set_num_threads(1)
result = train.main(sys.argv[1:])
torch.save(result["model"].state_dict(), os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
"""


@pytest.mark.parametrize("model_args", [[], ENCDEC, BRT + ["--segments=2"]],
                         ids=["lm", "span", "segments"])
def test_ddp_matches_one_process_with_the_same_global_batch(tmp_path, text, model_args):
    """2 ranks x batch 4 under torchrun == 1 process x batch 8: every rank draws the global batch
    from the same generator and keeps its rows, and DDP averages the gradients. Span corruption
    (dict batches, an encoder-decoder sharing one embedding) gives every row the same number of
    targets, so the mean of the ranks' mean losses is the mean over the whole batch, as for lm.
    With segments, DDP syncs on the last segment's backward, which does not reach the initial
    states (only segment 1's does)."""
    args = ["--max_iters=6", "--eval_interval=3", "--grad_accum=2", *model_args]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script), f"--data={text}",
                        f"--out_dir={tmp_path / 'ddp'}", *TINY, *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "world 2" in p.stdout
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_weights(rank0, rank1)                                     # replicas never drift
    single, m_single = run(tmp_path / "single", text, *args, "--batch_size=8")
    m_ddp = [json.loads(line)
             for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "val_loss"):
        a, b = losses(m_ddp, key), losses(m_single, key)
        assert a.keys() == b.keys() and all(abs(a[i] - b[i]) < 1e-5 for i in a), (key, a, b)
    ours = weights(single["model"])
    # a per-head constant on every score: the softmax cancels it, so its gradient is rounding noise
    # that Adam scales up
    for k in [k for k in ours if k.endswith("pos_bias.mlp.2.bias")]:
        del ours[k], rank0[k]
    assert_same_weights(rank0, ours, atol=1e-5)


def test_fsdp_encoder_decoder_matches_one_process(tmp_path, text):
    """FSDP2 over 2 CPU ranks shards the encoder's and the decoder's blocks: 3 steps, then --resume
    to 6, give the same losses and (gathered into ckpt.pt by rank 0) the same weights as one process
    with the whole batch; the closing span example runs the encoder outside forward(), on the
    gathered embedding."""
    args = ["--max_iters=6", "--eval_interval=3", "--lr_decay_iters=6", *ENCDEC]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--max_iters=3"], ["--resume"]):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", "train.py", f"--data={text}",
                            f"--out_dir={tmp_path / 'fsdp'}", *TINY, *args, "--fsdp", *extra],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "world 2" in p.stdout and "\nmodel:  " in p.stdout
    single, m_single = run(tmp_path / "single", text, *args, "--batch_size=8")
    m_fsdp = [json.loads(line)
              for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "val_loss"):
        a, b = losses(m_fsdp, key), losses(m_single, key)
        assert a.keys() == b.keys() and len(a) > 2, (key, a, b)
        assert all(abs(a[i] - b[i]) < 1e-5 for i in a), (key, a, b)
    assert_same_weights(load_checkpoint(tmp_path / "fsdp" / "ckpt.pt")["model"],
                        weights(single["model"]), atol=1e-5)
