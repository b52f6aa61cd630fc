"""generate.py end to end through generate.main([...]): checkpoints written with save_checkpoint and a
data/prepare.py tokenizer (char, byte), HF-format directories (tiny random Llama / GPT-2 with a byte-level
BPE tokenizer.json trained here with the `tokenizers` library), and every user error as one stderr line.
"""
import json
import re
import sys

import pytest
import torch

import generate
from data.prepare import make_tokenizer
from model import Config, Transformer, save_checkpoint

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog.\nhello world, again and again!\n"
SPEED = re.compile(r"^\d+ tokens in [\d.]+ s: [\d.]+ tokens/s$")
SMALL = dict(block_size=48, n_layer=2, n_head=2, d_model=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    """The output is the target, not a continuation: the source is not echoed."""
    path, model, tok = ckpts["encdec"]
    rc, out, _ = cli(capsys, "--checkpoint", path, "--prompt", "dog", "--max_new_tokens", 9, "--temperature", 0)
    target = model.generate(torch.tensor([list(b"dog")]), 9, temperature=0)[0, 1:].tolist()
    assert rc == 0 and out == tok.decode(target) + "\n"


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
    ("enc", [], "holds an encoder_only model, which does not generate"),
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
        assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=False)
    plain = VARIED[2]
    assert ours.decode(ours.encode(plain)).removeprefix("<|begin|>") == plain      # round trip
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
