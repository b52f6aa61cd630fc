"""Text -> token .bin files (train/val, and test where a corpus fixes one) + tokenizer meta.

  python data/prepare.py stdlib                           # the running Python's standard library
  python data/prepare.py shakespeare                      # tiny-shakespeare (downloaded once)
  python data/prepare.py enwik8 --tokenizer byte          # enwik8 (downloaded once): 90M/5M/5M
  python data/prepare.py my.txt --tokenizer bpe --vocab_size 1024
  python data/prepare.py my.txt --tokenizer cl100k_base   # any tiktoken encoding name
  python data/prepare.py my.txt --tokenizer hf:path/to/gemma   # a HF model's own tokenizer.json

A prepared directory holds train.bin and val.bin (uint16 tokens, uint32 when the vocabulary is
larger than 65536; the first 90% of the tokens are train, the rest val; enwik8 is split at its
standard byte offsets instead and also gets test.bin) and meta.json, whose "tokenizer" entry
rebuilds the tokenizer with get_tokenizer() (data/tokenizers.py). The byte tokenizer reads the file
as bytes, so any file works; the others need UTF-8 text. Raw text is encoded without special
tokens (an HF tokenizer's BOS/EOS are the objectives' business). A BPE vocabulary is also written
to tokenizer.tiktoken in tiktoken's own file format.
"""
import argparse
import glob
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
import urllib.request
import zipfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: import `data` from the repo, not from data/
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from data.tokenizers import (  # noqa: E402,F401  (get_tokenizer and GPT2_SPLIT: re-exported)
    GPT2_SPLIT,
    get_tokenizer,
    make_tokenizer,
    train_bpe,
)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/" \
                  "tinyshakespeare/input.txt"
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
STDLIB_BYTES = 3_000_000   # the stdlib corpus: whole Lib/*.py files, by name, until this many bytes
VAL_FRACTION = 0.1
SPLITS = {"enwik8": (0.9, 0.95)}   # train | val | test at these fractions of the bytes: of enwik8's
                                   # 100M bytes, the standard 90M / 5M / 5M


# ----------------------------------------------------------------------------------------------
# 1. Sources: a file, the stdlib corpus (no download), tiny-shakespeare or enwik8 (downloaded)


def read_bytes(path):
    """A file's bytes, or a one-line ValueError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory without train.bin/val.bin/meta.json" if path.is_dir() \
            else "does not exist"
        raise ValueError(f"data {str(path)!r} {what}; pass a UTF-8 text file, a directory made by "
                         f"data/prepare.py, or one of {sorted(CORPORA)}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"data file {str(path)!r} cannot be read: {e.strerror}") from None
    if not raw.strip():
        raise ValueError(f"data file {str(path)!r} is empty; pass a file with some text in it")
    return raw


def as_text(raw, what):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start}); convert it first, e.g. iconv -f latin1 -t utf-8, or "
                         f"use --tokenizer=byte, which reads any bytes") from None


def read_text(path):
    """The UTF-8 text of a file, or a one-line ValueError saying what is wrong with it."""
    return as_text(read_bytes(path), f"data file {str(path)!r}")


def stdlib_text(cache_dir=None):
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
        raise ValueError(f"found no standard-library sources under "
                         f"{sysconfig.get_paths()['stdlib']}; pass --data=your_text_file.txt")
    return "\n\n".join(parts)


def download(url, path, name, extract=None):
    """path's bytes, downloaded from url first if path is not there yet (an archive member when
    extract names one). The file appears complete or not at all."""
    path = Path(path)
    if not path.exists():
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                data = r.read()
            if extract:
                data = zipfile.ZipFile(io.BytesIO(data)).read(extract)
        except (OSError, zipfile.BadZipFile, KeyError) as e:
            file = extract or url.rsplit("/", 1)[-1]
            raise ValueError(f"could not download {name} from {url} ({e}); download it yourself "
                             f"and save {file} as {path}, where the next run finds it") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return read_bytes(path)


CORPORA = {  # name -> cache_dir -> its bytes
    "stdlib": lambda cache_dir: stdlib_text().encode(),
    "shakespeare": lambda cache_dir: download(SHAKESPEARE_URL, Path(cache_dir) /
                                              "tinyshakespeare.txt", "tiny-shakespeare"),
    "enwik8": lambda cache_dir: download(ENWIK8_URL, Path(cache_dir) / "enwik8", "enwik8",
                                         extract="enwik8"),
}


# ----------------------------------------------------------------------------------------------
# 2. Prepare: text -> train.bin, val.bin (test.bin), meta.json


def write_tokens(path, ids, dtype):
    """ids (a list, or bytes: the byte tokenizer's) as a flat binary file, written atomically."""
    t = torch.frombuffer(bytearray(ids), dtype=torch.uint8) if isinstance(ids, bytes) \
        else torch.tensor(ids, dtype=torch.int64)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(bytes(t.to(dtype).untyped_storage()))
    os.replace(tmp, path)


def load_tokens(path, dtype):
    """A read-only view of a .bin file, mapped rather than read (np.memmap without numpy)."""
    dtype = getattr(torch, dtype)
    n = os.path.getsize(path) // dtype.itemsize
    return torch.from_file(str(path), shared=False, size=n, dtype=dtype)


def split_parts(raw, fractions, text):
    """raw cut at these fractions of its length; for text, moved forward to a character start."""
    cuts = []
    for f in fractions:
        cut = int(len(raw) * f)
        while text and cut < len(raw) and raw[cut] & 0xC0 == 0x80:   # a UTF-8 continuation byte
            cut += 1
        cuts.append(cut)
    return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]


def fingerprint(source, tokenizer, bpe_vocab_size):
    """What the prepared files depend on: the source file (or corpus name), the tokenizer and,
    for hf:PATH, the tokenizer file."""
    stamps = []
    for path in ([] if source in CORPORA else [source]) + \
            ([Path(tokenizer[3:]) / "tokenizer.json" if Path(tokenizer[3:]).is_dir()
              else tokenizer[3:]] if tokenizer.startswith("hf:") else []):
        if not Path(path).is_file():
            return None                        # missing: prepare's reading says so in one line
        st = os.stat(path)
        stamps.append(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    key = f"{source if source in CORPORA else ''}|{'|'.join(stamps)}|{tokenizer}|{bpe_vocab_size}"
    return hashlib.sha1(key.encode()).hexdigest()


def cached_meta(path):
    """A prepared directory's meta.json, or {} when absent or unreadable (then it is redone)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def prepare(source, out_dir, tokenizer="char", bpe_vocab_size=1024):
    """Tokenise `source` (a file or a name in CORPORA) into out_dir; returns the meta dict.

    If out_dir already holds the same source prepared with the same tokenizer, nothing is redone.
    """
    out_dir, source = Path(out_dir), str(source)
    stamp = fingerprint(source, tokenizer, bpe_vocab_size)
    meta_path = out_dir / "meta.json"
    cached = cached_meta(meta_path)
    if stamp and cached.get("fingerprint") == stamp:
        return cached
    # a downloaded corpus is kept beside out_dir, for every tokenizer prepared from it
    raw = CORPORA[source](out_dir.parent) if source in CORPORA else read_bytes(source)
    is_text = tokenizer != "byte"             # the byte tokenizer takes the bytes as they are
    parts = split_parts(raw, SPLITS[source], is_text) if source in SPLITS else [raw]
    what = f"data {source!r}" if source in CORPORA else f"data file {source!r}"
    data = [as_text(p, what) for p in parts] if is_text else parts
    tok = make_tokenizer(tokenizer, "".join(data) if is_text else "", bpe_vocab_size)
    ids = [tok.encode(d) if is_text else d for d in data]
    if len(ids) == 1:                          # no fixed split: the last tenth of the tokens is val
        n_val = int(len(ids[0]) * VAL_FRACTION)
        ids = [ids[0][:-n_val], ids[0][-n_val:]] if n_val else ids + [[]]
    if min(map(len, ids)) < 2:
        raise ValueError(f"data {source!r} gives only {sum(map(len, ids))} tokens; a train/val "
                         f"split needs at least {int(2 / VAL_FRACTION)} (pass a longer text)")
    dtype = "uint16" if tok.vocab_size <= 2 ** 16 else "uint32"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # an old meta.json must not vouch for half-written .bin files
    for name, part in zip(("train", "val", "test"), ids):
        write_tokens(out_dir / f"{name}.bin", part, getattr(torch, dtype))
    if tok.meta["kind"] == "bpe":
        (out_dir / "tokenizer.tiktoken").write_text(tok.meta["ranks"])
    meta = {"source": source, "fingerprint": stamp, "dtype": dtype, "vocab_size": tok.vocab_size,
            "chars": sum(map(len, data)), "train_tokens": len(ids[0]), "val_tokens": len(ids[1]),
            "tokenizer": tok.meta}
    if len(ids) > 2:
        meta["test_tokens"] = len(ids[2])
    tmp = meta_path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)  # written last: a meta.json means the .bin files are complete
    return meta


def cache_name(source, tokenizer):
    """A directory name for source prepared with tokenizer (hf:PATH made safe for a name)."""
    name = source if source in CORPORA else Path(source).stem
    return re.sub(r"[^\w.-]+", "_", f"{name}-{tokenizer}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, "error: ...", exit status 2: not argparse's usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("source", help=f"a UTF-8 text file (any file with --tokenizer byte) or one of "
                                  f"{sorted(CORPORA)}")
    p.add_argument("--tokenizer", default="char", help="char | byte | bpe | hf:PATH (a HF "
                   "tokenizer.json or its directory) | a tiktoken encoding (gpt2, cl100k_base...)")
    p.add_argument("--vocab_size", type=int, default=1024, help="BPE vocabulary (--tokenizer bpe)")
    p.add_argument("--out_dir", help="default: data/cache/<source name>-<tokenizer>")
    args = p.parse_args(argv)
    out_dir = args.out_dir or Path(__file__).resolve().parent / "cache" / cache_name(
        args.source, args.tokenizer)
    try:
        meta = prepare(args.source, out_dir, args.tokenizer, args.vocab_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    test = f" + {meta['test_tokens']:,} test" if "test_tokens" in meta else ""
    print(f"{meta['chars']:,} characters -> {meta['train_tokens']:,} train + "
          f"{meta['val_tokens']:,} val{test} tokens ({args.tokenizer}, vocab "
          f"{meta['vocab_size']:,}) in {out_dir}")


if __name__ == "__main__":
    main()
