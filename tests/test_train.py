"""train.py end to end on a tiny model and a synthetic text: learning, checkpoints, exact resume, NaN stop,
gradient accumulation, gradient checkpointing, Muon, half-precision export, DDP under torchrun, and
one-line errors for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
import train
from model import from_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# a 1-layer modern decoder (RMSNorm, RoPE, SwiGLU) small enough for a step in a few milliseconds
TINY = ["--n_layer=1", "--n_head=2", "--d_model=32", "--block_size=16", "--batch_size=4", "--norm=rmsnorm",
        "--position=rope", "--ffn=glu", "--activation=silu", "--bias=false", "--eval_iters=4",
        "--log_interval=1", "--sample_tokens=8", "--warmup_iters=5", "--lr=1e-2", "--min_lr=1e-3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: extra threads only add synchronisation (10x slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """~25 KB of words drawn from a small list: a char model learns the spellings within tens of steps."""
    g = torch.Generator().manual_seed(0)
    words = "the king and queen walked to a castle where knight kept his sword horse people sang".split()
    ids = torch.randint(len(words), (5000,), generator=g).tolist()
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(words[i] for i in ids) + "\n")
    return path


def run(out_dir, text, *args):
    """train.main in this process -> (its result, metrics.jsonl as a list of dicts)."""
    result = train.main([f"--data={text}", f"--out_dir={out_dir}", *TINY, *args])
    metrics = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
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
    assert val[0] > 2.8 and val[60] < val[0] - 1.2, val                   # ln(17 chars) = 2.83 at the start
    assert result["val_loss"] == val[60] and len(losses(metrics, "loss")) == 60
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)                 # only tensors and plain containers
    best = torch.load(out / "ckpt_best.pt", weights_only=True)
    assert ckpt["iter"] == 60 and ckpt["best_val_loss"] == min(val.values())
    assert best["val_loss"] == min(val.values()) and "optimizer" not in best
    assert_same_weights(ckpt["model"], weights(result["model"]))
    model = from_checkpoint(load_checkpoint(out / "ckpt_best.pt"))        # what generate.py does
    assert_same_weights(weights(model), best["model"])


def test_exact_resume(tmp_path, text):
    """N steps in one go == N/2 steps, then --resume to N: same losses at every step, same final weights.
    Dropout and gradient accumulation are on, so the torch RNG and the data position must both resume.
    The second half turns on grad_checkpoint, a model key a resumed run may change (it recomputes the
    same dropout masks)."""
    args = ["--dropout=0.1", "--grad_accum=2", "--eval_interval=10", "--lr_decay_iters=20"]
    full, m_full = run(tmp_path / "full", text, "--max_iters=20", *args)
    run(tmp_path / "split", text, "--max_iters=10", *args)
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["iter"] == 10
    resumed, m_split = run(tmp_path / "split", text, "--max_iters=20", "--resume", "--grad_checkpoint")
    for key in ("loss", "val_loss", "train_loss"):
        assert losses(m_split, key) == losses(m_full, key), key
    assert len(losses(m_split, "loss")) == 20
    assert_same_weights(weights(resumed["model"]), weights(full["model"]))
    assert resumed["sample"] == full["sample"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, text):
    """A huge lr sends the weights to inf/NaN after the first update; the run must stop before it saves
    or steps on a non-finite loss, whether an evaluation or a training step sees it first."""
    for eval_interval, what in [(1, "evaluated train loss"), (100, "training loss")]:
        out = tmp_path / f"every_{eval_interval}"
        with pytest.raises(FloatingPointError) as e:
            run(out, text, "--lr=1e12", "--warmup_iters=0", "--max_iters=10", f"--eval_interval={eval_interval}")
        msg = str(e.value)
        assert msg.startswith(f"{what} is nan at iter 1") and "\n" not in msg, msg
        assert f"{out / 'ckpt.pt'} (iter 0) is the last good checkpoint" in msg and "lower --lr" in msg
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
    result, metrics = run(tmp_path, text, "--optimizer=muon", "--max_iters=60", "--eval_interval=30")
    val = losses(metrics, "val_loss")
    assert val[60] < val[0] - 1.0, val
    opt = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]
    assert len(opt) == 2 and len(opt[1]["param_groups"][0]["params"]) == 7   # Muon: q, k, v, o, gate, up, down


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_export_half_precision_loads_in_generate(tmp_path, text, dtype):
    result, _ = run(tmp_path, text, "--max_iters=3", "--eval_interval=3", f"--export={dtype}")
    path = tmp_path / f"model_{dtype}.pt"
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "config", "tokenizer"}                   # weights only: no optimizer state
    assert {v.dtype for v in raw["model"].values()} == {train.DTYPES[dtype]}
    assert raw["model"]["lm_head.weight"].data_ptr() == raw["model"]["wte.weight"].data_ptr()  # tied: saved once
    model, tok, _ = generate.load(generate.parse_args(["--checkpoint", str(path)]))
    rounded = {k: v.to(train.DTYPES[dtype]).float() for k, v in weights(result["model"]).items()}
    assert_same_weights(weights(model), rounded)                          # the trained weights, rounded once
    assert tok.decode(tok.encode("the king")) == "the king"


# ----------------------------------------------------------------------------------------------
# bad input: one line naming the problem and the fix


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("too short")
    (d / "latin1.txt").write_bytes("crème brûlée ".encode("latin-1") * 20)
    (d / "small.txt").write_text("abcdefghij" * 15)                       # 15 val tokens < block_size 16
    (d / "a_file").write_text("x")
    for name in ("a.yaml", "b.yaml"):
        (d / name).write_text("n_layer: 1\n")
    return d


@pytest.mark.parametrize("args, message", [
    (["--data={d}/missing.txt"], "missing.txt' does not exist; pass a UTF-8 text file"),
    (["--data={d}/empty.txt"], "empty.txt' is empty; pass a file with some text in it"),
    (["--data={d}/short.txt"], "gives only 9 tokens; a train/val split needs at least 20 (pass a longer text)"),
    (["--data={d}/latin1.txt"], "is not UTF-8 text (byte 0xe8 at offset 2); convert it first"),
    (["--data={d}/small.txt"], "val split of data='{d}/small.txt' has 15 tokens, not more than block_size=16; "
                               "use a longer text or a smaller --block_size"),
    (["--out_dir={d}/a_file"], "out_dir='{d}/a_file' is a file, not a directory; pass another --out_dir"),
    (["--n_layr=2"], "unknown config key 'n_layr'; did you mean 'n_layer'?"),
    (["--lr_schedule=cos"], "unknown config key 'lr_schedule'"),
    (["--n_layer=two"], "config key n_layer='two' must be int"),
    (["--lr=fast"], "config key lr='fast' must be float"),
    (["{d}/a.yaml", "{d}/b.yaml"], "expected at most one YAML config file"),
    (["--resume", "--out_dir={d}/nothing"], "resume=true but {d}/nothing/ckpt.pt does not exist"),
])
def test_bad_input_is_one_line_error(tmp_path, text, files, args, message):
    argv = [f"--data={text}", f"--out_dir={tmp_path}", *TINY, "--max_iters=2"] + [a.format(d=files) for a in args]
    with pytest.raises(ValueError) as e:
        train.main(argv)
    assert message.format(d=files) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_resume_with_another_model_config_is_an_error(trained, text):
    out, _, _ = trained
    with pytest.raises(ValueError) as e:
        train.main([f"--data={text}", f"--out_dir={out}", *TINY, "--n_layer=2", "--max_iters=80", "--resume"])
    msg = str(e.value)
    assert f"cannot resume {out / 'ckpt.pt'}: it was trained with n_layer=1 (this run: 2)" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="with max_iters=30; pass --max_iters=60 or more"):
        train.main([f"--out_dir={out}", "--max_iters=30", "--resume"])


def test_cli_error_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--bad_key=1", f"--out_dir={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.splitlines() == [p.stderr.strip()] and p.stderr.startswith("error: unknown config key 'bad_key'")


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


def test_ddp_matches_one_process_with_the_same_global_batch(tmp_path, text):
    """2 ranks x batch 4 under torchrun == 1 process x batch 8: every rank draws the global batch from
    the same generator and keeps its rows, and DDP averages the gradients."""
    args = ["--max_iters=6", "--eval_interval=3", "--grad_accum=2"]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), f"--data={text}", f"--out_dir={tmp_path / 'ddp'}", *TINY, *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "world 2" in p.stdout
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_weights(rank0, rank1)                                     # the replicas never drift apart
    single, m_single = run(tmp_path / "single", text, *args, "--batch_size=8")
    m_ddp = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "val_loss"):
        a, b = losses(m_ddp, key), losses(m_single, key)
        assert a.keys() == b.keys() and all(abs(a[i] - b[i]) < 1e-5 for i in a), (key, a, b)
    assert_same_weights(rank0, weights(single["model"]), atol=1e-5)
