"""Text -> token .bin files (train/val) + tokenizer meta, and the tokenizers train.py and generate.py share.

  python data/prepare.py stdlib                           # the running Python's standard library source
  python data/prepare.py shakespeare                      # downloads tiny-shakespeare (online only)
  python data/prepare.py my.txt --tokenizer bpe --vocab_size 1024
  python data/prepare.py my.txt --tokenizer cl100k_base   # any tiktoken encoding name

A prepared directory holds train.bin and val.bin (uint16 tokens, uint32 when the vocabulary is larger
than 65536; the first 90% of the text is train, the rest val) and meta.json, whose "tokenizer" entry
rebuilds the tokenizer with get_tokenizer(). That dict holds only str/int/list values, so train.py stores
it in checkpoints that load with torch.load(weights_only=True). A BPE vocabulary is also written to
tokenizer.tiktoken in tiktoken's own file format (one "base64(token) rank" line per token).
"""
import argparse
import base64
import difflib
import glob
import hashlib
import heapq
import json
import os
import sysconfig
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import torch

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
STDLIB_BYTES = 3_000_000   # the stdlib corpus: whole Lib/*.py files, sorted by name, until this many bytes
VAL_FRACTION = 0.1
# GPT-2's pre-tokenizer split (Radford et al. 2019): BPE merges never cross these chunk boundaries
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ----------------------------------------------------------------------------------------------
# 1. Tokenizers: each has encode(str) -> list[int], decode(list[int]) -> str, vocab_size and meta


class CharTokenizer:
    """One token per character of the training text (nanoGPT's shakespeare_char)."""

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)
        self.meta = {"kind": "char", "chars": chars}

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise ValueError(f"character {c!r} (U+{ord(c):04X}) is not in this char vocabulary of "
                             f"{self.vocab_size} characters built from the training text; remove it, "
                             f"or train with --tokenizer=byte or bpe, which encode any text") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


class ByteTokenizer:
    """The UTF-8 bytes of the text: 256 tokens, any text encodes."""

    vocab_size = 256
    meta = {"kind": "byte"}

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):  # a sample may stop inside a multi-byte character
        return bytes(ids).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """A tiktoken Encoding: a named one (gpt2, cl100k_base, ...) or a BPE trained by train_bpe."""

    def __init__(self, enc, meta):
        self.enc, self.meta = enc, meta
        self.vocab_size = enc.n_vocab

    def encode(self, text):  # ordinary: "<|endoftext|>" in a text file is just text
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(ids, errors="replace")


def tiktoken_encoding(name):
    import tiktoken  # lazy: only these tokenizers need it
    names = tiktoken.list_encoding_names()
    if name not in names:
        close = difflib.get_close_matches(name, names + ["char", "byte", "bpe"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"tokenizer={name!r} is not char, byte, bpe or a tiktoken encoding {names}{hint}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # the vocabulary is downloaded on first use; offline that fails in many ways
        raise ValueError(f"tiktoken encoding {name!r} could not be loaded ({type(e).__name__}); tiktoken "
                         f"downloads it on first use, so run once online, or use --tokenizer=char, byte or bpe") from None


def bpe_encoding(ranks_text, pat_str):
    """A tiktoken Encoding from a vocabulary in tiktoken's file format (as tiktoken.load reads it)."""
    import tiktoken
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in ranks_text.splitlines() if line)}
    return tiktoken.Encoding("anyformer_bpe", pat_str=pat_str, mergeable_ranks=ranks, special_tokens={})


def get_tokenizer(meta: dict):
    """Rebuild a tokenizer from its meta dict (meta.json's "tokenizer", a checkpoint's "tokenizer")."""
    kind = meta.get("kind")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "tiktoken":
        return TiktokenTokenizer(tiktoken_encoding(meta["name"]), meta)
    if kind == "bpe":
        return TiktokenTokenizer(bpe_encoding(meta["ranks"], meta["pat_str"]), meta)
    raise ValueError(f"tokenizer meta of kind {kind!r} is not char, byte, tiktoken or bpe")


def train_bpe(text, vocab_size, pat_str=GPT2_SPLIT):
    """Byte-level BPE (Sennrich et al. 2016, arXiv:1508.07909) over GPT-2-style chunks of `text`.

    Returns the vocabulary in tiktoken's file format: "base64(token bytes) rank" per line, ranks in
    merge order after the 256 single bytes, which is the order tiktoken applies merges in.
    """
    import regex  # tiktoken's dependency; the stdlib re has no \\p{L}
    if vocab_size < 256:
        raise ValueError(f"bpe vocab_size={vocab_size} must be at least 256 (one token per byte)")
    words = Counter(regex.findall(pat_str, text))                    # chunk -> occurrences
    seqs = [list(w.encode("utf-8")) for w in words]                 # each chunk as token ids
    counts = list(words.values())
    vocab = [bytes([i]) for i in range(256)]
    rank = {b: i for i, b in enumerate(vocab)}
    pairs, where = Counter(), defaultdict(set)                      # pair -> count, pair -> chunks holding it
    for i, s in enumerate(seqs):
        for p in zip(s, s[1:]):
            pairs[p] += counts[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in pairs.items()]                      # max-count first, ties by pair: deterministic
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        c, best = heapq.heappop(heap)
        if pairs.get(best, 0) != -c or c == 0:                      # a stale entry: the count changed since
            continue
        merged = vocab[best[0]] + vocab[best[1]]
        if merged not in rank:  # two pairs can spell the same bytes; tiktoken needs each once
            rank[merged] = len(vocab)
            vocab.append(merged)
        new, changed = rank[merged], set()
        for i in where.pop(best):
            s, n = seqs[i], counts[i]
            for p in zip(s, s[1:]):
                pairs[p] -= n
                changed.add(p)
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(new)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            for p in zip(out, out[1:]):
                pairs[p] += n
                where[p].add(i)
                changed.add(p)
            seqs[i] = out
        pairs.pop(best, None)
        for p in changed - {best}:
            heapq.heappush(heap, (-pairs[p], p))
    return "".join(f"{base64.b64encode(tok).decode()} {i}\n" for i, tok in enumerate(vocab))


def make_tokenizer(name, text, bpe_vocab_size=1024):
    """A tokenizer fitted to `text`: char, byte, bpe (trained here) or a tiktoken encoding name."""
    if name == "char":
        return CharTokenizer("".join(sorted(set(text))))
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        return get_tokenizer({"kind": "bpe", "ranks": train_bpe(text, bpe_vocab_size), "pat_str": GPT2_SPLIT})
    return get_tokenizer({"kind": "tiktoken", "name": name})


# ----------------------------------------------------------------------------------------------
# 2. Sources: a text file, the stdlib corpus (no download) or tiny-shakespeare (downloaded)


def read_text(path):
    """The UTF-8 text of a file, or a one-line ValueError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory without train.bin/val.bin/meta.json" if path.is_dir() else "does not exist"
        raise ValueError(f"data {str(path)!r} {what}; pass a UTF-8 text file, a directory made by "
                         f"data/prepare.py, or one of {sorted(CORPORA)}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start}); convert it first, e.g. iconv -f latin1 -t utf-8") from None
    if not text.strip():
        raise ValueError(f"data file {str(path)!r} is empty; pass a file with some text in it")
    return text


def stdlib_text():
    """The running Python's standard library source: Lib/*.py by name, public modules, ~3 MB."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    parts, size = [], 0
    for f in files:
        if os.path.basename(f).startswith("_"):  # skip the private pure-Python twins of C modules
            continue
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text)
        if size >= STDLIB_BYTES:
            break
    if not parts:
        raise ValueError(f"found no standard-library sources under {sysconfig.get_paths()['stdlib']}; "
                         f"pass --data=your_text_file.txt instead")
    return "\n\n".join(parts)


def shakespeare_text(cache_dir):
    path = Path(cache_dir) / "tinyshakespeare.txt"
    if not path.exists():
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                data = r.read()
        except OSError as e:
            raise ValueError(f"could not download tiny-shakespeare from {SHAKESPEARE_URL} ({e}); "
                             f"download it yourself and pass the file: --data=input.txt") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return read_text(path)


CORPORA = {"stdlib": lambda cache_dir: stdlib_text(), "shakespeare": shakespeare_text}


# ----------------------------------------------------------------------------------------------
# 3. Prepare: text -> train.bin, val.bin, meta.json


def write_tokens(path, ids, dtype):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(bytes(torch.tensor(ids, dtype=torch.int64).to(dtype).untyped_storage()))
    os.replace(tmp, path)


def load_tokens(path, dtype):
    """A read-only view of a .bin file, mapped rather than read (np.memmap without numpy)."""
    dtype = getattr(torch, dtype)
    n = os.path.getsize(path) // dtype.itemsize
    return torch.from_file(str(path), shared=False, size=n, dtype=dtype)


def prepare(source, out_dir, tokenizer="char", bpe_vocab_size=1024):
    """Tokenise `source` (a text file or a name in CORPORA) into out_dir; returns the meta dict.

    If out_dir already holds the same source prepared with the same tokenizer, nothing is redone.
    """
    out_dir = Path(out_dir)
    if source in CORPORA:
        stamp = source
    else:
        if not Path(source).is_file():
            read_text(source)  # raises the one-line error for a missing path
        st = os.stat(source)
        stamp = f"{Path(source).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    fingerprint = hashlib.sha1(f"{stamp}|{tokenizer}|{bpe_vocab_size}".encode()).hexdigest()
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint:
            return meta
    text = CORPORA[source](out_dir) if source in CORPORA else read_text(source)
    tok = make_tokenizer(tokenizer, text, bpe_vocab_size)
    ids = tok.encode(text)
    n_val = int(len(ids) * VAL_FRACTION)
    if n_val < 2:
        raise ValueError(f"data {source!r} gives only {len(ids)} tokens; a train/val split needs at "
                         f"least {int(2 / VAL_FRACTION)} (pass a longer text)")
    dtype = "uint16" if tok.vocab_size <= 2 ** 16 else "uint32"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # an old meta.json must not vouch for half-written .bin files
    write_tokens(out_dir / "train.bin", ids[:-n_val], getattr(torch, dtype))
    write_tokens(out_dir / "val.bin", ids[-n_val:], getattr(torch, dtype))
    if tok.meta["kind"] == "bpe":
        (out_dir / "tokenizer.tiktoken").write_text(tok.meta["ranks"])
    meta = {"source": str(source), "fingerprint": fingerprint, "dtype": dtype, "vocab_size": tok.vocab_size,
            "chars": len(text), "train_tokens": len(ids) - n_val, "val_tokens": n_val, "tokenizer": tok.meta}
    tmp = meta_path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)  # written last: a meta.json means the .bin files are complete
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help=f"a UTF-8 text file or one of {sorted(CORPORA)}")
    p.add_argument("--tokenizer", default="char", help="char | byte | bpe | a tiktoken encoding (gpt2, cl100k_base, ...)")
    p.add_argument("--vocab_size", type=int, default=1024, help="BPE vocabulary size (--tokenizer bpe)")
    p.add_argument("--out_dir", help="default: data/cache/<source name>-<tokenizer>")
    args = p.parse_args(argv)
    name = args.source if args.source in CORPORA else Path(args.source).stem
    out_dir = args.out_dir or Path(__file__).resolve().parent / "cache" / f"{name}-{args.tokenizer}"
    try:
        meta = prepare(args.source, out_dir, args.tokenizer, args.vocab_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"{meta['chars']:,} characters -> {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
          f"({args.tokenizer}, vocab {meta['vocab_size']:,}) in {out_dir}")


if __name__ == "__main__":
    main()
