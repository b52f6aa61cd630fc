"""Fine-tuning (issue 12): train.py --init_from, --eval_only and --export=hf, end to end.

Per family, a small random HF model (the import tests' builders) is fine-tuned for two steps
through train.py --init_from on a text file (BART: a TSV of pairs): the first evaluation must equal
HF's own loss on the same batches, and the --export=hf directory must load in transformers' Auto
class with logits equal to the fine-tuned model's. BERT, ALBERT, DeBERTa-v3, T5 and BART carry a
tokenizer.json with their family's special tokens, built here with `tokenizers` (T5's sentinels
numbered down from the vocabulary's end, as its file has them), and a vocabulary of exactly its
size: the objectives must frame with those tokens (HF's own loss, given labels, checks that the
masks, sentinels, EOS and decoder start agree), the vocabulary must not grow, and the export
writes the tokenizer.json and their ids back. The decoders use a vocabulary of 512, a byte-level
BPE tokenizer.json where the family has one, else --tokenizer=byte. Then: --eval_only writes
nothing, init_from a checkpoint of ours, resuming a fine-tune, generate.py framing text with a
fine-tuned checkpoint's tokens as the `tokenizers` library does, and every refusal as one line.
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
import test_tokenizers as tt  # noqa: E402
from test_deltanet import qwen3_next  # noqa: E402,F401  (a fixture)
from test_tokenizers import byte_level, corpus  # noqa: E402
from test_train import TINY  # noqa: E402
from tokenizers import AddedToken, normalizers, pre_tokenizers, processors  # noqa: E402

import generate  # noqa: E402
import train  # noqa: E402
from data.objectives import OBJECTIVES, checkpoint_specials, load_pairs  # noqa: E402
from data.prepare import VAL_FRACTION, get_tokenizer, load_tokens  # noqa: E402
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
    "bert": (enc, "bert", "bert"),           # the family's own special tokens: OWN below
    "albert": (enc, "albert", "albert"),
    "deberta-v2": (enc, "deberta", "deberta"),
    "bart": (enc, "bart", "bart"),
    "marian": (enc, "marian", None),
    "t5": (enc, "t5_v1_1", "t5"),
}


def t5_tokenizer():
    """T5's: <pad> </s> <unk>, "$A </s>", and 100 sentinels added last, <extra_id_99> first: so
    <extra_id_0> is the vocabulary's last id, as in T5's file."""
    sentinels = {f"<extra_id_{i}>": {} for i in reversed(range(100))}
    return tt.unigram(["<pad>", "</s>", "<unk>"], normalizers.NFKC(),
                      pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                               pre_tokenizers.Metaspace()]),
                      processors.TemplateProcessing(single="$A </s>",
                                                    special_tokens=[("</s>", 1)]), **sentinels)


def albert_tokenizer():
    """ALBERT's: <pad> <unk> [CLS] [SEP], [MASK] added (lstrip), "[CLS] $A [SEP]"."""
    norm = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(),
                                 normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    post = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                         special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tt.unigram(["<pad>", "<unk>", "[CLS]", "[SEP]"], norm, pre, post,
                      **{"[MASK]": dict(lstrip=True, normalized=False)})


def bart_tokenizer():
    """BART's: a byte-level BPE with <s> <pad> </s> <unk> first, <mask> last, "<s> $A </s>"."""
    from tokenizers import Tokenizer, decoders, models, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=tt.VOCAB_SIZE, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return tok


TOKENIZERS = {"gpt2": lambda: byte_level("gpt2"), "llama3": lambda: byte_level("llama3"),
              "bert": tt.bert, "albert": albert_tokenizer, "deberta": lambda: tt.deberta_v3(),
              "t5": t5_tokenizer, "bart": bart_tokenizer}
OWN = {"bert": "mlm", "albert": "mlm", "deberta-v2": "mlm", "t5": "span", "bart": "seq2seq"}


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
def pairs(tmp_path_factory):
    """source<TAB>target lines: each corpus line's first words, then the next ones."""
    lines = [" ".join(line.split()) for line in corpus()]
    path = tmp_path_factory.mktemp("pairs") / "pairs.tsv"
    path.write_text("".join(f"{line[:40]}\t{line[40:90]}\n" for line in lines if len(line) > 50))
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, qwen3_next):  # noqa: F811  (the imported fixture)
    """family -> (HF model, its directory: save_pretrained and, by style, a tokenizer.json; the
    families with their own special tokens get a vocabulary of the tokenizer's size)."""
    tokenizers, done = {}, {}

    def get(family):
        if family not in done:
            style = FAMILIES[family][2]
            tok = tokenizers.setdefault(style, TOKENIZERS[style]()) if style else None
            size = tok.get_vocab_size(with_added_tokens=True) if family in OWN else V
            hf, path = build_hf(family, qwen3_next, size), tmp_path_factory.mktemp(family)
            hf.save_pretrained(path)
            if tok:
                tok.save(str(path / "tokenizer.json"))
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
def finetuned(tmp_path_factory, hf_dirs, text, pairs):
    """family -> (HF model, train.py's result and metrics, out_dir): two steps from the HF
    directory, exported with --export=hf."""
    done = {}

    def get(family):
        if family not in done:
            hf, path = hf_dirs(family)
            out = tmp_path_factory.mktemp(f"{family}_run")
            tok = [] if FAMILIES[family][2] else ["--tokenizer=byte"]
            data = pairs if OWN.get(family) == "seq2seq" else text
            done[family] = (hf, *run(out, data, f"--init_from={path}", "--export=hf", *tok), out)
        return done[family]
    return get


def eval_batches(out, model, split):
    """The batches train.py's evaluation draws from a split (its batch maker, generator seed and
    count, the special tokens its checkpoint was trained with), from the data it prepared into
    out_dir (seq2seq: the pairs of its TSV file)."""
    ckpt = load_checkpoint(Path(out) / "ckpt.pt")
    tok = get_tokenizer(ckpt["tokenizer"])
    if ckpt["objective"] == "seq2seq":
        lines = load_pairs(ckpt["train_config"]["data"], tok)
        n_val = int(len(lines) * VAL_FRACTION)
        data = lines[:-n_val] if split == "train" else lines[-n_val:]
    else:
        data_dir = next((Path(out) / "data").glob("*/meta.json")).parent
        meta = json.loads((data_dir / "meta.json").read_text())
        data = load_tokens(data_dir / f"{split}.bin", meta["dtype"])
    sp, gen = checkpoint_specials(tok, ckpt), torch.Generator().manual_seed(SEED + 1)
    return [OBJECTIVES[ckpt["objective"]](data, B, gen, model.config, sp, ckpt["pair_task"])
            for _ in range(EVAL_ITERS)]


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


def hf_own_loss(hf, batch):
    """HF's own loss given labels (-100 where ours has -1): its MLM loss (+ NSP/SOP on the
    cls_targets), its seq2seq loss with the decoder inputs it shifts from the labels itself."""
    kw = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    if getattr(hf.config, "type_vocab_size", 0):
        kw["token_type_ids"] = batch["token_type_ids"]
    if "cls_targets" in batch:
        pair_label = {"bert": "next_sentence_label", "albert": "sentence_order_label"}
        kw[pair_label[hf.config.model_type]] = batch["cls_targets"]
    with torch.no_grad():
        return hf(**kw, labels=batch["targets"].masked_fill(batch["targets"] < 0, -100)).loss.item()


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
    loss = hf_own_loss if family in OWN else hf_loss
    for split in ("train", "val"):   # exactly the pretrained model: HF's loss on those batches
        want = sum(loss(hf, b) for b in eval_batches(out, model, split)) / EVAL_ITERS
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
    keep = kw["attention_mask"].bool() if "decoder_input_ids" not in kw and "attention_mask" in kw \
        else torch.ones(logits.shape[:2], dtype=torch.bool)      # (decoder rows: all computed)
    assert (logits - want.logits)[keep].abs().max().item() <= TOL


@pytest.mark.parametrize("family", OWN)
def test_finetune_frames_with_the_tokenizers_own_special_tokens(finetuned, hf_dirs, family):
    """The objective (mlm, span, seq2seq) used the tokenizer.json's own tokens, by name: the
    vocabulary did not grow, the batches hold the file's [MASK] / <extra_id_0> / </s> ids, the
    decoder starts as the family's config says (T5: <pad>, BART: </s>), the export's config.json
    names the same ids, and generate.py frames a text with them as the `tokenizers` library's
    post-processor does."""
    hf, result, _, out = finetuned(family)
    lib = tt.Tokenizer.from_file(str(hf_dirs(family)[1] / "tokenizer.json"))
    ids = lib.get_vocab(with_added_tokens=True)
    model, ckpt = result["model"], load_checkpoint(out / "ckpt.pt")
    assert ckpt["objective"] == OWN[family] and ckpt["specials"] == "own"
    assert model.config.vocab_size == hf.config.vocab_size == lib.get_vocab_size(True)
    assert model.config.decoder_start_token_id == getattr(hf.config, "decoder_start_token_id", 0)
    config = json.loads((out / "hf" / "config.json").read_text())
    pad, eos = ids.get("[PAD]", ids.get("<pad>")), ids.get("</s>", hf.config.eos_token_id)
    assert config["pad_token_id"] == pad and config["eos_token_id"] == eos   # (else the source's)
    batch = eval_batches(out, model, "val")[0]
    loaded = generate.load(generate.parse_args(["--checkpoint", str(out / "ckpt.pt")]))
    if OWN[family] == "mlm":
        mask = ids.get("[MASK]", ids.get("<mask>"))
        assert loaded.tok.mask_id == mask and (batch["input_ids"] == mask).any()
        assert (batch["input_ids"][:, 0] == ids["[CLS]"]).all()
        text = "the quick [MASK] fox"
    elif OWN[family] == "span":
        assert ids["<extra_id_0>"] == len(ids) - 1                  # T5: numbered down, by name
        assert (batch["targets"][:, 0] == ids["<extra_id_0>"]).all()
        assert (batch["input_ids"][:, -1] == ids["</s>"]).all()
        text = "the quick<extra_id_0> fox<extra_id_1>"
    else:                                                           # BART: <s> ... </s>, both
        assert (batch["input_ids"][:, 0] == ids["<s>"]).all()
        assert (batch["targets"][:, 0] == ids["<s>"]).all()
        text = "the quick brown fox"
    assert loaded.encode(text) == lib.encode(text).ids


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


def test_init_from_a_finetune_of_a_hf_directory_takes_its_tokenizer(finetuned, text, tmp_path):
    """A checkpoint trained with a HF tokenizer.json keeps the json: init_from it needs no
    --tokenizer, evaluates as the checkpoint did, and exports that tokenizer.json again."""
    _, _, metrics, out = finetuned("llama")
    best = out / "ckpt_best.pt"
    result = train.main([f"--data={text}", f"--out_dir={tmp_path}", *RUN, f"--init_from={best}",
                         "--export=hf"])
    first = json.loads((tmp_path / "metrics.jsonl").read_text().split("\n")[0])
    assert first["val_loss"] == load_checkpoint(best)["val_loss"]
    assert result["model"].config.vocab_size == load_checkpoint(best)["config"]["vocab_size"]
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == \
        (out / "hf" / "tokenizer.json").read_text()


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
    (["--init_from={mistral}"], "brings no tokenizer (a HF directory without tokenizer.json)"),
    (["--init_from={llama}", "--n_layer=3"], "n_layer=3 changes the shape of weights that "
                                             "init_from={llama} holds (there n_layer=2)"),
    (["--init_from={gpt2}", "--block_size=128"], "block_size=128 changes the shape"),
    (["--init_from={bert300}", "--tokenizer=byte"], "the tokenizer's 256 ids + 105 special tokens "
                                                    "of objective mlm do not fit the 300 "
                                                    "embeddings"),
    (["--init_from={bart}"], "the tokenizer's {bart_v} ids + 105 special tokens of objective span "
                             "do not fit the {bart_v} embeddings of init_from={bart}: it has no "
                             "<extra_id_0> token of its own, which span needs, so ours are "
                             "appended after its ids; use another objective, or pass"),
    (["--eval_only"], "eval_only=True must be false unless there are weights to evaluate"),
    (["--init_from={llama}", "--eval_only", "--export=hf"], "export='hf' must name none with "
                                                            "eval_only=true"),
    (["--position=alibi", "--export=hf"], "export=hf: no HF family expresses this config: none of "
                                          "gpt2, llama"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input_is_one_line_error(args, message, hf_dirs, small_vocab_bert, text, tmp_path):
    fill = dict(d=tmp_path, llama=hf_dirs("llama")[1], gpt2=hf_dirs("gpt2")[1],
                mistral=hf_dirs("mistral")[1], bert300=small_vocab_bert, bart=hf_dirs("bart")[1],
                bart_v=hf_dirs("bart")[0].config.vocab_size)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        train.main([f"--data={text}", f"--out_dir={out}", *RUN, *(a.format(**fill) for a in args)])
    msg = str(e.value)
    assert message.format(**fill) in msg and "\n" not in msg, msg
    if "special tokens" not in message:  # (the vocabulary is checked once the data is prepared)
        assert not out.exists()
