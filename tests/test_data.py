"""data/prepare.py and data/tokenizers.py's own tokenizers: char, byte (any bytes), BPE trained here
and run by tiktoken, tiktoken names offline, hf:PATH; prepare() (dtype, split, enwik8's fixed
split, caching, meta.json last) and one-line errors for bad data files and bad CLI input."""
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch

from data import prepare as P

# a few scripts, accents, emoji and a lone combining mark: BPE must round-trip them byte-exactly
UNICODE = "naïve café — Straße, 東京タワー, Ελληνικά, emoji 🙂👍🏽, e\u0301, tab\tand\r\nCRLF"


@pytest.fixture(scope="module")
def corpus():
    """~40 KB of repetitive English with a sprinkle of unicode: enough for a 300-token BPE."""
    g = torch.Generator().manual_seed(0)
    words = ("the king and the queen walked to the castle where a knight kept his sword and "
             "his horse while the people of the town sang songs about the river").split()
    words += ["café", "naïve"]
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
    assert P.get_tokenizer(json.loads(json.dumps(tok.meta))).encode(text) == ids   # meta: JSON
    one_line_error(tok.encode, "hello?")        # "?" was never seen: no id for it
    assert tok.decode(ids + [11, 40]) == text   # ids of a padded embedding decode to nothing


def test_byte_tokenizer_round_trip():
    tok = P.make_tokenizer("byte", "")
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8")) and tok.vocab_size == 256 and max(ids) > 127
    assert tok.decode(ids) == UNICODE
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a sample cut inside a character: U+FFFD
    assert tok.decode(ids + [256, 300]) == UNICODE      # ids of a padded embedding: no text


def test_bpe_trained_here_runs_on_tiktoken(tmp_path, corpus):
    src = write(tmp_path, corpus)
    meta = P.prepare(src, tmp_path / "bpe", "bpe", bpe_vocab_size=300)
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    # the file is tiktoken's own format: tiktoken's loader reads it and tiktoken encodes with it
    ranks = tiktoken.load.load_tiktoken_bpe(str(tmp_path / "bpe" / "tokenizer.tiktoken"))
    assert sorted(ranks.values()) == list(range(300))
    assert all(ranks[bytes([b])] == b for b in range(256))
    enc = tiktoken.Encoding("t", pat_str=P.GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={})
    for text in (corpus, UNICODE, "the castle sang 東京 🙂 unseen words: zyzzyva qwxj"):
        ids = enc.encode_ordinary(text)
        assert enc.decode(ids) == text                                          # exact round trip
        assert P.get_tokenizer(meta["tokenizer"]).encode(text) == ids     # what train.py uses
    # merges learned on the corpus compress it: well under one token per byte
    n_bytes, n_tokens = len(corpus.encode("utf-8")), len(enc.encode_ordinary(corpus))
    assert n_tokens < 0.45 * n_bytes, (n_tokens, n_bytes)
    assert enc.encode_ordinary(" the") == [ranks[b" the"]]             # a frequent word: one token
    # and the .bin files hold exactly those tokens, 90% / 10%
    train = P.load_tokens(tmp_path / "bpe" / "train.bin", "uint16").tolist()
    val = P.load_tokens(tmp_path / "bpe" / "val.bin", "uint16").tolist()
    assert train + val == enc.encode_ordinary(corpus)
    assert len(val) == int(0.1 * (len(train) + len(val)))


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
    msg = one_line_error(P.prepare, write(tmp_path, "some text " * 10), tmp_path / "out",
                         "cl100k_base")
    assert "'cl100k_base' could not be loaded" in msg
    assert not (tmp_path / "out" / "meta.json").exists()


def test_shakespeare_offline_is_one_line_error(tmp_path, monkeypatch):
    def no_network(url, timeout):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    msg = one_line_error(P.prepare, "shakespeare", tmp_path / "out")
    assert f"could not download tiny-shakespeare from {P.SHAKESPEARE_URL}" in msg
    assert f"save input.txt as {tmp_path / 'tinyshakespeare.txt'}," in msg


def test_unknown_tokenizer_name_suggests():
    msg = one_line_error(P.make_tokenizer, "gtp2", "text")
    assert "tokenizer='gtp2' is not char, byte, bpe, hf:PATH or a tiktoken encoding" in msg
    assert "did you mean 'gpt2'" in msg


# ----------------------------------------------------------------------------------------------
# prepare()


@pytest.mark.parametrize("n_chars, dtype", [(2 ** 16, "uint16"), (2 ** 16 + 1, "uint32")])
def test_prepare_token_dtype_and_split(tmp_path, n_chars, dtype):
    """uint16 holds ids up to 65535, so a vocabulary of exactly 65536 still fits; one more needs
    uint32."""
    chars = [chr(c) for c in range(0x20, 0x11000) if not 0xD800 <= c < 0xE000][:n_chars]  # no D800
    text = "".join(chars)
    meta = P.prepare(write(tmp_path, text), tmp_path / "out")
    assert meta["vocab_size"] == n_chars and meta["dtype"] == dtype
    ids = P.make_tokenizer("char", text).encode(text)
    train = P.load_tokens(tmp_path / "out" / "train.bin", dtype)
    val = P.load_tokens(tmp_path / "out" / "val.bin", dtype)
    assert train.dtype == getattr(torch, dtype)
    assert (tmp_path / "out" / "train.bin").stat().st_size == \
        len(train) * train.element_size()
    n_val = int(0.1 * len(ids))
    assert val.tolist() == ids[-n_val:] and train.tolist() == ids[:-n_val]   # no id wrapped around
    assert (meta["train_tokens"], meta["val_tokens"], meta["chars"]) == \
        (len(ids) - n_val, n_val, len(text))


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
    assert P.prepare(src, out, "byte")["tokenizer"] == {"kind": "byte"}     # other tokenizer
    src.write_text("zyxwvutsrq" * 10)                                       # new content: redone
    assert P.prepare(src, out, "byte")["val_tokens"] == 10
    assert P.load_tokens(out / "val.bin", "uint16").tolist() == list(b"zyxwvutsrq")
    for broken in ("{not json", "[1, 2]", "\xff"):                     # a damaged cache: redone
        (out / "meta.json").write_text(broken, encoding="latin-1")
        assert P.prepare(src, out, "byte")["val_tokens"] == 10


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
    assert P.prepare(src, out, "byte")["tokenizer"]["kind"] == "byte"
    assert (out / "meta.json").exists()
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


# ----------------------------------------------------------------------------------------------
# bytes, enwik8, hf:PATH, the command line

ROOT = Path(__file__).resolve().parents[1]


def test_byte_tokenizer_reads_any_bytes(tmp_path):
    """Byte-level data is read as bytes, never decoded: 0xFF and a cut UTF-8 character are data."""
    raw = bytes(range(256)) * 3 + "é".encode()[:1] + b"\xff\xfe tail"
    src = tmp_path / "blob.bin"
    src.write_bytes(raw)
    meta = P.prepare(src, tmp_path / "out", "byte")
    train = P.load_tokens(tmp_path / "out" / "train.bin", "uint16").tolist()
    val = P.load_tokens(tmp_path / "out" / "val.bin", "uint16").tolist()
    assert train + val == list(raw) and len(val) == int(0.1 * len(raw))
    assert meta["chars"] == len(raw) and meta["tokenizer"] == {"kind": "byte"}
    assert "is not UTF-8 text (byte 0x80" in one_line_error(P.prepare, src, tmp_path / "c", "char")


def fake_enwik8(monkeypatch, data):
    """urlopen serves a zip holding `data` as the member enwik8, once; then the network is gone."""
    calls = []

    def urlopen(url, timeout):
        if calls:
            raise urllib.error.URLError("no network")
        calls.append(url)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("enwik8", data)
        return io.BytesIO(buf.getvalue())
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return calls


def test_enwik8_standard_split_and_cache(tmp_path, monkeypatch):
    """enwik8 (downloaded once, cached): train, val and test are the first 90%, the next 5% and the
    last 5% of its bytes (90M / 5M / 5M of the real 100M), test.bin written too."""
    data = ("<page>naïve 東京 text</page>\n" * 700).encode() + b"\xff"   # not even valid UTF-8
    calls = fake_enwik8(monkeypatch, data)
    meta = P.prepare("enwik8", tmp_path / "out", "byte")
    assert calls == [P.ENWIK8_URL] and (tmp_path / "enwik8").read_bytes() == data   # cached
    n = len(data)
    parts = [P.load_tokens(tmp_path / "out" / f"{s}.bin", "uint16").tolist()
             for s in ("train", "val", "test")]
    assert parts == [list(data[:int(0.9 * n)]), list(data[int(0.9 * n):int(0.95 * n)]),
                     list(data[int(0.95 * n):])]
    assert (meta["train_tokens"], meta["val_tokens"], meta["test_tokens"]) == tuple(map(len, parts))
    # another directory beside it (another tokenizer) reads the cached file: no download
    assert P.prepare("enwik8", tmp_path / "out2", "byte")["val_tokens"] == len(parts[1])
    assert len(calls) == 1


def test_enwik8_text_tokenizer_cuts_at_characters(tmp_path, monkeypatch):
    """A text tokenizer gets whole characters: each cut moves forward to a character start."""
    data = ("ab東京" * 501).encode()    # 8 bytes a repeat: both cuts fall on 京's last byte
    fake_enwik8(monkeypatch, data)
    P.prepare("enwik8", tmp_path / "out", "char")
    tok = P.get_tokenizer(json.loads((tmp_path / "out" / "meta.json").read_text())["tokenizer"])
    text = "".join(tok.decode(P.load_tokens(tmp_path / "out" / f"{s}.bin", "uint16").tolist())
                   for s in ("train", "val", "test"))
    train = tok.decode(P.load_tokens(tmp_path / "out" / "train.bin", "uint16").tolist())
    assert text == data.decode() and abs(len(train.encode()) - 0.9 * len(data)) < 4


def test_enwik8_offline_is_one_line_error(tmp_path, monkeypatch):
    def no_network(url, timeout):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    msg = one_line_error(P.prepare, "enwik8", tmp_path / "out", "byte")
    assert f"could not download enwik8 from {P.ENWIK8_URL}" in msg
    assert f"save enwik8 as {tmp_path / 'enwik8'}," in msg


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Gemma-style tokenizer.json (tests/test_tokenizers.py), in a directory of its own."""
    from test_tokenizers import gemma
    d = tmp_path_factory.mktemp("hf_tok")
    tok = gemma()
    tok.save(str(d / "tokenizer.json"))
    return d, tok


def test_prepare_cli_with_hf_tokenizer(tmp_path, hf_dir, corpus):
    """python data/prepare.py my.txt --tokenizer hf:DIR: the .bin files hold the tokenizers
    library's ids of the text, without special tokens (no BOS), split 90/10; meta.json rebuilds
    the tokenizer; a changed tokenizer.json is prepared again."""
    d, ref = hf_dir
    src, out = write(tmp_path, corpus), tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), str(src),
                        "--tokenizer", f"hf:{d}", "--out_dir", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == "" and f"(hf:{d}, vocab" in r.stdout, r.stderr
    ids = ref.encode(corpus, add_special_tokens=False).ids
    train = P.load_tokens(out / "train.bin", "uint16").tolist()
    val = P.load_tokens(out / "val.bin", "uint16").tolist()
    assert train + val == ids and len(val) == int(0.1 * len(ids)) and ids[0] != 2   # no <bos>
    meta = json.loads((out / "meta.json").read_text())
    assert P.get_tokenizer(meta["tokenizer"]).encode(UNICODE) == ref.encode(
        UNICODE, add_special_tokens=False).ids
    assert P.prepare(src, out, f"hf:{d}")["fingerprint"] == meta["fingerprint"]      # cached
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "tokenizer.json").write_text((d / "tokenizer.json").read_text())
    assert P.prepare(src, out, f"hf:{changed}")["fingerprint"] != meta["fingerprint"]


@pytest.mark.parametrize("argv, message", [
    (["missing.txt"], "data 'missing.txt' does not exist"),
    (["TEXT", "--vocab_size", "many"], "argument --vocab_size: invalid int value: 'many'"),
    (["TEXT", "--tokenizer", "gtp2"], "did you mean 'gpt2'"),
    (["TEXT", "--tokenizer", "hf:nowhere.json"], "tokenizer file nowhere.json does not exist"),
    (["TEXT", "--tokenizer", "hf:nowhere"], "nowhere is no local path, and downloading it from "
                                            "the Hub failed"),
    (["TEXT", "--tokenizer", "hf:BADJSON"], "is not JSON"),
    (["LATIN1"], "is not UTF-8 text (byte 0xe9 at offset 3)"),
    (["TEXT", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: source"),
])
def test_prepare_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    files = {"TEXT": write(tmp_path, "some text " * 20), "LATIN1": tmp_path / "latin1.txt",
             "BADJSON": tmp_path / "bad.json"}
    files["LATIN1"].write_bytes("café au lait".encode("latin-1"))
    files["BADJSON"].write_text("{")
    argv = [a.replace("BADJSON", str(files["BADJSON"])) if a.startswith("hf:") else
            str(files.get(a, a)) for a in argv]
    with pytest.raises(SystemExit) as e:
        P.main([*argv, "--out_dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.startswith("error: ")
    assert err.count("\n") == 1 and message in err, err
