"""Classification fine-tuning, SiFT, and the fused LM head's memory.

objective=classify: the text<TAB>label loader and its framing (data/objectives.py); the N-way head
on an encoder's pooled [CLS] and on a decoder's last real token, equal to HF's
BertForSequenceClassification and GPT2ForSequenceClassification given the same weights; train.py
runs that reach high val accuracy on a synthetic task whose label is carried by one word of the
text (an encoder, a decoder, an encoder with SiFT); train.py fine-tuning from a HF BERT and a HF
GPT-2 directory with their own tokenizer.json, exported (--export=hf) as *ForSequenceClassification
with equal logits and loaded back; generate.py --classify; one-line errors.
SiFT (train.py): the perturbation and the loss term against a DeBERTa-style reference written here.
Memory (model.py): a training call's LM head fused with its cross-entropy gives the loss and
gradients of full logits into F.cross_entropy, and keeps nothing logit-sized for backward; with
grad_checkpoint a step's peak of live tensor bytes is at most a third of the peak without.
"""
import contextlib
import copy
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import generate
import model as model_py
import train
from data.objectives import (
    checkpoint_specials,
    class_probs,
    classify_inputs,
    config_overrides,
    load_labeled,
    special_ids,
    special_tokens,
)
from data.tokenizers import get_tokenizer, make_tokenizer
from model import Config, Transformer, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
KEYWORDS = {"pos": "good great superb lovely", "neg": "bad awful poor dull",
            "mixed": "okay average fair plain"}
FILLER = ("the a of to and in is was it this that with for on as at by from story film day night "
          "time people place thing").split()
# a small model, BPE over the file (its words become tokens), 100 steps of 32 texts
RUN = ["--n_layer=2", "--d_model=64", "--n_head=4", "--block_size=32", "--batch_size=32",
       "--warmup_iters=10", "--lr=5e-3", "--tokenizer=bpe", "--bpe_vocab_size=320",
       "--max_iters=100", "--eval_interval=50", "--eval_iters=4", "--log_interval=50"]
ARCHS = {"encoder": ["--architecture=encoder_only", "--norm=layernorm", "--embed_norm=true"],
         "decoder": []}


def sentiment_lines(n, seed=0):
    """`text<TAB>label` lines: 3-9 filler words with one keyword of the label inserted."""
    r = random.Random(seed)
    lines = []
    for _ in range(n):
        label = r.choice(sorted(KEYWORDS))
        words = [r.choice(FILLER) for _ in range(r.randint(3, 9))]
        words.insert(r.randint(0, len(words)), r.choice(KEYWORDS[label].split()))
        lines.append(f"{' '.join(words)}\t{label}\n")
    return lines


@pytest.fixture(scope="module")
def tsv(tmp_path_factory):
    path = tmp_path_factory.mktemp("classify") / "sentiment.tsv"
    path.write_text("".join(sentiment_lines(600)))
    return path


@pytest.fixture(scope="module", params=["encoder", "decoder", "encoder_sift"])
def run(request, tsv, tmp_path_factory):
    """One train.py classify run per architecture (and the encoder with --sift): (its out_dir,
    main's result, metrics.jsonl as dicts, what it printed)."""
    out = tmp_path_factory.mktemp(request.param)
    args = [f"--data={tsv}", f"--out_dir={out}", "--objective=classify", *RUN,
            *ARCHS[request.param.split("_")[0]], *(["--sift"] if "sift" in request.param else [])]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        result = train.main(args)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, result, metrics, printed.getvalue()


# ----------------------------------------------------------------------------------------------
# objective=classify: data, framing, head


def test_load_labeled_splits_sorts_classes_and_frames(tmp_path):
    path = tmp_path / "l.tsv"
    path.write_text("".join(f"w{i}\t{'pos' if i % 2 else 'neg '}\n" for i in range(9)) + "\n"
                    "w9\tpos\n")
    tok = make_tokenizer("char", path.read_text())
    train_rows, val_rows = load_labeled(path, tok)
    assert train_rows.classes == val_rows.classes == ["neg", "pos"]   # sorted, spaces stripped
    assert [c for _, c in train_rows] == [0, 1] * 4 + [0] and val_rows == [(tok.encode("w9"), 1)]
    enc = Config(architecture="encoder_only", vocab_size=120, block_size=4)
    sp = special_ids(10)
    x = classify_inputs([[1, 2, 3], [4]], enc, 10)      # cut to block_size: [SEP] stays last
    assert x["input_ids"].tolist() == [[sp["[CLS]"], 1, 2, sp["[SEP]"]],
                                       [sp["[CLS]"], 4, sp["[SEP]"], sp["[PAD]"]]]
    assert x["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    decoder = special_tokens(tok, "classify", "decoder_only")     # a decoder needs no specials
    assert not decoder.appended and decoder.pad == 0               # (any pad: masked out)
    x = classify_inputs([[1, 2, 3, 4, 5], [4]], Config(vocab_size=10, block_size=4), decoder)
    assert x["input_ids"].tolist() == [[1, 2, 3, 4], [4, 0, 0, 0]]   # a decoder: bare text
    assert x["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert config_overrides("classify", decoder, "decoder_only") == {}
    assert config_overrides("classify", 10, "encoder_only") == {"vocab_size": 10 + 105}


@pytest.mark.parametrize("lines, message", [
    (["a\tpos\n", "b\tneg\n"] * 5 + ["c\tmeh\n"],     # 11 lines: the last one is val
     r"l\.tsv line 11 \(a val line\) has the label 'meh', which no train line has \(train "
     r"labels: \['neg', 'pos'\]\)"),
    (["a\tpos\n"] * 10, r"have only the label 'pos'; classification needs at least two labels"),
    (["a\tpos\n"] * 5, r"has 5 text<TAB>label lines; a train/val split needs at least 10"),
    (["a\tpos\n", "no tab\n"] * 5, r"line 2 has 1 tab-separated columns; each line must be "
                                   r"text<TAB>label"),
])
def test_bad_label_files_are_one_line_errors(tmp_path, lines, message):
    path = tmp_path / "l.tsv"
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=message):
        load_labeled(path, make_tokenizer("char", path.read_text()))


def hf_pair(tmp_path, family):
    """(ours, HF's *ForSequenceClassification) with the same weights: a random HF pretraining
    model saved, loaded with from_pretrained and given a 3-way head (train.with_classes), whose
    weights (drawn large, so that they move the logits) are copied into HF's classifier."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_attention_heads=4,
                                      intermediate_size=96, max_position_embeddings=64,
                                      num_hidden_layers=2, type_vocab_size=2,
                                      attn_implementation="eager")
        transformers.BertForPreTraining(cfg).save_pretrained(tmp_path)
        ref = transformers.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
        head = ref.classifier
    else:
        cfg = transformers.GPT2Config(vocab_size=120, n_embd=64, n_layer=2, n_head=4,
                                      n_positions=64, attn_implementation="eager")
        transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
        ref = transformers.GPT2ForSequenceClassification.from_pretrained(
            tmp_path, num_labels=3, pad_token_id=0)
        head = ref.score
    ours = train.with_classes(Transformer.from_pretrained(tmp_path), 3)
    with torch.no_grad():
        ours.cls.weight.normal_()
        head.weight.copy_(ours.cls.weight)
        if ours.cls.bias is not None:
            ours.cls.bias.normal_()
            head.bias.copy_(ours.cls.bias)
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_head_equals_hf_sequence_classification(tmp_path, family):
    """The encoder's pooled [CLS] (BERT's pooler, kept from the pretrained file) and the decoder's
    last real token: logits equal to HF's for a batch whose second row is right-padded."""
    ours, ref = hf_pair(tmp_path, family)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 120, (2, 12), generator=g)            # id 0: GPT-2's pad_token_id
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).cls_logits
        want = ref(ids, attention_mask=mask).logits
        alone = ours(ids[1:, :7]).cls_logits          # the padded row without its padding
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1:], alone, rtol=0, atol=1e-5)
    assert (want[0] - want[1]).abs().max() > 0.1                 # the rows differ


def family_tokenizer(family, lines):
    """A tokenizer.json trained on lines with the family's special tokens: BERT's WordPiece
    ([PAD] [UNK] [CLS] [SEP] [MASK], "[CLS] $A [SEP]") or GPT-2's byte-level BPE
    (<|endoftext|>)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    if family == "bert":
        tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer = normalizers.BertNormalizer(), \
            pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(lines, trainers.WordPieceTrainer(
            vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            show_progress=False))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return tok
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), \
        decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def hf_run(request, tsv, tmp_path_factory):
    """train.py --init_from a small random HF directory (BertForPreTraining, GPT2LMHeadModel)
    with a tokenizer.json of its family trained on the TSV's texts, --objective=classify,
    --export=hf: (family, the HF directory, out_dir, main's result, metrics.jsonl's records)."""
    transformers = pytest.importorskip("transformers")
    family, hf_dir = request.param, tmp_path_factory.mktemp(f"{request.param}_hf")
    tok = family_tokenizer(family, [line.split("\t")[0] for line in tsv.read_text().splitlines()])
    V = tok.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    if family == "bert":
        hf = transformers.BertForPreTraining(transformers.BertConfig(
            vocab_size=V, hidden_size=64, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, num_hidden_layers=2, type_vocab_size=2))
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
            eos_token_id=0))                                                # <|endoftext|>
    hf.save_pretrained(hf_dir)
    tok.save(str(hf_dir / "tokenizer.json"))
    out = tmp_path_factory.mktemp(f"{family}_classify")
    with contextlib.redirect_stdout(io.StringIO()):
        result = train.main([f"--data={tsv}", f"--out_dir={out}", f"--init_from={hf_dir}",
                             "--objective=classify", "--block_size=32", "--batch_size=32",
                             "--warmup_iters=10", "--lr=5e-3", "--max_iters=60",
                             "--eval_interval=60", "--eval_iters=4", "--export=hf"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return family, hf_dir, out, result, metrics


def test_classify_from_hf_directory_exports_a_sequence_classifier(hf_run, tsv):
    """From a HF BERT (GPT-2) directory and its own tokenizer.json: high val accuracy; the text is
    framed with the tokenizer's own [CLS] and [SEP] (the `tokenizers` library's framing), the
    vocabulary did not grow; --export=hf loads as BertForSequenceClassification
    (GPT2ForSequenceClassification) with the classes as id2label, no LM head weight, our logits on
    right-padded val texts (GPT-2: padded with config.json's pad_token_id, its <|endoftext|>, which
    HF skips to find each text's last token) and the source's tokenizer.json; and train.py
    --init_from that export keeps the classifier (its id2label are the data's classes)."""
    transformers = pytest.importorskip("transformers")
    family, hf_dir, out, result, metrics = hf_run
    assert metrics[-1]["iter"] == 60 and metrics[-1]["val_accuracy"] >= 0.95
    ckpt = load_checkpoint(out / "ckpt.pt")
    model, tok = result["model"].eval(), get_tokenizer(ckpt["tokenizer"])
    sp = checkpoint_specials(tok, ckpt)
    assert not sp.appended and model.config.vocab_size == tok.vocab_size
    lib = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    texts = [line.split("\t")[0] for line in tsv.read_text().splitlines()[-8:]]
    batch = classify_inputs([tok.encode(t) for t in texts], model.config, sp)
    if family == "bert":
        assert batch["input_ids"][0, :int(batch["attention_mask"][0].sum())].tolist() == \
            lib(texts[0])["input_ids"]
    back, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        out / "hf", output_loading_info=True)
    assert type(back).__name__ == {"bert": "BertForSequenceClassification",
                                   "gpt2": "GPT2ForSequenceClassification"}[family]
    assert not any(info.values()), info                  # no missing, unexpected (LM head) weights
    assert back.config.id2label == {0: "mixed", 1: "neg", 2: "pos"}
    assert back.config.problem_type == "single_label_classification"
    assert (batch["input_ids"] == back.config.pad_token_id).any()       # padding was there to skip
    if family == "gpt2":
        assert back.config.pad_token_id == lib.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        want = model(**batch).cls_logits
        got = back.eval()(**batch).logits
    assert want.std() > 0.3 and (got - want).abs().max().item() <= 1e-4
    assert (out / "hf" / "tokenizer.json").read_text() == (hf_dir / "tokenizer.json").read_text()
    again = train.main([f"--data={tsv}", f"--out_dir={out / 'again'}", "--eval_only",
                        f"--init_from={out / 'hf'}", "--block_size=32", "--eval_iters=4",
                        "--batch_size=32"])
    assert again["val_loss"] == pytest.approx(metrics[-1]["val_loss"], abs=1e-5)  # kept head


# ----------------------------------------------------------------------------------------------
# train.py and generate.py


def test_classify_run_reaches_high_accuracy(run, tsv):
    """The eval lines' val accuracy (over the eval batches) and the exact one over every val text
    reach 0.95; the checkpoint stores the classes; the run ends with SHOWN val examples."""
    out, result, metrics, printed = run
    evals = [m for m in metrics if "val_accuracy" in m]
    assert [m["iter"] for m in evals] == [0, 50, 100] and evals[-1]["val_accuracy"] >= 0.95
    assert f"eval iter 100: train loss {evals[-1]['train_loss']:.4f}, val loss " \
           f"{evals[-1]['val_loss']:.4f}, val accuracy {evals[-1]['val_accuracy']:.4f}" in printed
    assert evals[0]["val_accuracy"] < 0.7                          # it learned it
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["classes"] == ["mixed", "neg", "pos"] and ckpt["objective"] == "classify"
    assert ckpt["config"]["cls_head"] and ckpt["config"]["n_classes"] == 3
    tok = make_tokenizer("bpe", tsv.read_text(), 320)
    val_rows = load_labeled(tsv, tok)[1]
    model = result["model"].eval()
    sp = special_tokens(tok, "classify", model.config.architecture)
    assert sp.appended == (model.config.architecture == "encoder_only")  # bpe: no [CLS] of its own
    probs = class_probs(model, [t for t, _ in val_rows], sp)
    assert (probs.argmax(-1) == torch.tensor([c for _, c in val_rows])).float().mean() >= 0.95
    shown = result["sample"].splitlines()
    assert len(shown) == 5 and all(" -> " in s and "; label " in s for s in shown)
    assert printed.endswith(f"sample:\n{result['sample']}\n\n")


def test_generate_classify_prints_label_and_probabilities(run, capsys):
    out = run[0]
    assert generate.main(["--checkpoint", str(out / "ckpt.pt"), "--classify",
                          "the day was superb and the film too"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "pos" and len(lines) == 4
    probs = {label: float(p) for label, p in (line.strip().split(": ") for line in lines[1:])}
    assert set(probs) == {"pos", "neg", "mixed"} and probs["pos"] > 0.9
    assert abs(sum(probs.values()) - 1) < 1e-3


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train
torch.set_num_threads(1)
result = train.main(sys.argv[1:])
torch.save(result["model"].state_dict(), os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
"""


@pytest.mark.parametrize("sift", [False, True], ids=["plain", "sift"])
def test_ddp_classify(tmp_path, tsv, sift):
    """Under torchrun (2 CPU ranks, gloo) the classifier trains like one process with the whole
    batch (each rank's rows are padded to the global batch's longest; the LM head, unused, is
    DDP's find_unused_parameters case). With SiFT, whose extra forwards run on the unwrapped
    model, the replicas stay identical (its random starts differ per rank, as dropout does)."""
    args = ["--objective=classify", *RUN, *ARCHS["encoder"], "--max_iters=4", "--eval_interval=2",
            "--batch_size=8", "--grad_accum=2", *(["--sift"] if sift else [])]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script), f"--data={tsv}",
                        f"--out_dir={tmp_path / 'ddp'}", *args],
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    if sift:
        return
    single = train.main([f"--data={tsv}", f"--out_dir={tmp_path / 'one'}", *args,
                         "--batch_size=16"])["model"].state_dict()
    assert max((rank0[k] - single[k]).abs().max() for k in rank0) < 1e-5
    metrics = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text()
                .splitlines() if "val_loss" in line] for d in ("ddp", "one")]
    for a, b in zip(*metrics):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-5
        assert a["val_accuracy"] == b["val_accuracy"]


@pytest.mark.parametrize("args, message", [
    (["--data=stdlib"], "objective=classify reads text<TAB>label lines from a text file, not "
                        "data='stdlib'; pass --data=labels.tsv"),
    (["--n_classes=5"], "n_classes=5 but the train lines of data="),
    (["--architecture=encoder_decoder"], "objective='classify' trains encoder_only or "
                                         "decoder_only models but this config is encoder_decoder"),
    (["--objective=lm", "--sift"], "sift=true perturbs a classifier's inputs: it needs "
                                   "objective=classify (here lm)"),
    (["--sift_eps=0"], "sift_eps=0.0 must be > 0 and finite"),
    ([*ARCHS["encoder"], "--block_size=2"], "block_size=2 cannot hold [CLS] text [SEP]; use "
                                            "block_size >= 3"),
])
def test_bad_classify_runs_are_one_line_errors(tmp_path, tsv, args, message):
    with pytest.raises(ValueError) as e:
        train.main([f"--data={tsv}", f"--out_dir={tmp_path}", "--objective=classify", *RUN,
                    *args])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_generate_refuses_mismatched_inputs(tmp_path, capsys):
    tok = make_tokenizer("char", "abc ")
    model = Transformer(Config(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=1,
                               d_model=8, cls_head=True, n_classes=2))
    save_checkpoint(tmp_path / "lm.pt", model, tokenizer=tok.meta, objective="lm")
    save_checkpoint(tmp_path / "cls.pt", model, tokenizer=tok.meta, objective="classify",
                    classes=["x", "y"])
    assert generate.main(["--checkpoint", str(tmp_path / "lm.pt"), "--classify", "abc"]) == 2
    assert "is not a classifier: --classify takes a checkpoint" in capsys.readouterr().err
    assert generate.main(["--checkpoint", str(tmp_path / "cls.pt"), "--prompt", "abc"]) == 2
    assert "is a classifier (objective=classify): give its text with --classify" in \
        capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# SiFT


def naive_symmetric_kl(a, b):
    p, q = a.softmax(-1), b.softmax(-1)
    return F.kl_div(q.log(), p, reduction="batchmean") + F.kl_div(p.log(), q, reduction="batchmean")


class NormalizeAndAdd(nn.Module):
    """DeBERTa's SiFT layer, in front of the embedding LayerNorm: normalize without gain, add d."""

    def __init__(self, d):
        super().__init__()
        self.d = d

    def forward(self, e):
        return F.layer_norm(e, e.shape[-1:], eps=1e-12) + self.d


def test_sift_perturbation_and_term_match_a_deberta_style_reference():
    """train.py adds s*d to the summed embeddings (s: their per-token std); the reference
    normalizes them and adds d, in a module before the LayerNorm, as DeBERTa's code does. The
    ascent step from the same random start, and the loss term, must agree."""
    torch.manual_seed(0)
    cfg = Config(architecture="encoder_only", vocab_size=50, block_size=16, n_layer=2, n_head=2,
                 d_model=32, norm_placement="post", final_norm=False, embed_norm=True,
                 norm_eps=1e-12, type_vocab_size=2, cls_head=True, n_classes=3)
    model = Transformer(cfg)
    with torch.no_grad():
        model.cls.weight.mul_(100)                                 # a confident classifier
    ids = torch.randint(0, 50, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "cls_targets": torch.tensor([0, 1, 2])}
    tc = train.TrainConfig(sift=True, sift_eps=0.05, sift_step=0.1)
    clean = model(**batch).cls_logits
    torch.manual_seed(1)
    d = train.sift_perturbation(model, batch, clean, tc)
    torch.manual_seed(1)
    start = torch.randn(3, 10, 32) * 0.05                           # the same draw
    ref = copy.deepcopy(model)
    ref.embed_norm = nn.Sequential(NormalizeAndAdd(start.clone().requires_grad_()),
                                   ref.embed_norm)
    g, = torch.autograd.grad(naive_symmetric_kl(clean.detach(), ref(**batch).cls_logits),
                             ref.embed_norm[0].d)
    want = start + 0.1 * g / g.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(d, want, rtol=0, atol=1e-5)
    moved = (d - start).abs().amax(-1)                              # (B, T) each token's step
    torch.testing.assert_close(moved[mask.bool()], torch.full((26,), 0.1), rtol=0, atol=1e-4)
    assert moved[~mask.bool()].max() < 1e-4                  # padding: the prediction ignores it
    ref.embed_norm[0].d = want
    torch.manual_seed(1)
    term = train.sift_loss(model, batch, clean, tc)
    torch.testing.assert_close(term, naive_symmetric_kl(clean, ref(**batch).cls_logits),
                               rtol=1e-4, atol=1e-6)
    assert term > 1e-3


# ----------------------------------------------------------------------------------------------
# the fused LM head and its memory


def full_logits_loss(model, ids, targets):
    """The head as it was: full logits into F.cross_entropy."""
    cfg = model.config
    x = model.hidden(ids)
    if cfg.head_input_scale is not None:
        x = x * cfg.head_input_scale
    logits = model.lm_head(model.head_transform(x))
    if cfg.final_softcap is not None:
        logits = cfg.final_softcap * torch.tanh(logits / cfg.final_softcap)
    return logits, F.cross_entropy(logits.float().flatten(0, -2), targets.reshape(-1),
                                   ignore_index=-1)


HEADS = {"tied": {}, "softcap_bias_untied": dict(final_softcap=3.0, head_bias=True,
                                                 tie_embeddings=False),
         "bert_head_scaled": dict(head_transform=True, head_bias=True, head_input_scale=0.5)}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_training_call_equals_full_logits(monkeypatch, head, dtype):
    """A training call's loss and every gradient as full logits into F.cross_entropy give them,
    with ignored targets and several row blocks; fp32 to rounding,
    bf16 autocast to bf16's precision."""
    monkeypatch.setattr(model_py, "CE_CHUNK", 300 * 7)                # chunks of 7 rows
    torch.manual_seed(0)
    model = Transformer(Config(vocab_size=300, block_size=32, n_layer=2, n_head=2, d_model=32,
                               **HEADS[head]))
    ids, targets = torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20))
    targets[0, :7] = -1
    results = []
    for fused in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
            out = model(ids, targets) if fused else None
            loss = out.loss if fused else full_logits_loss(model, ids, targets)[1]
        (3 * loss).backward()
        results.append((out, loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out, loss, grads), (_, ref_loss, ref_grads) = results
    assert out.logits is None                                          # fused: none made
    tol = dict(rtol=0, atol=1e-6) if dtype == "fp32" else dict(rtol=0, atol=1e-3)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for name, g in ref_grads.items():
        if "k_proj.bias" in name:                  # softmax ignores it: zero up to rounding
            continue
        scale = g.abs().max()
        err = (grads[name] - g).abs().max() / scale
        assert err < (1e-5 if dtype == "fp32" else 3e-2), (name, err.item())


def test_eval_call_and_a_narrow_vocabulary_return_logits():
    """Without grad, or with a vocabulary no wider than the head's input (char-level), the head
    runs unfused: logits as without targets, the loss F.cross_entropy's."""
    torch.manual_seed(0)
    for vocab in (64, 8):
        model = Transformer(Config(vocab_size=vocab, block_size=16, n_layer=1, n_head=2,
                                   d_model=16))
        ids, targets = torch.randint(0, vocab, (2, 8)), torch.randint(0, vocab, (2, 8))
        targets[0] = -1
        for grad in (False, True) if vocab == 8 else (False,):
            with torch.set_grad_enabled(grad):
                out = model(ids, targets)
                ref_logits, ref_loss = full_logits_loss(model, ids, targets)
            torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=0)
            torch.testing.assert_close(out.loss, ref_loss, rtol=0, atol=0)
    out = Transformer(Config(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16))(
        ids, torch.full((2, 8), -1))
    assert out.logits is None and out.loss.isnan()                     # nothing to predict


def test_training_call_saves_nothing_logit_sized_for_backward():
    """F.cross_entropy keeps a (B*T, V) fp32 log-softmax until backward; the fused head keeps
    nothing that size (its gradients are (B*T, C) and (V, C))."""
    torch.manual_seed(0)
    model = Transformer(Config(vocab_size=2048, block_size=64, n_layer=1, n_head=2, d_model=32))
    ids = torch.randint(0, 2048, (2, 65))
    largest = {}
    for fused in (True, False):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t,
                                                      lambda t: t):
            if fused:
                model(ids[:, :-1], ids[:, 1:])
            else:
                full_logits_loss(model, ids[:, :-1], ids[:, 1:])
        largest[fused] = max(t.numel() for t in saved)
    assert largest[True] <= 2048 * 32 and largest[False] == 2 * 64 * 2048   # <= W; log-softmax


def live_peak(model, ids, existing):
    """The most bytes of tensors alive at once in a training step (tests/bench/bench_train.py's
    LiveBytes), beyond `existing` (weights, gradients)."""
    spec = importlib.util.spec_from_file_location("bench_train",
                                                  ROOT / "tests" / "bench" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with bench.LiveBytes(existing) as live:
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
    return live.peak


def test_grad_checkpoint_keeps_at_most_a_third_of_the_activation_memory():
    peaks = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Transformer(Config(vocab_size=1024, block_size=128, n_layer=4, n_head=4,
                                   d_model=256, norm="rmsnorm", position="rope", ffn="glu",
                                   activation="silu", bias=False, grad_checkpoint=ckpt))
        ids = torch.randint(0, 1024, (4, 129))
        model(ids[:, :-1], ids[:, 1:]).loss.backward()               # allocates the gradients
        peaks[ckpt] = live_peak(model, ids, [*model.parameters(),
                                             *(p.grad for p in model.parameters())])
    assert peaks[True] <= peaks[False] / 3, peaks
