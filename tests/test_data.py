"""data/prepare.py: tokenizers (char, byte, BPE trained here and run by tiktoken, tiktoken names offline),
prepare() (dtype, split, caching, meta.json last) and one-line errors for bad data files."""
import json
import urllib.error
import urllib.request

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch

from data import prepare as P

# a few scripts, accents, emoji and a lone combining mark: BPE must round-trip all of them byte-exactly
UNICODE = "naïve café — Straße, 東京タワー, Ελληνικά, emoji 🙂👍🏽, e\u0301, tab\tand\r\nCRLF"


@pytest.fixture(scope="module")
def corpus():
    """~40 KB of repetitive English with a sprinkle of unicode: enough for a 300-token BPE."""
    g = torch.Generator().manual_seed(0)
    words = ("the king and the queen walked to the castle where a knight kept his sword and "
             "his horse while the people of the town sang songs about the river").split() + ["café", "naïve"]
    ids = torch.randint(len(words), (7000,), generator=g).tolist()
    return " ".join(words[i] for i in ids) + "\n" + UNICODE + "\n"


def write(tmp_path, text, name="text.txt"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def one_line_error(fn, *args, **kw):
    with pytest.raises(ValueError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------
# tokenizers


def test_char_tokenizer_vocab_and_round_trip():
    text = "hello, world\nhi"
    tok = P.make_tokenizer("char", text)
    assert tok.chars == "".join(sorted(set(text))) and tok.vocab_size == len(set(text)) == 11
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids[:2] == [tok.chars.index("h"), tok.chars.index("e")]
    assert P.get_tokenizer(json.loads(json.dumps(tok.meta))).encode(text) == ids   # meta survives JSON
    one_line_error(tok.encode, "hello?")        # "?" was never seen: no id for it


def test_byte_tokenizer_round_trip():
    tok = P.make_tokenizer("byte", "")
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8")) and tok.vocab_size == 256 and max(ids) > 127
    assert tok.decode(ids) == UNICODE
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a sample cut inside a character decodes, replaced


def test_bpe_trained_here_runs_on_tiktoken(tmp_path, corpus):
    src = write(tmp_path, corpus)
    meta = P.prepare(src, tmp_path / "bpe", "bpe", bpe_vocab_size=300)
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    # the file is tiktoken's own format: tiktoken's loader reads it and tiktoken encodes with it
    ranks = tiktoken.load.load_tiktoken_bpe(str(tmp_path / "bpe" / "tokenizer.tiktoken"))
    assert sorted(ranks.values()) == list(range(300)) and all(ranks[bytes([b])] == b for b in range(256))
    enc = tiktoken.Encoding("t", pat_str=P.GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={})
    for text in (corpus, UNICODE, "the castle sang 東京 🙂 unseen words: zyzzyva qwxj"):
        ids = enc.encode_ordinary(text)
        assert enc.decode(ids) == text                                          # exact round trip
        assert P.get_tokenizer(meta["tokenizer"]).encode(text) == ids            # what train.py uses
    # merges learned on the corpus compress it: well under one token per byte
    n_bytes, n_tokens = len(corpus.encode("utf-8")), len(enc.encode_ordinary(corpus))
    assert n_tokens < 0.45 * n_bytes, (n_tokens, n_bytes)
    assert enc.encode_ordinary(" the") == [ranks[b" the"]]                    # a frequent word is one token
    # and the .bin files hold exactly those tokens, 90% / 10%
    train = P.load_tokens(tmp_path / "bpe" / "train.bin", "uint16").tolist()
    val = P.load_tokens(tmp_path / "bpe" / "val.bin", "uint16").tolist()
    assert train + val == enc.encode_ordinary(corpus) and len(val) == int(0.1 * (len(train) + len(val)))


def test_bpe_vocab_size_below_bytes_is_an_error():
    assert "at least 256" in one_line_error(P.train_bpe, "abc abc", 100)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network and an empty tiktoken cache: every vocabulary download fails at once."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})       # forget encodings loaded earlier

    def no_network(path):
        raise ConnectionError(f"no network: {path}")
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)


def test_tiktoken_name_offline_is_one_line_error(tmp_path, offline):
    msg = one_line_error(P.get_tokenizer, {"kind": "tiktoken", "name": "gpt2"})
    assert "'gpt2' could not be loaded (ConnectionError)" in msg and "run once online" in msg
    assert "--tokenizer=char, byte or bpe" in msg
    msg = one_line_error(P.prepare, write(tmp_path, "some text " * 10), tmp_path / "out", "cl100k_base")
    assert "'cl100k_base' could not be loaded" in msg
    assert not (tmp_path / "out" / "meta.json").exists()


def test_shakespeare_offline_is_one_line_error(tmp_path, monkeypatch):
    def no_network(url, timeout):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    msg = one_line_error(P.prepare, "shakespeare", tmp_path / "out")
    assert f"could not download tiny-shakespeare from {P.SHAKESPEARE_URL}" in msg and "--data=input.txt" in msg


def test_unknown_tokenizer_name_suggests():
    msg = one_line_error(P.make_tokenizer, "gtp2", "text")
    assert "tokenizer='gtp2' is not char, byte, bpe or a tiktoken encoding" in msg and "did you mean 'gpt2'" in msg


# ----------------------------------------------------------------------------------------------
# prepare()


@pytest.mark.parametrize("n_chars, dtype", [(2 ** 16, "uint16"), (2 ** 16 + 1, "uint32")])
def test_prepare_token_dtype_and_split(tmp_path, n_chars, dtype):
    """uint16 holds ids up to 65535, so a vocabulary of exactly 65536 still fits; one more needs uint32."""
    chars = [chr(c) for c in range(0x20, 0x11000) if not 0xD800 <= c < 0xE000][:n_chars]   # no surrogates
    text = "".join(chars)
    meta = P.prepare(write(tmp_path, text), tmp_path / "out")
    assert meta["vocab_size"] == n_chars and meta["dtype"] == dtype
    ids = P.make_tokenizer("char", text).encode(text)
    train = P.load_tokens(tmp_path / "out" / "train.bin", dtype)
    val = P.load_tokens(tmp_path / "out" / "val.bin", dtype)
    assert train.dtype == getattr(torch, dtype) and (tmp_path / "out" / "train.bin").stat().st_size == \
        len(train) * train.element_size()
    n_val = int(0.1 * len(ids))
    assert val.tolist() == ids[-n_val:] and train.tolist() == ids[:-n_val]           # no id wrapped around
    assert (meta["train_tokens"], meta["val_tokens"], meta["chars"]) == (len(ids) - n_val, n_val, len(text))


def test_prepare_is_cached_and_redone_when_the_input_changes(tmp_path, monkeypatch):
    src = write(tmp_path, "abcdefghij" * 10)
    out = tmp_path / "out"
    meta = P.prepare(src, out)
    stamp = {f: (out / f).stat().st_mtime_ns for f in ("train.bin", "val.bin", "meta.json")}
    tokenize = P.make_tokenizer

    def must_not_tokenize(*a, **kw):
        raise AssertionError("prepare() re-tokenised a prepared directory")
    monkeypatch.setattr(P, "make_tokenizer", must_not_tokenize)
    assert P.prepare(src, out) == meta
    assert {f: (out / f).stat().st_mtime_ns for f in stamp} == stamp
    monkeypatch.setattr(P, "make_tokenizer", tokenize)
    assert P.prepare(src, out, "byte")["tokenizer"] == {"kind": "byte"}             # another tokenizer: redone
    src.write_text("zyxwvutsrq" * 10)                                               # new content: redone
    assert P.prepare(src, out, "byte")["val_tokens"] == 10
    assert P.load_tokens(out / "val.bin", "uint16").tolist() == list(b"zyxwvutsrq")


def test_prepare_writes_meta_json_last(tmp_path, monkeypatch):
    """A crash while writing the .bin files leaves no meta.json (not even the previous one), so
    neither train.py nor the cache check trusts a half-written directory."""
    src, out = write(tmp_path, "abcdefghij" * 10), tmp_path / "out"
    P.prepare(src, out)
    write_tokens = P.write_tokens

    def crash_on_val(path, ids, dtype):
        if path.name == "val.bin":
            raise KeyboardInterrupt
        write_tokens(path, ids, dtype)
    monkeypatch.setattr(P, "write_tokens", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(src, out, "byte")
    assert not (out / "meta.json").exists() and (out / "train.bin").exists()
    monkeypatch.setattr(P, "write_tokens", write_tokens)
    assert P.prepare(src, out, "byte")["tokenizer"]["kind"] == "byte" and (out / "meta.json").exists()
    assert not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------------------------
# bad data: one line naming the problem and the fix


def test_bad_data_files_are_one_line_errors(tmp_path):
    out = tmp_path / "out"
    msg = one_line_error(P.prepare, tmp_path / "missing.txt", out)
    assert "missing.txt' does not exist" in msg and "pass a UTF-8 text file" in msg
    msg = one_line_error(P.prepare, tmp_path, out)
    assert "is a directory without train.bin/val.bin/meta.json" in msg
    for text in ("", " \n\t\n"):
        msg = one_line_error(P.prepare, write(tmp_path, text, "empty.txt"), out)
        assert "empty.txt' is empty; pass a file with some text in it" in msg
    msg = one_line_error(P.prepare, write(tmp_path, "short text", "short.txt"), out)
    assert "gives only 10 tokens" in msg and "needs at least 20 (pass a longer text)" in msg
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait, crème brûlée".encode("latin-1"))
    msg = one_line_error(P.prepare, latin1, out)
    assert "is not UTF-8 text (byte 0xe9 at offset 3)" in msg and "iconv -f latin1 -t utf-8" in msg
    assert not out.exists() or not (out / "meta.json").exists()
