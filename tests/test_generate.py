"""generate.py end to end through generate.main([...]): checkpoints written with save_checkpoint and a
data/prepare.py tokenizer (char, byte), with objectives' special tokens (span: --source, mlm: --fill_mask),
HF-format directories (tiny random Llama / GPT-2 / BART with a byte-level BPE tokenizer.json, BERT with a
WordPiece one, each trained here with the `tokenizers` library), and every user error as one stderr line.
"""
import json
import re
import sys

import pytest
import torch

import generate
from data.objectives import ARCHITECTURE, OBJECTIVES, config_overrides, decode, encode, fill_mask_ids, fill_masks, \
    special_ids
from data.prepare import make_tokenizer
from model import Config, Transformer, save_checkpoint

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog.\nhello world, again and again!\n"
SPEED = re.compile(r"^\d+ tokens in [\d.]+ s: [\d.]+ tokens/s$")
SMALL = dict(block_size=48, n_layer=2, n_head=2, d_model=32)


def checkpoint(path, tokenizer, steps=0, **kw):
    """A tiny model saved as train.py saves it: weights, config and the tokenizer's meta. A few
    training steps on TEXT make its greedy text varied (an untrained model repeats one token)."""
    torch.manual_seed(0)
    tok = make_tokenizer(tokenizer, TEXT)
    model = Transformer(Config(**{**SMALL, "vocab_size": tok.vocab_size, **kw}))
    data, opt = torch.tensor(tok.encode(TEXT * 4)), torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        i = torch.randint(0, len(data) - 33, (8, 1)) + torch.arange(33)                  # (8, 33) windows
        loss = model(data[i[:, :-1]], targets=data[i[:, 1:]]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(path, model.eval(), tokenizer=tok.meta)
    return model, tok


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {"char": (d / "char.pt", *checkpoint(d / "char.pt", "char", steps=150)),          # learned positions
            "byte": (d / "byte.pt", *checkpoint(d / "byte.pt", "byte", steps=150, position="rope", norm="rmsnorm")),
            "enc": (d / "enc.pt", *checkpoint(d / "enc.pt", "byte", architecture="encoder_only")),
            "encdec": (d / "encdec.pt", *checkpoint(d / "encdec.pt", "byte", architecture="encoder_decoder",
                                                     decoder_start_token_id=10))}


def cli(capsys, *argv):
    """-> (exit status, stdout, stderr) of one generate.py run."""
    rc = generate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def greedy(model, ids, n):
    return model.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()


def test_greedy_text_equals_model_generate(ckpts, capsys):
    path, model, tok = ckpts["char"]
    rc, out, err = cli(capsys, "--checkpoint", path, "--prompt", "hello", "--max_new_tokens", 20, "--temperature", 0)
    assert rc == 0
    assert out == "hello" + tok.decode(greedy(model, tok.encode("hello"), 20)) + "\n"
    assert len(set(out)) > 6, "a continuation that repeats one character is a weak check"
    assert SPEED.match(err.strip()) and err.startswith("20 tokens in ")


def test_text_streams_token_by_token(ckpts, monkeypatch):
    """Each token is written (and flushed) as it is sampled: the prompt, then one piece per token."""
    path, model, tok = ckpts["char"]
    writes = []
    monkeypatch.setattr(sys, "stdout", type("Out", (), {"write": lambda self, s: writes.append(s),
                                                        "flush": lambda self: writes.append(None)})())
    assert generate.main(["--checkpoint", str(path), "--prompt", "the", "--max_new_tokens", "8",
                          "--temperature", "0"]) == 0
    expected = ["the", *tok.decode(greedy(model, tok.encode("the"), 8)), "\n"]
    assert writes == [w for s in expected for w in (s, None)]


def test_byte_tokenizer_and_ids(ckpts, capsys):
    path, model, tok = ckpts["byte"]
    prompt = "héllo"                                                 # a two-byte character
    rc, out, _ = cli(capsys, "--checkpoint", path, "--prompt", prompt, "--max_new_tokens", 12, "--temperature", 0)
    assert rc == 0 and out == prompt + tok.decode(greedy(model, list(prompt.encode()), 12)) + "\n"
    rc, out2, _ = cli(capsys, "--checkpoint", path, "--ids", ",".join(map(str, prompt.encode())),
                      "--max_new_tokens", 12, "--temperature", 0)
    assert rc == 0 and out2 == out


def test_prompt_file(ckpts, capsys, tmp_path):
    path, _, _ = ckpts["char"]
    (tmp_path / "p.txt").write_text("the lazy\ndog")
    args = ("--checkpoint", path, "--max_new_tokens", 10, "--temperature", 0.7, "--seed", 3)
    rc, out, _ = cli(capsys, *args, "--prompt_file", tmp_path / "p.txt")
    assert rc == 0 and out.startswith("the lazy\ndog")
    assert cli(capsys, *args, "--prompt", "the lazy\ndog")[1] == out


def test_seed_reproduces_and_num_samples(ckpts, capsys):
    path, _, _ = ckpts["char"]
    args = ("--checkpoint", path, "--prompt", "the", "--max_new_tokens", 30, "--temperature", 1.0)
    a, b, c = (cli(capsys, *args, "--seed", s)[1] for s in (1, 1, 2))
    assert a == b and a != c
    rc, out, err = cli(capsys, *args, "--seed", 1, "--num_samples", 3)
    samples = out.split(generate.SEPARATOR + "\n")
    assert rc == 0 and len(samples) == 3 and samples[0] == a     # the first sample is the one-sample run
    assert len(set(samples)) == 3                                 # the generator moves on between samples
    assert all(s.startswith("the") and len(s) == 3 + 30 + 1 for s in samples)
    assert len(err.splitlines()) == 3 and all(SPEED.match(line) for line in err.splitlines())


def test_default_length_fits_a_learned_position_table(ckpts, capsys):
    """No --max_new_tokens: 256, or up to the end of the context where that comes first (block_size 48)."""
    path, _, _ = ckpts["char"]
    rc, out, err = cli(capsys, "--checkpoint", path, "--prompt", "hello")
    assert rc == 0 and len(out) == 48 + 1 and err.startswith("43 tokens in ")


def test_encoder_decoder_checkpoint(ckpts, capsys):
    """The output is the target, not a continuation: the source is not echoed. A checkpoint without an
    objective (lm) has no special tokens: the source is its text's ids alone."""
    path, model, tok = ckpts["encdec"]
    rc, out, _ = cli(capsys, "--checkpoint", path, "--source", "dog", "--max_new_tokens", 9, "--temperature", 0)
    target = model.generate(torch.tensor([list(b"dog")]), 9, temperature=0)[0, 1:].tolist()
    assert rc == 0 and out == tok.decode(target) + "\n"


# ----------------------------------------------------------------------------------------------
# Checkpoints trained with data/objectives.py: special tokens by name, [EOS] ends a target


def objective_checkpoint(path, objective, steps, lr=1e-2, **kw):
    """A tiny model of the objective's architecture, its vocabulary sized by config_overrides, trained a few
    steps on TEXT with the objective's own batches and saved with the keys train.py writes."""
    torch.manual_seed(0)
    tok = make_tokenizer("char", TEXT)
    cfg = Config(**{**SMALL, "architecture": ARCHITECTURE[objective], **config_overrides(objective, tok.vocab_size),
                    **kw})
    model, gen = Transformer(cfg), torch.Generator().manual_seed(0)
    data, opt = torch.tensor(tok.encode(TEXT * 4)), torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(**OBJECTIVES[objective](data, 8, gen, cfg, tok.vocab_size, "none")).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(path, model.eval(), tokenizer=tok.meta, objective=objective, pair_task="none")
    return path, model, tok


@pytest.fixture(scope="module")
def objective_ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("objective")
    return {"span": objective_checkpoint(d / "span.pt", "span", steps=60, position="rope"),
            "mlm": objective_checkpoint(d / "mlm.pt", "mlm", steps=300, lr=1e-3, position="rope")}


SOURCE = "the quick brown<extra_id_0> jumps over<extra_id_1>dog.\nhello"


def test_span_source_streams_the_target_up_to_eos(objective_ckpts, capsys):
    """The source is encoded as span_batch frames it (text, sentinels by name, [EOS]); the target streams as
    objectives.decode writes it, sentinels by name, and stops at [EOS]."""
    path, model, tok = objective_ckpts["span"]
    sp = special_ids(tok.vocab_size)
    rc, out, err = cli(capsys, "--checkpoint", path, "--source", SOURCE, "--max_new_tokens", 40, "--temperature", 0)
    src = encode(tok, SOURCE, tok.vocab_size) + [sp["[EOS]"]]
    assert sp["<extra_id_1>"] in src
    target = model.generate(torch.tensor([src]), 40, temperature=0, stop_tokens=(sp["[EOS]"],))[0, 1:].tolist()
    n = target.index(sp["[EOS]"])                            # the trained model ends its target
    assert rc == 0 and out == decode(tok, target[:n], tok.vocab_size) + "\n"
    assert out.startswith("<extra_id_0>") and len(out) > 6 and err.startswith(f"{n + 1} tokens in ")


def test_span_source_samples_and_reads_files(objective_ckpts, capsys, tmp_path):
    """The sampling flags reach the decoder: the text is that of model.generate with the same seed."""
    path, model, tok = objective_ckpts["span"]
    (tmp_path / "src.txt").write_text(SOURCE)
    rc, out, _ = cli(capsys, "--checkpoint", path, "--source_file", tmp_path / "src.txt", "--max_new_tokens", 30,
                     "--temperature", 1.5, "--top_k", 20, "--seed", 5)
    eos = special_ids(tok.vocab_size)["[EOS]"]
    gen = torch.Generator().manual_seed(5)
    src = torch.tensor([encode(tok, SOURCE, tok.vocab_size) + [eos]])
    target = model.generate(src, 30, temperature=1.5, top_k=20, stop_tokens=(eos,), generator=gen)[0, 1:].tolist()
    assert rc == 0 and out == decode(tok, [t for t in target if t != eos], tok.vocab_size) + "\n"
    assert out != cli(capsys, "--checkpoint", path, "--source", SOURCE, "--max_new_tokens", 30, "--temperature", 0)[1]


def expected_fill(probs, ids, mask_id, k, show):
    """The lines --fill_mask prints, from the probabilities (T, V) over the ids allowed in a mask."""
    where = [i for i, t in enumerate(ids) if t == mask_id]
    top = probs[where].topk(k)
    lines = [f"[MASK] {m}: " + ", ".join(f"{show(t)} {q:.4f}" for t, q in zip(i, p))
             for m, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1)]
    filled = list(ids)
    for i, t in zip(where, top.indices[:, 0].tolist()):
        filled[i] = t
    return lines, filled


def test_mlm_fill_mask_equals_model_logits(objective_ckpts, capsys):
    """[CLS] text [SEP] as mlm_batch frames a row; each mask's top-k text tokens (never a special one) with
    probabilities from the model's logits; the argmax-filled text equals objectives.fill_masks."""
    path, model, tok = objective_ckpts["mlm"]
    base, text = tok.vocab_size, "the quick [MASK]rown fox jumps [MASK]ver the lazy dog."
    rc, out, err = cli(capsys, "--checkpoint", path, "--fill_mask", text, "--top_k", 3)
    ids = fill_mask_ids(tok, text, base)
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0].softmax(-1)[:, :base]       # (T, base)
    lines, filled = expected_fill(probs, ids, special_ids(base)["[MASK]"], 3, lambda i: repr(tok.decode([i])))
    assert torch.equal(torch.tensor([filled]), fill_masks(model, torch.tensor([ids]), base))
    assert rc == 0 and err == "" and out == "\n".join(lines) + "\n" + decode(tok, filled[1:-1], base) + "\n"
    assert probs[ids.index(special_ids(base)["[MASK]"])].max() > 5 / base, "flat probabilities make a weak check"
    rc, out_ids, _ = cli(capsys, "--checkpoint", path, "--ids", ",".join(map(str, ids)), "--top_k", 3)
    assert rc == 0 and out_ids == out                   # the same ids given directly


@pytest.mark.parametrize("ckpt, extra, message", [
    ("mlm", ["--fill_mask", "no mask here"], "has no [MASK]; write [MASK] where"),
    ("mlm", ["--fill_mask", "the [MASK]", "--top_k", "0"], "--fill_mask shows at least one candidate"),
    ("mlm", ["--ids", "1,2,3"], "the input has no [MASK]"),
    ("mlm", ["--source", "x"], "--source is for encoder_decoder models, but"),
    ("span", ["--prompt", "x"], "is encoder_decoder: give its input with --source TEXT"),
    ("span", ["--source", "the Dog"], "character 'D' (U+0044) is not in this char vocabulary"),
])
def test_objective_errors(objective_ckpts, capsys, ckpt, extra, message):
    rc, out, err = cli(capsys, "--checkpoint", objective_ckpts[ckpt][0], *extra)
    assert rc == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


# ----------------------------------------------------------------------------------------------
# Errors: one line on stderr starting "error:", exit status 2, nothing on stdout

def write_bad(tmp_path, ckpts, kind):
    raw = ckpts["byte"][0].read_bytes()
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    if kind == "corrupt":
        path.write_bytes(raw[:2000] + bytes(b ^ 0xFF for b in raw[2000:2400]) + raw[2400:])
    if kind == "not_ours":
        torch.save({"weights": torch.zeros(3)}, path)
    return path


@pytest.mark.parametrize("ckpt, extra, message", [
    ("char", ["--temperature", "-0.5"], "temperature=-0.5 must be >= 0"),
    ("char", ["--top_p", "0"], "top_p=0.0 must be in (0, 1]"),
    ("char", ["--top_p", "1.5"], "top_p=1.5 must be in (0, 1]"),
    ("char", ["--top_k", "-3"], "top_k=-3 must be >= 0"),
    ("char", ["--max_new_tokens", "0"], "--max_new_tokens=0 must be at least 1"),
    ("char", ["--prompt", "hello " * 9], "prompt of 54 tokens"),               # learned positions: 48 rows
    ("char", ["--prompt", "hello", "--max_new_tokens", "50"], "exceeds the context of 48 tokens"),
    ("char", ["--prompt", "Hello"], "character 'H' (U+0048) is not in this char vocabulary"),
    ("char", ["--ids", "1,x"], "must be comma-separated integers"),
    ("char", ["--ids", "1,999"], "999, outside the model's vocabulary"),
    ("char", ["--device", "cuda"], "--device cuda was asked for, but this torch"),
    ("char", ["--prompt_file", "/no/such/file"], "cannot read --prompt_file"),
    ("char", ["--bogus"], "unrecognized arguments: --bogus"),
    ("enc", [], "enc.pt is encoder_only: give its input with --fill_mask"),
    ("enc", ["--fill_mask", "a [MASK]"], "has no [MASK] token to fill"),
    ("enc", ["--prompt", "a"], "--prompt is for decoder_only models, but"),
    ("encdec", [], "encdec.pt is encoder_decoder: give its input with --source TEXT"),
    ("encdec", ["--prompt", "dog"], "is encoder_decoder: give its input with --source TEXT (or --source_file)"),
    ("encdec", ["--fill_mask", "a [MASK]"], "--fill_mask is for encoder_only models, but"),
    ("char", ["--source", "the dog"], "--source is for encoder_decoder models, but"),
    ("char", ["--fill_mask", "the [MASK]"], "--fill_mask is for encoder_only models, but"),
    ("char", ["--ids", ""], "--ids is empty"),
    ("char", ["--source_file", "/no/such/file", "--prompt", "x"], "not allowed with argument"),
    ("missing", [], "does not exist"),
    ("truncated", [], "is truncated or corrupt"),
    ("corrupt", [], "is truncated or corrupt"),
    ("not_ours", [], "is not an anyformer checkpoint"),
])
def test_errors_are_one_line(ckpts, capsys, tmp_path, monkeypatch, ckpt, extra, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same answer on a GPU machine
    path = ckpts[ckpt][0] if ckpt in ckpts else write_bad(tmp_path, ckpts, ckpt)
    rc, out, err = cli(capsys, "--checkpoint", path, "--max_new_tokens", 5, *extra)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


# ----------------------------------------------------------------------------------------------
# HF directories: our tiktoken-based ByteLevelBPE against the `tokenizers` library

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
VARIED = ["Hello, world!", "  leading spaces and    runs\t\ttabs\n\n\nnewlines  ", "naïve café — 東京 Привет 😀🎉",
          "digits 1234567890 3.14159 2024-01-01 42", "it's we'll they're I'M DON'T",
          "def f(x):\n    return x ** 2  # sq\n",
          "<|endoftext|> an added token inside text", "mixed😀text with🇫🇷flags and ½ ² Ⅻ", " " * 7 + "x",
          "\u00a0non-breaking\u2003em space", "ﬁ ligature", "e\u0301 (combining) and é"]


def corpus():
    """A few KB of varied text: words, numbers, code, accents, CJK, Cyrillic, emoji."""
    g = torch.Generator().manual_seed(0)
    words = ["the", "quick", "brown", "fox", "über", "café", "東京", "данные", "😀", "x", "return", "def", "=", "(",
             ")", ":", "\n", "    ", "123", "4567", "3.14", "'s", "'ll", "!", "?", "—", "  ", "\t"]
    draws = torch.randint(0, len(words), (30, 200), generator=g).tolist()
    return ["".join(words[i] + (" " if i % 3 else "") for i in row) for row in draws] + VARIED


def train_tokenizer(style):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style == "gpt2")
    if style == "gpt2":       # GPT-2: the ByteLevel pre-tokenizer applies GPT-2's regex itself
        tok.pre_tokenizer = byte_level
    else:                     # Llama 3: an explicit Split regex, NFC, and a BOS added by the post-processor
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level])
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>", "<|begin|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if style == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A",
                                                           special_tokens=[("<|begin|>", tok.token_to_id("<|begin|>"))])
    return tok


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (directory, HF model, HF tokenizer)."""
    out = {}
    for name, style, cls, kw in [
        ("llama", "llama3", "LlamaForCausalLM", dict(model_type="llama", hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                      max_position_embeddings=128)),
        ("gpt2", "gpt2", "GPT2LMHeadModel", dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128)),
    ]:
        tok = train_tokenizer(style)
        torch.manual_seed(0)
        cfg = transformers.AutoConfig.for_model(**kw, vocab_size=tok.get_vocab_size(),
                                                 bos_token_id=tok.token_to_id("<|begin|>"),
                                                 eos_token_id=tok.token_to_id("<|endoftext|>"), initializer_range=0.3)
        model = getattr(transformers, cls)(cfg).eval()
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        tok.save(str(d / "tokenizer.json"))
        out[name] = (d, model, tok)
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_byte_level_bpe_matches_hf_tokenizer(hf_dirs, name):
    d, _, hf_tok = hf_dirs[name]
    ours = generate.hf_tokenizer(d)
    assert ours.vocab_size == hf_tok.get_vocab_size()
    for text in VARIED:
        ids = hf_tok.encode(text).ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)   # as HF's pipelines print
    plain = VARIED[2]
    assert ours.decode(ours.encode(plain)) == plain                                 # round trip
    assert len(ours.encode(plain)) < len(plain.encode()) - 5                          # merges were applied


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hf_directory_greedy_equals_hf_generate(hf_dirs, capsys, name):
    """The CLI's text equals the HF tokenizer's decoding of HF's own greedy generate."""
    d, model, hf_tok = hf_dirs[name]
    prompt = "the quick café 123"
    rc, out, err = cli(capsys, "--hf", d, "--prompt", prompt, "--max_new_tokens", 15, "--temperature", 0)
    x = torch.tensor([hf_tok.encode(prompt).ids])
    with torch.no_grad():
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=15, do_sample=False)
    assert rc == 0 and SPEED.match(err.strip())
    assert out == prompt + hf_tok.decode(ref[0, x.shape[1]:].tolist(), skip_special_tokens=True) + "\n"


def test_hf_directory_without_tokenizer_asks_for_ids(hf_dirs, capsys, tmp_path):
    d, _, _ = hf_dirs["llama"]
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    rc, out, err = cli(capsys, "--hf", tmp_path, "--prompt", "hello")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: ") and "has no tokenizer.json; give the prompt as token ids with --ids" in err
    rc, out, _ = cli(capsys, "--hf", tmp_path, "--ids", "5,6,7", "--max_new_tokens", 4, "--temperature", 0)
    ours = Transformer.from_pretrained(tmp_path)
    stop = json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"]
    new = [t for t in greedy(ours, [5, 6, 7], 4) if t != stop]
    assert rc == 0 and out == "5,6,7" + "".join(f",{t}" for t in new) + "\n"


# ----------------------------------------------------------------------------------------------
# HF encoder-decoders: --source through BART's tokenizer.json; SentencePiece ones ask for --ids


def bart_tokenizer(d):
    """BART's tokenizer.json as HF writes it (RobertaProcessing: <s> text </s>; <mask> takes the space before
    it along), over a BPE trained here whose ids are shuffled, as fairseq's frequency order leaves BART's:
    the ids do not follow the merges, so ranking by id would merge in the wrong order."""
    tj = json.loads(train_tokenizer("gpt2").to_str())
    rest = [t for t in tj["model"]["vocab"] if t not in ("<|endoftext|>", "<|begin|>")]
    rest = [rest[i] for i in torch.randperm(len(rest), generator=torch.Generator().manual_seed(0))]
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *rest, "<mask>"])}
    tok = transformers.BartTokenizer(vocab=vocab, merges=[tuple(m) for m in tj["model"]["merges"]],
                                     mask_token=tokenizers.AddedToken("<mask>", lstrip=True, special=True))
    tok.save_pretrained(d)
    return tok


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    """-> (directory, HF model, HF tokenizer): a tiny random BART, weights large enough for varied output."""
    d = tmp_path_factory.mktemp("bart")
    tok = bart_tokenizer(d)
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, init_std=0.3)
    model = transformers.BartForConditionalGeneration(cfg).eval()
    model.save_pretrained(d)
    return d, model, tok


def test_bart_tokenizer_matches_hf(bart_dir):
    d, _, hf_tok = bart_dir
    ours = generate.hf_tokenizer(d)
    texts = VARIED + corpus() + ["UN Chief Says There Is No <mask> in Syria", "a  <mask>b<mask>", "<s>x</s> y"]
    for text in texts:
        ids = hf_tok(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert ours.encode("a <mask>")[-2] == hf_tok.mask_token_id and ours.encode("x")[::2] == [0, 2]   # <s> x </s>


def test_bart_source_greedy_equals_hf_generate(bart_dir, capsys):
    """The target streamed for --source equals the HF tokenizer's decoding of HF's own greedy generate
    (no forced BOS/EOS: generate.py stops at eos_token_id only)."""
    d, model, hf_tok = bart_dir
    source = "the quick café 123, über fox"
    rc, out, err = cli(capsys, "--hf", d, "--source", source, "--max_new_tokens", 15, "--temperature", 0,
                       "--repetition_penalty", 1.3)
    x = torch.tensor([hf_tok(source).input_ids])
    with torch.no_grad():
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=15, do_sample=False,
                             repetition_penalty=1.3, forced_bos_token_id=None, forced_eos_token_id=None)
    assert len(set(ref[0].tolist())) > 8, "a target repeating one token is a weak check"
    assert rc == 0 and SPEED.match(err.strip())
    assert out == hf_tok.decode(ref[0, 1:].tolist(), skip_special_tokens=True) + "\n"


def test_sentencepiece_encoder_decoder_asks_for_source_ids(bart_dir, capsys, tmp_path):
    """A Unigram tokenizer.json (T5's kind) is not run: the error asks for the source as ids, which then work."""
    d, _, _ = bart_dir
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    unigram = tokenizers.Tokenizer(tokenizers.models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0))
    unigram.save(str(tmp_path / "tokenizer.json"))
    rc, out, err = cli(capsys, "--hf", tmp_path, "--source", "hello")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "is a Unigram tokenizer" in err and "give the source as token ids with --ids 1,2,3, ending in the EOS" in err
    rc, out, _ = cli(capsys, "--hf", tmp_path, "--ids", "0,7,8,9,2", "--max_new_tokens", 6, "--temperature", 0)
    ours = Transformer.from_pretrained(tmp_path)
    target = ours.generate(torch.tensor([[0, 7, 8, 9, 2]]), 6, temperature=0, stop_tokens=(2,))[0, 1:].tolist()
    assert rc == 0 and out == ",".join(str(t) for t in target if t != 2) + "\n"


# ----------------------------------------------------------------------------------------------
# HF encoders: --fill_mask through BERT's WordPiece tokenizer.json

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDPIECE_TEXTS = VARIED + [
    "The [MASK] sat on the mat.", "x[MASK]y [MASK][MASK] [mask]", "ΟΔΟΣ Straße ÀÉÎÕÜ naïve İstanbul",
    "a\x0bb\x85c\x00d\ufffde\u200bf\x7fg", "supercalifragilisticexpialidociousfox x",
    "中文字符 and 日本語 東京",
    "don't do not I'm you're they've it's", "€100 $5 ^_^ ~tilde~ «quotes» ¿qué? 1,000.5"]


def train_wordpiece():
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=30))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus() + [TEXT], trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                                         show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


@pytest.mark.parametrize("normalizer", [{}, dict(lowercase=False), dict(strip_accents=True),
                                        dict(strip_accents=False), dict(handle_chinese_chars=False),
                                        dict(clean_text=False)])
def test_wordpiece_matches_hf_tokenizer(normalizer):
    """Ids and decoded text equal the `tokenizers` library's on accents, punctuation, CJK, control characters,
    unknown characters and over-long words, under each BertNormalizer setting."""
    tj = json.loads(train_wordpiece().to_str())
    tj["normalizer"].update(normalizer)
    ref, ours = tokenizers.Tokenizer.from_str(json.dumps(tj)), generate.WordPiece(tj)
    seen = []
    for text in WORDPIECE_TEXTS:
        ids = ref.encode(text).ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids), text
        seen += ids
    pieces = [ours.piece(i) for i in seen]
    assert "[UNK]" in pieces and "[MASK]" in pieces and sum(p.startswith("##") for p in pieces) > 10


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """-> (directory, HF BertForMaskedLM read from it, HF tokenizer). The file is a BertForPreTraining one
    (MLM + NSP heads, as bert-base-uncased's); weights large enough for peaked probabilities."""
    d = tmp_path_factory.mktemp("bert")
    tok = train_wordpiece()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                  initializer_range=0.3)
    transformers.BertForPreTraining(cfg).save_pretrained(d)
    tok.save(str(d / "tokenizer.json"))
    transformers.logging.set_verbosity_error()
    return d, transformers.BertForMaskedLM.from_pretrained(d).eval(), transformers.AutoTokenizer.from_pretrained(d)


def test_bert_fill_mask_equals_hf(bert_dir, capsys):
    """Ids as HF's tokenizer gives them ([CLS] text [SEP], the literal [MASK] its token); each mask's top 5
    and the filled text from HF's own masked-LM logits, the text decoded as HF's fill-mask pipeline does."""
    d, hf, hf_tok = bert_dir
    text = "The quick [MASK] fox jumps over the [MASK] dog!"
    rc, out, err = cli(capsys, "--hf", d, "--fill_mask", text)
    ids = hf_tok(text).input_ids
    assert generate.hf_tokenizer(d).encode(text) == ids and ids.count(hf_tok.mask_token_id) == 2
    with torch.no_grad():
        probs = hf(torch.tensor([ids])).logits[0].softmax(-1)                    # (T, V)
    lines, filled = expected_fill(probs, ids, hf_tok.mask_token_id, 5, lambda i: repr(hf_tok.convert_ids_to_tokens(i)))
    assert rc == 0 and err == ""
    assert out == "\n".join(lines) + "\n" + hf_tok.decode(filled, skip_special_tokens=True) + "\n"
    assert probs[ids.index(hf_tok.mask_token_id)].max() > 5 / probs.shape[-1], "flat probabilities make a weak check"


@pytest.mark.parametrize("extra, message", [
    (["--fill_mask", "no mask here"], "the input has no [MASK] (id 4)"),
    (["--source", "a [MASK]"], "--source is for encoder_decoder models, but"),
    ([], 'is encoder_only: give its input with --fill_mask "TEXT with [MASK]"'),
])
def test_bert_errors(bert_dir, capsys, extra, message):
    rc, out, err = cli(capsys, "--hf", bert_dir[0], *extra)
    assert rc == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
