"""Tokenizers: text <-> token ids, shared by data/prepare.py, train.py and generate.py.

Each has encode(text) -> list[int] (the text alone, no special tokens), decode(ids) -> str,
vocab_size, specials (its special tokens, name -> id: a HF tokenizer.json's, tiktoken's
<|endoftext|>; the objectives use those they find) and meta: a dict of str/int/list values that
get_tokenizer(meta) rebuilds it from, so meta.json and checkpoints carry it and load with
torch.load(weights_only=True).

  char        one token per character of the training text (nanoGPT's shakespeare_char)
  byte        the UTF-8 bytes: 256 tokens, any text encodes
  bpe         a byte-level BPE trained on the text here (train_bpe), run by tiktoken
  gpt2, ...   any tiktoken encoding name
  hf:PATH     a HF tokenizer.json (the file, or a directory holding it), run as the `tokenizers`
              library runs it: byte-level BPE (GPT-2, Llama 3, Qwen, BART; on tiktoken),
              SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma), Unigram (T5,
              ALBERT, DeBERTa-v3) and WordPiece (BERT), with their normalizers, pre-tokenizers,
              added tokens, post-processor and decoder. A component not written here is refused.
"""
import base64
import difflib
import heapq
import json
import re
import struct
import unicodedata
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

import regex  # tiktoken's dependency; unlike re it knows \p{...} classes and graphemes (\X)

# GPT-2's pre-tokenizer split (Radford et al. 2019): BPE merges never cross these chunk boundaries
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ----------------------------------------------------------------------------------------------
# 1. Ours: char, byte, tiktoken encodings and the BPE trained here


class CharTokenizer:
    """One token per character of the training text (nanoGPT's shakespeare_char)."""

    specials = {}

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
                             f"{self.vocab_size} characters built from the training text; remove "
                             f"it, or train with --tokenizer=byte or bpe, which encode any text"
                             ) from None

    def decode(self, ids):  # ids past the vocabulary (a padded embedding's) leave no text
        return "".join(self.chars[i] for i in ids if i < self.vocab_size)


class ByteTokenizer:
    """The UTF-8 bytes of the text: 256 tokens, any text encodes (data/prepare.py also feeds it
    files that are not text at all, as their bytes)."""

    vocab_size, specials = 256, {}
    meta = {"kind": "byte"}

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):  # a sample may stop inside a multi-byte character
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """A tiktoken Encoding: a named one (gpt2, cl100k_base, ...) or a BPE trained by train_bpe."""

    def __init__(self, enc, meta):
        self.enc, self.meta = enc, meta
        self.vocab_size = enc.n_vocab
        self.specials = {t: enc.encode_single_token(t) for t in enc.special_tokens_set}

    def encode(self, text):  # ordinary: "<|endoftext|>" in a text file is just text
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i < self.vocab_size], errors="replace")


def tiktoken_encoding(name):
    import tiktoken  # lazy: only these tokenizers need it
    names = tiktoken.list_encoding_names()
    if name not in names:
        close = difflib.get_close_matches(name, names + ["char", "byte", "bpe"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"tokenizer={name!r} is not char, byte, bpe, hf:PATH or a tiktoken "
                         f"encoding {names}{hint}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # downloaded on first use; offline that fails in many ways
        raise ValueError(f"tiktoken encoding {name!r} could not be loaded ({type(e).__name__}); "
                         f"tiktoken downloads it on first use, so run once online, or use "
                         f"--tokenizer=char, byte or bpe") from None


def bpe_encoding(ranks_text, pat_str):
    """A tiktoken Encoding from a vocabulary in tiktoken's file format (as tiktoken.load reads)."""
    import tiktoken
    lines = (line.split() for line in ranks_text.splitlines() if line)
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in lines}
    return tiktoken.Encoding("anyformer_bpe", pat_str=pat_str, mergeable_ranks=ranks,
                             special_tokens={})


def train_bpe(text, vocab_size, pat_str=GPT2_SPLIT):
    """Byte-level BPE (Sennrich et al. 2016, arXiv:1508.07909) over GPT-2-style chunks of `text`.

    Returns the vocabulary in tiktoken's file format: "base64(token bytes) rank" per line, ranks in
    merge order after the 256 single bytes, which is the order tiktoken applies merges in.
    """
    if vocab_size < 256:
        raise ValueError(f"bpe vocab_size={vocab_size} must be at least 256 (one token per byte)")
    words = Counter(regex.findall(pat_str, text))                    # chunk -> occurrences
    seqs = [list(w.encode("utf-8")) for w in words]                 # each chunk as token ids
    counts = list(words.values())
    vocab = [bytes([i]) for i in range(256)]
    rank = {b: i for i, b in enumerate(vocab)}
    pairs, where = Counter(), defaultdict(set)          # pair -> count, pair -> chunks holding it
    for i, s in enumerate(seqs):
        for p in zip(s, s[1:]):
            pairs[p] += counts[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in pairs.items()]   # max-count first, ties by pair: deterministic
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        c, best = heapq.heappop(heap)
        if pairs.get(best, 0) != -c or c == 0:          # a stale entry: the count changed since
            continue
        merged = vocab[best[0]] + vocab[best[1]]
        if merged not in rank:  # two pairs can spell the same bytes; tiktoken needs each once
            rank[merged] = len(vocab)
            vocab.append(merged)
        changed = set()
        for i in where.pop(best):
            changed |= replace_pair(seqs, i, counts[i], best, rank[merged], pairs, where)
        pairs.pop(best, None)
        for p in changed - {best}:
            heapq.heappush(heap, (-pairs[p], p))
    return "".join(f"{base64.b64encode(tok).decode()} {i}\n" for i, tok in enumerate(vocab))


def replace_pair(seqs, i, n, pair, new, pairs, where):
    """Merge every `pair` in chunk i (seen n times) into `new`, keeping the pair counts right;
    returns the pairs whose count changed."""
    s, changed = seqs[i], set()
    for p in zip(s, s[1:]):
        pairs[p] -= n
        changed.add(p)
    out, j = [], 0
    while j < len(s):
        if j + 1 < len(s) and (s[j], s[j + 1]) == pair:
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
    return changed


# ----------------------------------------------------------------------------------------------
# 2. HF tokenizer.json: normalizers (str -> str), applied to the text between added tokens

# Rust's char::is_whitespace (Unicode White_Space), which `tokenizers` uses; str.isspace() differs
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007" \
             "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
# is_ascii_punctuation() or a Unicode P* category: the punctuation of BertPreTokenizer/Punctuation
PUNCT = r"\p{P}!-/:-@\[-`{-~"
PUNCTUATION = f"[{PUNCT}]"
CJK = r"[\u4E00-\u9FFF\u3400-\u4DBF\U00020000-\U0002A6DF\U0002A700-\U0002B73F" \
      r"\U0002B740-\U0002B81F\U0002B920-\U0002CEAF\uF900-\uFAFF\U0002F800-\U0002FA1F]"
BERT_DROP = regex.compile(r"[\x00\ufffd]|(?![\t\n\r])\p{C}")     # clean_text: removed characters
BERT_SPACE = regex.compile(r"[\t\n\r\p{White_Space}]")          # clean_text: these become " "
BERT_CJK = regex.compile(f"({CJK})")                             # an ideograph is a word of its own
MARKS, NONSPACING_MARKS = regex.compile(r"\p{M}"), regex.compile(r"\p{Mn}")
GRAPHEMES = regex.compile(r"\X")                   # extended grapheme clusters (Unicode TR29)
WORDS_RE = re.compile(r"\s*\S+|\s+")              # words, the whitespace before them included
CACHE_SIZE = 1 << 18   # entries per cache of words already done (Precompiled, models)


def lowercase(text):
    """Rust's char::to_lowercase, character by character: like str.lower() but for Python's
    final-sigma rule (a word-final capital sigma becomes "ς" there, "σ" here)."""
    return text.replace("Σ", "σ").lower()


def pattern(node):
    """A tokenizer.json pattern, {"String": s} or {"Regex": r}, as a compiled regex. `tokenizers`
    runs Regex patterns with Oniguruma; the ones the families ship read the same in `regex`."""
    return regex.compile(regex.escape(node["String"]) if "String" in node else node["Regex"])


def replace(node):
    rx, content = pattern(node["pattern"]), node["content"].replace("\\", "\\\\")  # literal
    return lambda text: rx.sub(content, text)


def strip(left, right):
    return lambda text: text.lstrip(WHITESPACE * left).rstrip(WHITESPACE * right) \
        if left or right else text


def bert_normalizer(node):
    """BERT's normalizer: clean_text, handle_chinese_chars, strip_accents (default: as
    lowercase), lowercase; each step over the whole text with one regex."""
    lower = node.get("lowercase", True)
    steps = [lambda t: BERT_SPACE.sub(" ", BERT_DROP.sub("", t))] * node.get("clean_text", True)
    steps += [lambda t: BERT_CJK.sub(r" \1 ", t)] * node.get("handle_chinese_chars", True)
    accents = lower if node.get("strip_accents") is None else node["strip_accents"]
    steps += [lambda t: NONSPACING_MARKS.sub("", unicodedata.normalize("NFD", t))] * accents
    return sequence(steps + [lowercase] * lower)


def sequence(steps):
    """Components applied one after the other (normalizers, pre-tokenizers, decoders)."""
    def run(x, *args):
        for step in steps:
            x = step(x, *args)
        return x
    return run


class Precompiled:
    """SentencePiece's compiled normalization rules (nmt_nfkc for T5 and ALBERT), applied as
    `tokenizers` applies them: per grapheme cluster, a cluster under 6 bytes is replaced whole
    when a rule's key is a prefix of it (the shortest such key), else each of its characters that
    is a key. Words (with the whitespace before them: no cluster spans two, but for a Prepend
    character's) are done once each; a word with no character of any key is left as it is."""

    def __init__(self, node):
        blob = base64.b64decode(node["precompiled_charsmap"] or "")  # null in some exports: none
        self.rules = charsmap_rules(blob) if blob else {}
        self.longest = max(map(len, self.rules), default=0)
        self.touched = {c for k in self.rules for c in (k if len(k) == 1 else k[1:])}
        self.prepend, self.cache = regex.compile(r"\p{GCB=Prepend}"), {}

    def lookup(self, key: str):
        """The replacement of the shortest rule key that is a prefix of `key`, or None."""
        for k in range(1, min(len(key), self.longest) + 1):
            if (r := self.rules.get(key[:k])) is not None:
                return r
        return None

    def normalize_cluster(self, g):
        whole = self.lookup(g) if len(g.encode()) < 6 else None
        return whole if whole is not None else "".join([c if r is None else r for c in g
                                                         for r in [self.lookup(c)]])

    def normalize_word(self, word):
        untouched = self.touched.isdisjoint
        return "".join([g if untouched(g) else self.normalize_cluster(g)
                        for g in GRAPHEMES.findall(word)])

    def __call__(self, text):
        untouched = self.touched.isdisjoint
        if untouched(text):
            return text
        if len(self.cache) >= CACHE_SIZE:
            self.cache.clear()
        cache, words = self.cache, [text] if self.prepend.search(text) else WORDS_RE.findall(text)
        return "".join([w if untouched(w) else cache[w] if w in cache else
                        cache.setdefault(w, self.normalize_word(w)) for w in words])


def charsmap_rules(blob):
    """{key: replacement} of a precompiled charsmap: the byte size of a darts-clone double array,
    its 32-bit units (label: the low byte; has_leaf: bit 8; offset to the children: bits 10-31,
    times 256 if bit 9; a leaf unit holds bit 31 and where its replacement starts), then the
    NUL-terminated replacements."""
    (size,) = struct.unpack_from("<I", blob)
    units, strings = struct.unpack_from(f"<{size // 4}I", blob, 4), blob[4 + size:]
    offset = lambda u: (u >> 10) << ((u & (1 << 9)) >> 6)
    children = defaultdict(list)       # base -> (label, position): where a lookup finds a child
    for q, u in enumerate(units):
        if 0 < u & ((1 << 31) | 0xFF) < 256:
            children[q ^ (u & 0xFF)].append((u & 0xFF, q))
    rules, todo, seen = {}, [(b"", offset(units[0]))], set()
    while todo:
        key, base = todo.pop()
        for label, q in children.get(base, ()):
            if q in seen:
                raise ValueError("its Precompiled charsmap is not a trie (a node has two parents)")
            seen.add(q)
            below = q ^ offset(units[q])
            if units[q] & (1 << 8):
                start = units[below] & ((1 << 31) - 1)
                rules[key + bytes([label])] = strings[start:strings.index(0, start)]
            todo.append((key + bytes([label]), below))
    try:
        return {k.decode(): v.decode() for k, v in rules.items()}
    except UnicodeDecodeError:
        raise ValueError("its Precompiled charsmap has rules that are not whole UTF-8 characters"
                         ) from None


NORMALIZERS = {
    "NFC": lambda n: partial(unicodedata.normalize, "NFC"),
    "NFD": lambda n: partial(unicodedata.normalize, "NFD"),
    "NFKC": lambda n: partial(unicodedata.normalize, "NFKC"),
    "NFKD": lambda n: partial(unicodedata.normalize, "NFKD"),
    "Lowercase": lambda n: lowercase,
    "StripAccents": lambda n: partial(MARKS.sub, ""),
    "Strip": lambda n: strip(n["strip_left"], n["strip_right"]),
    "Replace": replace,
    "Prepend": lambda n: lambda text: n["prepend"] + text if text else text,
    "Precompiled": Precompiled,
    "BertNormalizer": bert_normalizer,
    "Sequence": lambda n: sequence([build(NORMALIZERS, m, "normalizer") for m in n["normalizers"]]),
}


def build(registry, node, kind):
    """The component a tokenizer.json node describes, or a one-line error naming it."""
    if node.get("type") not in registry:
        raise ValueError(f"its {kind} {node.get('type')!r} is not supported (this loader runs "
                         f"{', '.join(registry)})")
    return registry[node["type"]](node)


# ----------------------------------------------------------------------------------------------
# 3. Pre-tokenizers: (pieces, first) -> pieces; first says pieces[0] starts the input text


def split_parts(rx, text, behavior):
    """`tokenizers`' split of text at the matches of rx with a SplitDelimiterBehavior."""
    parts, at = [], 0                                    # (piece, is a match), covering the text
    for m in rx.finditer(text):
        parts += [(text[at:m.start()], False)] * (m.start() > at) + [(m.group(), True)]
        at = m.end()
    parts += [(text[at:], False)] * (at < len(text))
    if behavior == "Removed":
        return [p for p, match in parts if not match and p]
    if behavior == "Isolated":
        return [p for p, _ in parts if p]
    if behavior == "MergedWithNext":  # the same as MergedWithPrevious, read from the right
        return [p[::-1] for p in reversed(merge_matches([(p[::-1], m) for p, m in parts[::-1]]))]
    if behavior == "MergedWithPrevious":
        return merge_matches(parts)
    raise ValueError(f"its Split behavior {behavior!r} is not supported")


def merge_matches(parts):
    """A match joins the piece before it, unless that piece is itself a match."""
    out, after_match = [], False
    for piece, match in parts:
        if match and not after_match and out:
            out[-1] += piece
        else:
            out.append(piece)
        after_match = match
    return [p for p in out if p]


def splitter(rx, behavior):
    return lambda pieces, first: [q for p in pieces for q in split_parts(rx, p, behavior)]


def metaspace(node):
    """SentencePiece's whitespace: spaces become "▁", one is prepended (to every piece, or to the
    one that starts the text, or never), and with split the pieces are cut before each "▁"."""
    rep = node.get("replacement", "▁")
    scheme = node.get("prepend_scheme") or ("always" if node.get("add_prefix_space", True)
                                            else "never")
    cut = regex.compile(regex.escape(rep))

    def run(pieces, first):
        out = []
        for k, p in enumerate(pieces):
            p = p.replace(" ", rep)
            if not p.startswith(rep) and (scheme == "always" or scheme == "first" and first
                                          and k == 0):
                p = rep + p
            if node.get("split", True) and p.find(rep, 1) > 0:   # else: one piece, as it is
                out += split_parts(cut, p, "MergedWithNext")
            else:
                out.append(p)
        return out
    return run


def split_node(node):
    if node.get("invert"):
        raise ValueError("its Split pre-tokenizer has invert=true, which is not supported")
    return splitter(pattern(node["pattern"]), node["behavior"])


WORDS = regex.compile(r"[^\p{White_Space}]+")
BERT_WORDS = regex.compile(f"{PUNCTUATION}|[^\\p{{White_Space}}{PUNCT}]+")
PRE_TOKENIZERS = {
    "WhitespaceSplit": lambda n: lambda pieces, first: [
        w for p in pieces for w in WORDS.findall(p)],
    "BertPreTokenizer": lambda n: lambda pieces, first: [
        w for p in pieces for w in BERT_WORDS.findall(p)],
    "Punctuation": lambda n: splitter(regex.compile(PUNCTUATION), n.get("behavior", "Isolated")),
    "Metaspace": metaspace,
    "Split": split_node,
    "ByteLevel": lambda n: lambda pieces, first: pieces,   # run inside the model: see ByteLevelBPE
    "Sequence": lambda n: sequence([build(PRE_TOKENIZERS, m, "pre-tokenizer")
                                    for m in n["pretokenizers"]]),
}


def parts(node):
    """A tokenizer.json component and, for a Sequence, its members, as a flat list."""
    if not node:
        return []
    members = next((node[k] for k in ("pretokenizers", "processors", "decoders", "normalizers")
                    if k in node), None)
    return [q for p in members for q in parts(p)] if members is not None else [node]


# ----------------------------------------------------------------------------------------------
# 4. Models: a pre-token -> its ids. Each keeps the ids of the words it has seen.


class Model:
    """What the models share: the vocabulary (token -> id) and a cache of words already done."""

    def __init__(self, vocab: dict):
        self.vocab, self.cache = vocab, {}

    def encode_words(self, words):
        if len(self.cache) >= CACHE_SIZE:
            self.cache.clear()
        cache, ids = self.cache, []
        for w in words:
            got = cache.get(w)
            ids += got if got is not None else cache.setdefault(w, self.encode_word(w))
        return ids

    def readable(self, token):  # a token as a person reads it (fill-mask candidates)
        return token


class BPE(Model):
    """`tokenizers`' BPE without a byte-level alphabet (Llama 2, Mistral, Gemma: SentencePiece
    vocabularies): a word's characters, a character missing from the vocabulary as its <0xNN>
    byte tokens (byte fallback) or else [UNK] (consecutive ones fused), merged pair by pair, the
    lowest-ranked merge first, the leftmost on ties (Sennrich et al. 2016, arXiv:1508.07909)."""

    def __init__(self, node, space="▁"):
        for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
            if node.get(key):
                raise ValueError(f"its BPE model sets {key}, which is not supported")
        super().__init__(node["vocab"])
        merges = [m.split(" ") if isinstance(m, str) else m for m in node.get("merges", [])]
        if bad := next((m for m in merges if len(m) != 2 or "".join(m) not in self.vocab), None):
            raise ValueError(f"its BPE merge {bad} does not make a token of the vocabulary")
        self.ranks, self.no_rank = {(a, b): r for r, (a, b) in enumerate(merges)}, len(merges)
        self.unk, self.fuse_unk = node.get("unk_token"), node.get("fuse_unk", False)
        self.byte_fallback, self.whole = node.get("byte_fallback", False), node.get("ignore_merges")
        self.alphabet = {t for t in self.vocab if len(t) == 1}
        # A merge puts x before "▁" only if some merge (a, b) has a ending in x, b starting with
        # "▁": a word cut before any other "▁" gives chunks (short, repeated: what the cache
        # keeps) that merge apart exactly as the whole word would.
        odd = any(t == self.unk or t.startswith("<0x") for m in merges for t in m)  # no chunks
        before = re.escape("".join(sorted({a[-1] for a, b in merges if b[0] == space})))
        s = re.escape(space)
        self.chunks = None if odd or space not in self.vocab else re.compile(   # re: quicker here
            f"{s}?(?:[^{s}]|(?<=[{before}]){s})*" if before else f"{s}?[^{s}]*")

    def encode_words(self, words):
        if self.whole:  # ignore_merges: a word in the vocabulary is that token
            return [i for w in words for i in ([self.vocab[w]] if w in self.vocab
                                                else self.encode_words_merged([w]))]
        return self.encode_words_merged(words)

    def encode_words_merged(self, words):
        chunks = words if self.chunks is None else [
            c for w in words for c in self.chunks.findall(w) if c]
        return super().encode_words(chunks)

    def symbols(self, word):
        """The word's characters as tokens before any merge: byte fallback, [UNK] fusion."""
        if self.alphabet.issuperset(word):
            return list(word)
        out, unk = [], None
        for c in word:
            if c in self.vocab:
                out += [unk] * (unk is not None) + [c]
                unk = None
            elif self.byte_fallback and all(f"<0x{b:02X}>" in self.vocab for b in c.encode()):
                out += [f"<0x{b:02X}>" for b in c.encode()]      # as `tokenizers`: [UNK] waits
            elif self.unk is not None:
                out += [unk] * (unk is not None and not self.fuse_unk)
                unk = self.unk
        return out + [unk] * (unk is not None)

    def encode_word(self, word):
        syms = self.symbols(word)
        return [self.vocab[t] for t in (self.merge(syms) if len(syms) < 64 else
                                        self.merge_long(syms))]

    def merge(self, syms):
        """Merge the lowest-ranked pair, the leftmost on ties, until no pair has a merge: the
        order of `tokenizers`' Word::merge_all, whose heap picks the same pair each time (here a
        list of pair ranks, scanned by min() and index() in C: quicker for a word's few symbols)."""
        ranks, none = self.ranks, self.no_rank
        pair = [ranks.get(p, none) for p in zip(syms, syms[1:])]     # pair[k]: syms[k], syms[k+1]
        while pair and (best := min(pair)) < none:
            k = pair.index(best)
            syms[k:k + 2] = [syms[k] + syms[k + 1]]
            del pair[k]
            if k < len(pair):
                pair[k] = ranks.get((syms[k], syms[k + 1]), none)
            if k:
                pair[k - 1] = ranks.get((syms[k - 1], syms[k]), none)
        return syms

    def merge_long(self, syms):
        """merge() for long words, with `tokenizers`' heap of (rank, position): O(n log n)."""
        n = len(syms)
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        heap = [(self.ranks[p], k) for k, p in enumerate(zip(syms, syms[1:])) if p in self.ranks]
        heapq.heapify(heap)
        while heap:
            rank, k = heapq.heappop(heap)
            j = nxt[k]
            if not alive[k] or j >= n or self.ranks.get((syms[k], syms[j])) != rank:
                continue                                # merged away, or a stale entry
            syms[k], alive[j], nxt[k] = syms[k] + syms[j], False, nxt[j]
            if nxt[k] < n:
                prv[nxt[k]] = k
            for a, b in ((prv[k], k), (k, nxt[k])):     # the pairs the new symbol makes
                if a >= 0 and b < n and (r := self.ranks.get((syms[a], syms[b]))) is not None:
                    heapq.heappush(heap, (r, a))
        return [s for s, keep in zip(syms, alive) if keep]


class ByteLevelBPE(Model):
    """A byte-level BPE (GPT-2, Llama 3, Qwen, BART) run by tiktoken, which merges the pair whose
    joined bytes rank lowest: the ranks follow the merge list and map back to the vocabulary's ids
    (BART's ids do not follow the merges: fairseq numbered its tokens by frequency). tiktoken also
    runs the pre-tokenizer, its Split regex (GPT-2's by default) becoming tiktoken's pattern."""

    def __init__(self, node, pre, added):
        import tiktoken  # lazy: only this model needs it
        super().__init__(node["vocab"])
        byte_level = [p for p in pre if p["type"] == "ByteLevel"][0]
        splits = [p for p in pre if p["type"] == "Split"]
        if byte_level.get("add_prefix_space") or {p["type"] for p in pre} - {"ByteLevel", "Split"}:
            raise ValueError(f"its byte-level pre-tokenizer {[p['type'] for p in pre]} with "
                             f"add_prefix_space={byte_level.get('add_prefix_space')} is not "
                             f"supported (only Split + ByteLevel without a prefix space)")
        if len(splits) > 1 or splits and (splits[0]["behavior"] != "Isolated"
                                          or byte_level.get("use_regex", True)):
            raise ValueError("its Split pre-tokenizer is not one isolated regex split")
        pat = splits[0]["pattern"] if splits else {"Regex": GPT2_SPLIT}
        try:  # added tokens are split off before BPE, never merged into: keep them out of the ranks
            spell = {i: bytes(BYTE_OF[c] for c in t) for t, i in self.vocab.items()
                     if i not in added}
        except KeyError as e:
            raise ValueError(f"its vocabulary has a character {e.args[0]!r} outside the "
                             f"byte-level alphabet") from None
        merges = [m.split(" ") if isinstance(m, str) else m for m in node.get("merges", [])]
        firsts = [self.vocab[a + b] for a, b in merges if self.vocab.get(a + b) in spell]
        ranks, self.ids = {}, []  # tiktoken rank -> vocabulary id: merge results, then the rest
        for i in firsts + sorted(spell):
            if spell[i] not in ranks:
                ranks[spell[i]] = len(ranks)
                self.ids.append(i)
        if missing := [b for b in range(256) if bytes([b]) not in ranks]:
            raise ValueError(f"its vocabulary lacks {len(missing)} of the 256 single-byte tokens")
        pat_str = pat.get("Regex") or regex.escape(pat["String"])
        self.enc = tiktoken.Encoding("hf", pat_str=pat_str, mergeable_ranks=ranks,
                                     special_tokens={})

    def encode_words(self, texts):  # no cache: tiktoken is fast on whole texts
        return [self.ids[r] for t in texts for r in self.enc.encode_ordinary(t)]

    def readable(self, token):
        return byte_level_decode([token])[0]


def bytes_to_unicode():
    """GPT-2's byte <-> printable character table: byte-level vocabularies spell bytes with it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))  # the other bytes (controls, space, ...) move up past Latin-1
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


NOWHERE = object()   # Unigram: no piece starts with this text


class Unigram(Model):
    """SentencePiece's unigram model (Kudo 2018, arXiv:1804.10959) as `tokenizers` runs it: the
    segmentation of a word with the highest total log-probability (Viterbi over the pieces found
    at each position, shortest first, a tie keeping the first found); a character no piece covers
    is [UNK] with the lowest score minus 10, consecutive ones fused, or its <0xNN> bytes."""

    def __init__(self, node):
        vocab = node["vocab"]
        super().__init__({piece: i for i, (piece, _) in enumerate(vocab)})
        if node.get("unk_id") is None:
            raise ValueError("its Unigram model has no unk_id, which is not supported")
        self.unk_id, self.byte_fallback = node["unk_id"], node.get("byte_fallback", False)
        self.unk_score = min(s for _, s in vocab) - 10.0
        self.longest = max(len(p) for p, _ in vocab)
        # every prefix of a piece -> the piece's score, or None for a prefix that is no piece
        self.trie = {p[:k]: None for p, _ in vocab for k in range(1, len(p))}
        self.trie.update(dict(vocab))

    def best_path(self, word):
        """-> best[e] = (score, start, is unk) of the best segmentation of word[:e]."""
        n, trie, longest, unk = len(word), self.trie, self.longest, self.unk_score
        best = [(0.0, 0, False)] + [None] * n
        for s in range(n):
            base, single = best[s][0], False
            for e in range(s + 1, min(n, s + longest) + 1):
                score = trie.get(word[s:e], NOWHERE)
                if score is NOWHERE:                    # no piece starts so: the trie ends here
                    break
                if score is not None:
                    single |= e == s + 1
                    if best[e] is None or base + score > best[e][0]:
                        best[e] = (base + score, s, False)
            if not single and (best[s + 1] is None or base + unk > best[s + 1][0]):
                best[s + 1] = (base + unk, s, True)
        return best

    def encode_word(self, word):
        best, pieces, e = self.best_path(word), [], len(word)
        while e > 0:                          # back from the end; [UNK] pieces fused
            _, s, unk = best[e]
            if unk and pieces and pieces[-1][1]:
                pieces[-1] = (word[s:e] + pieces[-1][0], True)
            else:
                pieces.append((word[s:e], unk))
            e = s
        ids = []
        for piece, _ in reversed(pieces):
            if piece in self.vocab:
                ids.append(self.vocab[piece])
            elif self.byte_fallback and all(f"<0x{b:02X}>" in self.vocab for b in piece.encode()):
                ids += [self.vocab[f"<0x{b:02X}>"] for b in piece.encode()]
            else:
                ids.append(self.unk_id)
        return ids


class WordPiece(Model):
    """BERT's WordPiece (Wu et al. 2016, arXiv:1609.08144): each word cut greedily into the
    longest vocabulary pieces from the left, "##" marking a continuation, [UNK] for a word that
    cannot be cut or is longer than max_input_chars_per_word."""

    def __init__(self, node):
        super().__init__(node["vocab"])
        self.unk, self.cont = self.vocab[node["unk_token"]], node["continuing_subword_prefix"]
        self.max_chars = node["max_input_chars_per_word"]

    def encode_word(self, word):
        if len(word) > self.max_chars:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and self.cont * bool(start) + word[start:end] not in self.vocab:
                end -= 1
            if end == start:
                return [self.unk]
            ids.append(self.vocab[self.cont * bool(start) + word[start:end]])
            start = end
        return ids


def build_model(tj, added):
    model, pre = tj["model"], parts(tj.get("pre_tokenizer"))
    kind = model.get("type")
    if kind == "BPE" and any(p["type"] == "ByteLevel" for p in pre):
        return ByteLevelBPE(model, pre, added)
    if any(p["type"] == "ByteLevel" for p in pre):
        raise ValueError(f"its ByteLevel pre-tokenizer with a {kind} model is not supported")
    if kind == "BPE":
        spaces = [p.get("replacement", "▁") for p in pre if p["type"] == "Metaspace"]
        return BPE(model, *spaces[:1])
    return build(MODELS, model, "model")


MODELS = {"Unigram": Unigram, "WordPiece": WordPiece}   # and BPE: see build_model


# ----------------------------------------------------------------------------------------------
# 5. Decoders: tokens -> strings, joined at the end; and the post-processor's special tokens


def byte_level_decode(tokens):
    """GPT-2's byte alphabet back to bytes; a token outside it (an added one) as its UTF-8."""
    raw = b"".join(bytes(BYTE_OF[c] for c in t) if all(c in BYTE_OF for c in t) else t.encode()
                   for t in tokens)
    return [raw.decode("utf-8", errors="replace")]


BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}
TIDY = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
        (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def wordpiece_decode(node):
    """"##" pieces join the word before, others follow a space; then the cleanup, per token."""
    prefix, tidy = node.get("prefix", "##"), TIDY if node.get("cleanup", True) else ()

    def run(tokens):
        out = []
        for k, t in enumerate(tokens):
            t = t if not k else t.replace(prefix, "", 1) if t.startswith(prefix) else " " + t
            for dirty, clean in tidy:
                t = t.replace(dirty, clean)
            out.append(t)
        return out
    return run


def metaspace_decode(node):
    """"▁" back to a space; the first token drops its "▁"s unless none was prepended."""
    rep = node.get("replacement", "▁")
    scheme = node.get("prepend_scheme") or ("always" if node.get("add_prefix_space", True)
                                            else "never")
    return lambda tokens: [t.replace(rep, "" if k == 0 and scheme != "never" else " ")
                           for k, t in enumerate(tokens)]


def byte_fallback_decode(tokens):
    """Runs of <0xNN> tokens become their bytes' text, or one U+FFFD per byte if not UTF-8."""
    out, run = [], bytearray()
    for t in [*tokens, None]:
        if t is not None and len(t) == 6 and regex.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            run.append(int(t[3:5], 16))
            continue
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out += ["\ufffd"] * len(run)
            run = bytearray()
        out += [t] * (t is not None)
    return out


def strip_decode(node):
    """Up to `start` leading and `stop` trailing copies of `content` off each token."""
    c, start, stop = node["content"], node["start"], node["stop"]

    def cut(t):
        a, b = 0, len(t)
        while a < min(start, len(t)) and t[a] == c:
            a += 1
        while len(t) - b < stop and b > a and t[b - 1] == c:
            b -= 1
        return t[a:b]
    return lambda tokens: [cut(t) for t in tokens]


def replace_decode(node):
    one = replace(node)
    return lambda tokens: [one(t) for t in tokens]


DECODERS = {
    "ByteLevel": lambda n: byte_level_decode,
    "WordPiece": wordpiece_decode,
    "Metaspace": metaspace_decode,
    "ByteFallback": lambda n: byte_fallback_decode,
    "Fuse": lambda n: lambda tokens: ["".join(tokens)],
    "Strip": strip_decode,
    "Replace": replace_decode,
    "Sequence": lambda n: sequence([build(DECODERS, m, "decoder") for m in n["decoders"]]),
}


def template(post):
    """(ids before, ids after) the text, as the post-processor adds them: Llama's BOS, T5's
    </s>, BART's <s> ... </s>, BERT's [CLS] ... [SEP]."""
    for p in parts(post):
        if p["type"] in ("RobertaProcessing", "BertProcessing"):
            return [p["cls"][1]], [p["sep"][1]]
        if p["type"] == "TemplateProcessing":
            names = [q["SpecialToken"]["id"] if "SpecialToken" in q else None for q in p["single"]]
            cut = names.index(None)  # where the text ($A) goes
            ids = [[i for n in side for i in p["special_tokens"][n]["ids"]]
                   for side in (names[:cut], names[cut + 1:])]
            return ids[0], ids[1]
        if p["type"] != "ByteLevel":  # ByteLevel only trims offsets
            raise ValueError(f"its post-processor {p['type']!r} is not supported")
    return [], []


# ----------------------------------------------------------------------------------------------
# 6. The whole tokenizer.json: added tokens, normalizer, pre-tokenizer, model, post-processor


WORD = regex.compile(r"\w")  # single_word: no word character may touch the token


class AddedTokens:
    """Added tokens, found in a text leftmost-longest before the model runs; lstrip/rstrip take
    the whitespace beside a token along, single_word ones must stand alone."""

    def __init__(self, tokens, normalize=None):
        self.id = {(normalize or str)(t["content"]): t for t in tokens}
        self.id.pop("", None)                                   # normalized away: never matched
        alternatives = sorted(self.id, key=len, reverse=True)     # longest first at each position
        self.rx = regex.compile("|".join(map(regex.escape, alternatives))) if self.id else None

    def split(self, text):
        """-> [(piece, token id or None, start)]: the non-empty pieces of text, in order."""
        out, at = [], 0
        for m in self.rx.finditer(text) if self.rx else ():
            t, start, stop = self.id[m.group()], m.start(), m.end()
            if t.get("single_word") and (start and WORD.match(text[start - 1])
                                         or stop < len(text) and WORD.match(text[stop])):
                continue
            while t.get("lstrip") and start > at and text[start - 1] in WHITESPACE:
                start -= 1                                  # (no slice: a copy of the text each)
            while t.get("rstrip") and stop < len(text) and text[stop] in WHITESPACE:
                stop += 1
            out += [(text[at:start], None, at)] * (start > at)
            out.append((text[start:stop], t["id"], start))
            at = stop
        return out + [(text[at:], None, at)] * (at < len(text))


class HFTokenizer:
    """A HF tokenizer.json, run as the `tokenizers` library runs it (same ids, same text)."""

    def __init__(self, tj: dict, meta: dict):
        added = tj.get("added_tokens") or []
        self.meta, self.prefix, self.suffix = meta, *template(tj.get("post_processor"))
        self.normalize = build(NORMALIZERS, tj["normalizer"], "normalizer") \
            if tj.get("normalizer") else str
        self.pre_tokenize = build(PRE_TOKENIZERS, tj["pre_tokenizer"], "pre-tokenizer") \
            if tj.get("pre_tokenizer") else lambda pieces, first: pieces
        self.model = build_model(tj, {t["id"] for t in added})
        self.decoder = build(DECODERS, tj["decoder"], "decoder") if tj.get("decoder") else None
        self.raw_added = AddedTokens([t for t in added if not t.get("normalized")])
        self.normalized_added = AddedTokens([t for t in added if t.get("normalized")],
                                            self.normalize)
        self.tokens = {i: t for t, i in self.model.vocab.items()}           # id -> token
        self.tokens.update({t["id"]: t["content"] for t in added})
        self.specials = {t["content"]: t["id"] for t in added if t.get("special")}
        self.special = set(self.specials.values())  # left out of decoded text
        self.vocab_size = max(self.tokens) + 1
        self.mask_id = next((t["id"] for t in added if t["content"] in ("[MASK]", "<mask>")), None)

    def encode(self, text, add_special_tokens=False):
        """The ids `tokenizers` gives: encode(text, add_special_tokens=...).ids."""
        ids = []
        for segment, token, start in self.raw_added.split(text):
            if token is not None:
                ids.append(token)
                continue
            for piece, token2, start2 in self.normalized_added.split(self.normalize(segment)):
                # (a text normalized to nothing has no pieces: "" encodes to no ids)
                if token2 is not None:
                    ids.append(token2)
                    continue
                ids += self.model.encode_words(self.pre_tokenize([piece], start == start2 == 0))
        return self.prefix + ids + self.suffix if add_special_tokens else ids

    def decode(self, ids):
        """decode(ids, skip_special_tokens=True): special tokens (and ids the vocabulary lacks,
        a padded embedding's) leave no text."""
        tokens = [self.tokens[i] for i in ids if i in self.tokens and i not in self.special]
        return "".join(self.decoder(tokens)) if self.decoder else " ".join(tokens)

    def piece(self, i):
        return self.model.readable(self.tokens.get(i, ""))


def hf_tokenizer(path):
    """The tokenizer of a HF tokenizer.json: the file, a directory holding one, or a checkpoint of
    ours (.pt) trained with one, which keeps a copy (--init_from=ckpt_best.pt takes it so), or a
    Hub model id (gpt2, org/name), whose tokenizer.json is downloaded once (hf.hub_dir)."""
    path = Path(path)
    if not path.exists():
        from hf import hub_dir  # lazy: only a Hub id needs it (and it imports torch)
        path = hub_dir(path, weights=False)
    if path.suffix == ".pt":
        from model import load_checkpoint  # lazy: only this path needs the model's loader
        meta = load_checkpoint(path, mmap=True).get("tokenizer") or {}  # no weights read
        if meta.get("kind") != "hf":
            raise ValueError(f"checkpoint {path} was trained with a {meta.get('kind')} tokenizer, "
                             f"not a HF tokenizer.json; pass that tokenizer's name instead")
        return from_json(meta["json"], f"the tokenizer.json in {path}")
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path} has no tokenizer.json" if path.is_dir() else
                         f"tokenizer file {path} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {file}: {getattr(e, 'strerror', None) or e}") from None
    return from_json(text, str(file))


def from_json(text, where="the tokenizer.json"):
    try:
        tj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON ({e.msg} at line {e.lineno} column {e.colno})"
                         ) from None
    try:
        if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
            raise ValueError("it has no \"model\" object, so it is not a HF tokenizer.json")
        return HFTokenizer(tj, {"kind": "hf", "json": text})
    except KeyError as e:
        raise ValueError(f"{where} lacks the entry {e.args[0]!r} where the loader expected it"
                         ) from None
    except (ValueError, TypeError, AttributeError, IndexError, struct.error, regex.error) as e:
        raise ValueError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------------------------
# 7. Entry points: from a name (--tokenizer) or from a meta dict (meta.json, a checkpoint)


def make_tokenizer(name, text, bpe_vocab_size=1024):
    """A tokenizer for --tokenizer=name fitted to `text`: char, byte, bpe (trained here), hf:PATH
    (a tokenizer.json, its directory, or a checkpoint trained with one) or a tiktoken encoding
    name."""
    if name == "char":
        return CharTokenizer("".join(sorted(set(text))))
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        return get_tokenizer({"kind": "bpe", "ranks": train_bpe(text, bpe_vocab_size),
                              "pat_str": GPT2_SPLIT})
    if name.startswith("hf:"):
        return hf_tokenizer(name[3:])
    return get_tokenizer({"kind": "tiktoken", "name": name})


def get_tokenizer(meta: dict):
    """Rebuild a tokenizer from its meta dict (meta.json's "tokenizer", a checkpoint's)."""
    kind = meta.get("kind")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "tiktoken":
        return TiktokenTokenizer(tiktoken_encoding(meta["name"]), meta)
    if kind == "bpe":
        return TiktokenTokenizer(bpe_encoding(meta["ranks"], meta["pat_str"]), meta)
    if kind == "hf":
        return from_json(meta["json"])
    raise ValueError(f"tokenizer meta of kind {kind!r} is not char, byte, tiktoken, bpe or hf")


class ObjectiveTokenizer:
    """A checkpoint's tokenizer plus the special tokens `sp` its objective (mlm, span, seq2seq,
    classify) was trained with (data/objectives.py: the tokenizer's own, or ours appended after its
    vocabulary): their names in text ("[MASK]", "<extra_id_0>"; a HF tokenizer's own as it spells
    them: "<mask>") encode to them and decode back to the names. A text is framed as training
    framed it."""

    def __init__(self, tok, objective, sp):
        from data import objectives  # lazy: objectives imports data/prepare.py, which imports us
        self.obj, self.tok, self.objective, self.sp = objectives, tok, objective, sp
        self.base = tok.vocab_size
        self.mask_id, self.eos = sp.ids.get("[MASK]"), sp.ids.get("[EOS]")
        self.framing = {sp.ids["[CLS]"], sp.ids["[SEP]"]} if objective == "mlm" else set()

    def encode(self, text):
        if self.objective == "mlm":  # [CLS] text [SEP], a row of mlm_batch (token types 0)
            return self.obj.fill_mask_ids(self.tok, text, self.sp)
        # a source as span (text [EOS]) and seq2seq (the tokenizer's BOS, text, [EOS]) frame it
        bos = self.sp.bos if self.objective == "seq2seq" else []
        return bos + self.obj.encode(self.tok, text, self.sp) + [self.eos]

    def decode(self, ids):
        return self.obj.decode(self.tok, [i for i in ids if i not in self.framing], self.sp)

    def piece(self, i):
        return self.obj.decode(self.tok, [i], self.sp)
