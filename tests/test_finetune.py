"""Fine-tuning (issue 12): train.py --init_from, --eval_only and --export=hf, end to end.

Per family, a small random HF model (the import tests' builders, with a vocabulary of 512 and, where
the family uses a byte-level BPE, a tokenizer.json trained here) is fine-tuned for two steps through
train.py --init_from on a text file: the first evaluation must equal HF's own loss on the same
batches (computed here from HF's logits), and the --export=hf directory must load in transformers'
Auto class with logits equal to the fine-tuned model's. Then: --eval_only writes nothing, init_from
a checkpoint of ours, resuming a fine-tune, and every refusal as one line.
"""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
import test_hf_decoder as dec  # noqa: E402
import test_hf_encoder as enc  # noqa: E402
import test_moe as moe  # noqa: E402
from test_deltanet import qwen3_next  # noqa: E402,F401  (a fixture)
from test_tokenizers import byte_level, corpus  # noqa: E402
from test_train import TINY  # noqa: E402

import train  # noqa: E402
from data.objectives import OBJECTIVES  # noqa: E402
from data.prepare import load_tokens  # noqa: E402
from model import load_checkpoint  # noqa: E402

V = 512  # room for test_tokenizers' byte-level BPE (400 ids) + the objectives' 105 special tokens
TOL = 1e-4
B, EVAL_ITERS, SEED = 2, 2, 1337
RUN = ["--max_iters=2", "--eval_interval=2", f"--eval_iters={EVAL_ITERS}", f"--batch_size={B}",
       "--block_size=32", "--sample_tokens=4", "--log_interval=1", "--warmup_iters=0",
       "--lr=1e-3", f"--seed={SEED}"]
FAMILIES = {  # model_type -> (builder module, its case, tokenizer.json: a byte-level BPE style)
    "gpt2": (dec, "gpt2", "gpt2"),
    "llama": (dec, "llama", "llama3"),
    "mistral": (dec, "mistral", None),       # no tokenizer.json: --tokenizer=byte
    "qwen3": (dec, "qwen3", "llama3"),
    "gemma2": (dec, "gemma2", None),
    "gemma3_text": (dec, "gemma3", None),
    "mixtral": (moe, "mixtral", None),
    "qwen3_moe": (moe, "qwen3_moe", "llama3"),
    "qwen3_next": (None, "qwen3_next", "llama3"),
    "bert": (enc, "bert", None),
    "albert": (enc, "albert", None),
    "deberta-v2": (enc, "deberta", None),
    "bart": (enc, "bart", "gpt2"),
    "marian": (enc, "marian", None),
    "t5": (enc, "t5_v1_1", None),
}


def build_hf(family, built_qwen3_next, vocab_size=V):
    """The family's HF model as its import test builds it, with a larger vocabulary."""
    module, case, _ = FAMILIES[family]
    if module is None:  # Qwen3-Next's builder is a fixture: its model, embeddings resized
        hf = copy.deepcopy(built_qwen3_next[0])
        torch.manual_seed(0)
        hf.resize_token_embeddings(vocab_size, mean_resizing=False)
        return hf.eval()
    model_cls, config_cls, kw = module.CASES[case]
    kw = {**kw, "vocab_size": vocab_size}
    if module is moe:  # test_moe builds inside its fixture: its classes, config and redraw
        torch.manual_seed(0)
        hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))
        moe.redraw(hf)
        return hf.eval()
    return module.make_hf(model_cls, config_cls, kw)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(corpus()))
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, qwen3_next):  # noqa: F811  (the imported fixture)
    """family -> (HF model, its directory: save_pretrained and, by style, a tokenizer.json)."""
    tokenizers, done = {}, {}

    def get(family):
        if family not in done:
            hf, style = build_hf(family, qwen3_next), FAMILIES[family][2]
            path = tmp_path_factory.mktemp(family)
            hf.save_pretrained(path)
            if style:
                tokenizers.setdefault(style, byte_level(style)).save(str(path / "tokenizer.json"))
            done[family] = hf, path
        return done[family]
    return get


def run(out, text, *args):
    """train.main -> (its result, metrics.jsonl's records)."""
    result = train.main([f"--data={text}", f"--out_dir={out}", *RUN, *args])
    metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().split("\n")
               if line]
    return result, metrics


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, hf_dirs, text):
    """family -> (HF model, train.py's result and metrics, out_dir): two steps from the HF
    directory, exported with --export=hf."""
    done = {}

    def get(family):
        if family not in done:
            hf, path = hf_dirs(family)
            out = tmp_path_factory.mktemp(f"{family}_run")
            tok = [] if FAMILIES[family][2] else ["--tokenizer=byte"]
            done[family] = (hf, *run(out, text, f"--init_from={path}", "--export=hf", *tok), out)
        return done[family]
    return get


def eval_batches(out, model, split):
    """The batches train.py's evaluation draws from a split (its batch maker, generator seed and
    count), from the data it prepared into out_dir."""
    data_dir = next((Path(out) / "data").glob("*/meta.json")).parent
    meta = json.loads((data_dir / "meta.json").read_text())
    data = load_tokens(data_dir / f"{split}.bin", meta["dtype"])
    objective, pair_task = model_task(out)
    gen = torch.Generator().manual_seed(SEED + 1)
    return [OBJECTIVES[objective](data, B, gen, model.config, meta["vocab_size"], pair_task)
            for _ in range(EVAL_ITERS)]


def model_task(out):
    ckpt = load_checkpoint(Path(out) / "ckpt.pt")
    return ckpt["objective"], ckpt["pair_task"]


def hf_loss(hf, batch):
    """The loss train.py reports, computed from HF's logits: token cross-entropy over the targets
    (-1 ignored), plus NSP/SOP's on the sentence logits."""
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids") if k in batch}
    if getattr(hf.config, "type_vocab_size", 0) and "token_type_ids" in batch:
        kw["token_type_ids"] = batch["token_type_ids"]
    with torch.no_grad():
        out = hf(**kw)
    logits = out.prediction_logits if "prediction_logits" in out else out.logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(),
                           ignore_index=-1)
    if "cls_targets" in batch:
        cls = out.get("seq_relationship_logits", out.get("sop_logits"))
        loss = loss + F.cross_entropy(cls.float(), batch["cls_targets"])
    return loss.item()


def auto_load(path):
    config = json.loads((Path(path) / "config.json").read_text())
    head = config["architectures"][0]
    auto = next(a for k, a in (("CausalLM", "AutoModelForCausalLM"),
                               ("LMHeadModel", "AutoModelForCausalLM"),
                               ("PreTraining", "AutoModelForPreTraining"),
                               ("MaskedLM", "AutoModelForMaskedLM"),
                               ("ConditionalGeneration", "AutoModelForSeq2SeqLM"),
                               ("MTModel", "AutoModelForSeq2SeqLM")) if k in head)
    return config, getattr(transformers, auto).from_pretrained(path).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_starts_from_the_hf_model_and_exports_back(finetuned, hf_dirs, family):
    hf, result, metrics, out = finetuned(family)
    model = result["model"].eval()
    first = metrics[0]
    assert first["iter"] == 0
    for split in ("train", "val"):   # exactly the pretrained model: HF's loss on those batches
        want = sum(hf_loss(hf, b) for b in eval_batches(out, model, split)) / EVAL_ITERS
        assert abs(first[f"{split}_loss"] - want) <= TOL * max(1.0, want), (split, first, want)
    assert metrics[-1]["iter"] == 2 and metrics[-1]["val_loss"] != first["val_loss"]  # it trained
    config, back = auto_load(out / "hf")
    assert config["model_type"] == family
    source = hf_dirs(family)[1] / "tokenizer.json"
    written = out / "hf" / "tokenizer.json"
    assert written.is_file() == source.is_file()
    assert not source.is_file() or written.read_text() == source.read_text()
    batch = eval_batches(out, model, "val")[0]
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids") if k in batch}
    if getattr(back.config, "type_vocab_size", 0) and "token_type_ids" in batch:
        kw["token_type_ids"] = batch["token_type_ids"]
    with torch.no_grad():
        got, want = back(**kw), model(**kw)
    logits = got.prediction_logits if "prediction_logits" in got else got.logits
    keep = kw["attention_mask"].bool() if "attention_mask" in kw else torch.ones(
        logits.shape[:2], dtype=torch.bool)
    assert (logits - want.logits)[keep].abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------
# --eval_only: load, evaluate, write nothing


def test_eval_only_from_hf_directory_writes_nothing(finetuned, hf_dirs, text, tmp_path, capsys):
    _, _, metrics, _ = finetuned("llama")
    out = tmp_path / "never"
    result = train.main([f"--data={text}", f"--out_dir={out}", *RUN, "--eval_only",
                         f"--init_from={hf_dirs('llama')[1]}"])
    assert not out.exists()
    assert result["val_loss"] == metrics[0]["val_loss"]     # the fine-tune's first evaluation
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("eval iter 0: train loss ") and f"(ppl {metrics[0]['val_ppl']:.2f})" \
        in line


def snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*")}


def test_eval_only_on_resume_leaves_out_dir_unchanged(finetuned, text):
    _, _, metrics, out = finetuned("gpt2")
    before = snapshot(out)
    result = train.main([f"--out_dir={out}", "--resume", "--eval_only"])
    assert snapshot(out) == before
    assert result["val_loss"] == metrics[-1]["val_loss"]


# ----------------------------------------------------------------------------------------------
# init_from a checkpoint of ours; resuming a fine-tune


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, text):
    """A tiny byte-level model trained 20 steps from scratch, and a char-level one."""
    runs = {}
    for tok in ("byte", "char"):
        out = tmp_path_factory.mktemp(f"pretrained_{tok}")
        train.main([f"--data={text}", f"--out_dir={out}", *TINY, f"--tokenizer={tok}",
                    "--max_iters=20", "--eval_interval=20"])
        runs[tok] = out
    return runs


def test_init_from_checkpoint_starts_from_its_weights_and_tokenizer(pretrained, text, tmp_path):
    best = pretrained["byte"] / "ckpt_best.pt"
    # TINY's model keys equal the checkpoint's: allowed; dropout changes no shape
    result = train.main([f"--data={text}", f"--out_dir={tmp_path}", *TINY, "--max_iters=2",
                         "--eval_interval=2", f"--init_from={best}", "--dropout=0.1"])
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().split("\n")
               if line]
    assert metrics[0]["val_loss"] == load_checkpoint(best)["val_loss"]
    assert result["model"].config.dropout == 0.1
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["tokenizer"] == {"kind": "byte"} and ckpt["train_config"]["tokenizer"] == "byte"
    assert "val_bpb" in metrics[0]


def test_run_from_scratch_exports_and_replaces_its_export(text, tmp_path):
    """A Llama-style config trained from scratch (TINY) -> --export=hf -> LlamaForCausalLM with our
    logits; out_dir/hf counts as the run's: a fresh run refuses it, --overwrite replaces it."""
    args = [*TINY, "--max_iters=2", "--eval_interval=2", "--tokenizer=byte", "--export=hf"]
    result = train.main([f"--data={text}", f"--out_dir={tmp_path}", *args])
    config, back = auto_load(tmp_path / "hf")
    assert type(back).__name__ == "LlamaForCausalLM" and not (tmp_path / "hf" / "tokenizer.json"
                                                              ).exists()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(x).logits - result["model"].eval()(x).logits).abs().max().item() <= TOL
    for path in (tmp_path / "ckpt.pt", tmp_path / "ckpt_best.pt"):
        path.unlink()
    with pytest.raises(ValueError, match="holds hf from another run"):
        train.main([f"--data={text}", f"--out_dir={tmp_path}", *args])
    before = (tmp_path / "hf" / "model.safetensors").stat().st_mtime_ns
    train.main([f"--data={text}", f"--out_dir={tmp_path}", *args, "--overwrite", "--seed=7"])
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mtime_ns != before


def test_char_checkpoint_on_other_text_is_refused(pretrained, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("entirely different characters: QXZ 0123456789 " * 200)
    with pytest.raises(ValueError) as e:
        train.main([f"--data={other}", f"--out_dir={tmp_path / 'out'}", *TINY,
                    f"--init_from={pretrained['char'] / 'ckpt_best.pt'}"])
    assert "char tokenizer is fitted to the text it was trained on" in str(e.value)


def losses(metrics, key):
    return {m["iter"]: m[key] for m in metrics if key in m}


def test_resumed_finetune_equals_an_uninterrupted_one(hf_dirs, text, tmp_path):
    """--resume continues a fine-tune (init_from only starts one): 2 steps, then resumed to 4,
    gives the losses of 4 steps in one go."""
    path = hf_dirs("llama")[1]
    args = [f"--init_from={path}", "--eval_interval=1", "--lr_decay_iters=4"]
    _, whole = run(tmp_path / "whole", text, *args, "--max_iters=4")
    run(tmp_path / "split", text, *args, "--max_iters=2")
    _, split = run(tmp_path / "split", text, *args, "--max_iters=4", "--resume")
    for key in ("loss", "val_loss", "train_loss"):
        assert losses(split, key) == losses(whole, key) and len(losses(whole, key)) >= 4
    with pytest.raises(ValueError, match=f"it was trained with init_from='{path}' "
                                         f"\\(this run: '/elsewhere'\\)"):
        train.main([f"--out_dir={tmp_path / 'whole'}", "--resume", "--init_from=/elsewhere",
                    "--max_iters=5"])


# ----------------------------------------------------------------------------------------------
# refusals: one line each, before anything is written


@pytest.fixture(scope="module")
def small_vocab_bert(tmp_path_factory, qwen3_next):  # noqa: F811
    path = tmp_path_factory.mktemp("bert_300")
    build_hf("bert", qwen3_next, vocab_size=300).save_pretrained(path)
    return path


BAD = [  # (arguments, what the message says)
    (["--init_from={d}/nowhere.pt"], "checkpoint {d}/nowhere.pt does not exist"),
    (["--init_from={d}"], "is a directory without config.json, so not a HF-format one"),
    (["--init_from={mistral}"], "brings no tokenizer a name can rebuild (a HF directory without "
                                "tokenizer.json"),
    (["--init_from={llama}", "--n_layer=3"], "n_layer=3 changes the shape of weights that "
                                             "init_from={llama} holds (there n_layer=2)"),
    (["--init_from={gpt2}", "--block_size=128"], "block_size=128 changes the shape"),
    (["--init_from={bert300}", "--tokenizer=byte"], "the tokenizer's 256 ids + 105 special tokens "
                                                    "of objective mlm do not fit the 300 "
                                                    "embeddings"),
    (["--eval_only"], "eval_only=True must be false unless there are weights to evaluate"),
    (["--init_from={llama}", "--eval_only", "--export=hf"], "export='hf' must name none with "
                                                            "eval_only=true"),
    (["--position=alibi", "--export=hf"], "export=hf: no HF family expresses this config: none of "
                                          "gpt2, llama"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input_is_one_line_error(args, message, hf_dirs, small_vocab_bert, text, tmp_path):
    fill = dict(d=tmp_path, llama=hf_dirs("llama")[1], gpt2=hf_dirs("gpt2")[1],
                mistral=hf_dirs("mistral")[1], bert300=small_vocab_bert)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        train.main([f"--data={text}", f"--out_dir={out}", *RUN, *(a.format(**fill) for a in args)])
    msg = str(e.value)
    assert message.format(**fill) in msg and "\n" not in msg, msg
    if "mlm" not in message:  # (the vocabulary is checked once the data is prepared)
        assert not out.exists()
