"""Encode speed of data/tokenizers.py's HF tokenizer.json runner against the `tokenizers` library.

    python tests/bench/bench_tokenizers.py [--mb 3] [--vocab 8000] [--quick]

Each family's tokenizer.json is built as tests/test_tokenizers.py builds it (the same pipelines),
its vocabulary trained here on the benchmark text (--vocab tokens). The text: --mb MB of the
running Python's standard library source (real English-like code and prose) with one line in
ten drawn from a mixed-script sample (accents, CJK, Cyrillic, Arabic, emoji, digits, whitespace
runs). One encode of the whole text, without special tokens, from a cold start (our per-word
caches empty), single-threaded on both sides; the ids are checked equal. Goal: >= 1 MB/s for
every model type.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from data.prepare import stdlib_text  # noqa: E402
from data.tokenizers import from_json  # noqa: E402
from tests import test_tokenizers as tt  # noqa: E402


def bench_text(mb):
    lines = stdlib_text().splitlines(keepends=True)
    g = torch.Generator().manual_seed(0)
    mixed = [t + "\n" for t in tt.MIXED if t]
    picks = torch.randint(0, len(mixed), (len(lines),), generator=g).tolist()
    out, size = [], 0
    for k, line in enumerate(lines):
        out.append(mixed[picks[k]] if k % 10 == 9 else line)
        size += len(out[-1].encode())
        if size >= mb * 1e6:
            break
    return "".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=3.0)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--quick", action="store_true", help="0.2 MB, vocab 1000: checks that it runs")
    args = p.parse_args()
    mb, vocab = (0.2, 1000) if args.quick else (args.mb, args.vocab)
    text = bench_text(mb)
    lines = text.splitlines()
    tt.corpus, tt.VOCAB_SIZE = (lambda: lines), vocab          # train on the benchmark text
    charsmap = tt.charsmap(tt.nmt_rules())
    n = len(text.encode()) / 1e6
    print(f"{n:.2f} MB of text, vocabularies of {vocab} tokens, one thread\n")
    print(f"{'family':<22} {'model':<10} {'ours MB/s':>10} {'tokenizers MB/s':>16} {'ratio':>7}")
    for name, make in tt.FAMILIES.items():
        tok = make(charsmap)
        json_text = tok.to_str()
        ref, ours = tt.Tokenizer.from_str(json_text), from_json(json_text)
        t0 = time.perf_counter()
        want = ref.encode(text, add_special_tokens=False).ids
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = ours.encode(text)
        t_ours = time.perf_counter() - t0
        assert got == want, f"{name}: ids differ from the tokenizers library's"
        kind = type(ours.model).__name__
        print(f"{name:<22} {kind:<10} {n / t_ours:>10.2f} {n / t_ref:>16.2f} "
              f"{t_ours / t_ref:>6.1f}x")


if __name__ == "__main__":
    main()
