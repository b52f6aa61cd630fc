"""data/tokenizers.py's HF tokenizer.json runner against the `tokenizers` library, token for token.

Each family's tokenizer.json is built here with `tokenizers` itself, trained on a small local text
and assembled as the family ships it (normalizer, pre-tokenizer, model, post-processor, decoder,
added tokens): Llama 2 (legacy Prepend+Replace) and Mistral (Metaspace "first"), Gemma, T5,
ALBERT, DeBERTa-v3, BERT, GPT-2 and Llama 3. Ids (with and without special tokens) and decoded
text must equal the library's on a mixed text: several scripts, emoji, digits, runs of spaces,
tabs and newlines, control characters, and special tokens inside the text.
"""
import json
import struct
import unicodedata

import pytest
import torch

from data.tokenizers import HFTokenizer, from_json, hf_tokenizer, make_tokenizer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import (  # noqa: E402
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

MIXED = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "naïve café — crème brûlée, Straße, ÀÉÎÕÜ, İstanbul, ΟΔΟΣ",
    "東京タワーは日本の電波塔です。中文字符 and 한국어 텍스트",
    "Привет, как дела? Данные и модели.",
    "مرحبا بالعالم، هذا نص عربي.",
    "emoji 😀🎉 👍🏽 👨‍👩‍👧 🇫🇷🇯🇵 ❤️",
    "digits 1234567890 3.14159 2024-01-01 42 ½ ² Ⅻ ①",
    "  leading spaces and    runs\t\ttabs\n\n\nnewlines\r\nCRLF  ",
    " " * 7 + "x" + "\t" * 3 + "y\n",
    "ﬁ ﬂ ligatures, ｆｕｌｌｗｉｄｔｈ ＡＢＣ, ｶﾞ half-width, e\u0301 combining",
    "a\x0bb\x85c\x00d\ufffde\u200bf\x7fg\u3000h\u00a0i",
    "``quoted'' and \"double\" 'single' don't do not I'm you're they've it's",
    "supercalifragilisticexpialidociousfox x €100 $5 ^_^ ~tilde~ «quotes» ¿qué? 1,000.5",
    "def f(x):\n    return x ** 2  # sq\n",
    "<s>starts special</s> middle <unk> end</s>",
    "[CLS] [MASK] sat on the [MASK][MASK]. x[MASK]y [SEP]",
    "<extra_id_0> sentinel<extra_id_1>tokens <pad><start_of_turn>user\nhi<end_of_turn>",
    "",
    " ",
    "\n",
    "x",
]


VOCAB_SIZE = 400   # each trained vocabulary (tests/bench/bench_tokenizers.py trains larger ones)


def corpus():
    """A few KB of varied text to train on: words, numbers, code, accents, CJK, Cyrillic, Arabic,
    emoji; rarer characters stay out of small vocabularies (byte fallback, [UNK])."""
    g = torch.Generator().manual_seed(0)
    words = ["the", "quick", "brown", "fox", "über", "café", "東京", "данные", "مرحبا", "😀", "x",
             "return", "def", "=", "(", ")", ":", "\n", "    ", "123", "4567", "3.14", "'s", "!",
             "?", "—", "  ", "\t", "naïve", "Straße", "world", "hello", "jumps", "lazy", "dog"]
    draws = torch.randint(0, len(words), (60, 120), generator=g).tolist()
    return ["".join(words[i] + (" " if i % 3 else "") for i in row) for row in draws] + MIXED


def reference(tok):
    """The tokenizer through its JSON, as a file would give it to both sides."""
    text = tok.to_str()
    return Tokenizer.from_str(text), from_json(text)


# ----------------------------------------------------------------------------------------------
# A precompiled charsmap, as SentencePiece compiles nmt_nfkc: a darts-clone double array


def nmt_rules():
    """NFKC of the characters the texts use plus some compatibility blocks, their decomposed
    spellings, controls removed and odd spaces made plain: nmt_nfkc's kinds of rules."""
    blocks = [*range(0xA0, 0x180), *range(0xFB00, 0xFB07), *range(0xFF01, 0xFFA0),
              *range(0x2460, 0x2474), *range(0x2160, 0x2180)]
    chars = {c for t in MIXED for c in t} | set(map(chr, blocks))
    rules = {}
    for c in sorted(chars):
        if (nfkc := unicodedata.normalize("NFKC", c)) != c:
            rules[c] = nfkc
        if len(nfd := unicodedata.normalize("NFD", c)) > 1:
            rules[nfd] = unicodedata.normalize("NFKC", c)
    rules.update({chr(c): "" for c in [*range(1, 9), 0x0B, *range(0x0E, 0x20), 0x7F, 0x85]})
    rules.update({c: " " for c in "\t\n\r\u3000\u00a0\u200b"})
    rules["ｶﾞ"] = "ガ"     # two characters, one grapheme of 6 bytes: the per-character rule wins
    return rules


def charsmap(rules):
    """The blob: trie size, the double-array units (each: offset << 10 | has_leaf << 8 | label;
    a leaf holds 1 << 31 | the replacement's offset), then NUL-terminated replacements."""
    strings, at = bytearray(), {}
    for v in sorted(set(rules.values())):
        at[v] = len(strings)
        strings += v.encode() + b"\0"
    root = {}
    for key, value in rules.items():
        node = root
        for b in key.encode():
            node = node.setdefault(b, {})
        node[-1] = at[value]                             # -1: the leaf
    units, used, free = [0] * 512, bytearray(512), 1
    used[0], queue, bases = 1, [(root, 0)], {0}
    while queue:
        node, pos = queue.pop(0)
        labels = sorted(node)                            # the leaf (-1 -> slot 0) first
        slots = [max(c, 0) for c in labels]
        base = free ^ slots[0]
        while any(used[base ^ s] for s in slots) or base in bases:   # darts-clone: one owner
            base += 1
        bases.add(base)
        for s in slots:
            used[base ^ s] = 1
        units[pos] |= (pos ^ base) << 10 | (-1 in node) << 8
        for c in labels:
            units[base ^ max(c, 0)] = (1 << 31 | node[c]) if c < 0 else c
            if c >= 0:
                queue.append((node[c], base ^ c))
        while free < len(used) and used[free]:
            free += 1
        if base + 512 > len(units):
            units += [0] * 512
            used += bytearray(512)
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + bytes(strings)


@pytest.fixture(scope="module")
def precompiled():
    rules = nmt_rules()
    blob = charsmap(rules)
    ref = normalizers.Precompiled(blob)
    # the library reads our blob as meant: each rule, alone, is applied
    for key, value in rules.items():
        if len(key.encode()) < 6:
            assert ref.normalize_str(key) == value, key
    return blob


def test_precompiled_normalizer_equals_library(precompiled):
    tok = Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]"))
    tok.normalizer = ref = normalizers.Precompiled(precompiled)
    ours = from_json(tok.to_str()).normalize
    for text in MIXED + corpus():
        assert ours(text) == ref.normalize_str(text), text
    assert ours("ｆｕｌｌ①\x01\t") == "full1 " and ours("e\u0301") == "é"


# ----------------------------------------------------------------------------------------------
# The families: each tokenizer as its tokenizer.json has it


def byte_vocab(tok, specials):
    """A trained BPE's JSON with SentencePiece's layout: specials, the 256 <0xNN> byte tokens,
    then the trained tokens; only the specials are added tokens (as in Llama 2 and Gemma)."""
    tj = json.loads(tok.to_str())
    trained = [t for t in tj["model"]["vocab"] if t not in specials]
    order = specials + [f"<0x{b:02X}>" for b in range(256)] + trained
    tj["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    tj["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False,
                           "rstrip": False, "normalized": False, "special": True}
                          for i, t in enumerate(specials)]
    return tj


def sentencepiece_bpe(specials, prepend):
    """A BPE trained as SentencePiece trains one: words cut before each "▁", rare characters
    left out of the alphabet (they fall back to bytes)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend)
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=VOCAB_SIZE, limit_alphabet=60,
                                                          show_progress=False))
    tj = byte_vocab(tok, specials)
    for a, b in (("▁", "▁"), ("▁▁", "▁▁"), ("▁▁", "▁")):   # whitespace runs, as Gemma has them
        if a + b not in tj["model"]["vocab"]:
            tj["model"]["vocab"][a + b] = len(tj["model"]["vocab"])
            tj["model"]["merges"].append([a, b])
    return tj


def llama2(legacy=True):
    """Llama 2 / Mistral: BOS added; legacy: Prepend("▁") + Replace(" ", "▁") normalizer; else a
    Metaspace pre-tokenizer prepending only at the start of the text."""
    tj = sentencepiece_bpe(["<unk>", "<s>", "</s>"], "always")
    tok = Tokenizer.from_str(json.dumps(tj))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    else:
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    return tok


def gemma():
    """Gemma 2/3: Replace(" ", "▁"), no prefix space, BOS added, turn tokens special, a
    non-special added token matched after normalization."""
    tj = sentencepiece_bpe(["<pad>", "<eos>", "<bos>", "<unk>"], "never")
    tj["model"]["unk_token"] = "<unk>"
    tok = Tokenizer.from_str(json.dumps(tj))
    tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False)
                            for t in ("<start_of_turn>", "<end_of_turn>")])
    tok.add_tokens([tokenizers.AddedToken("fox jumps", normalized=True)])
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 2)])
    return tok


def unigram(specials, normalizer, pre, post, byte_fallback=False, unk="<unk>", **added):
    """A Unigram trained with these normalizer and pre-tokenizer, the specials first."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    extra = [f"<0x{b:02X}>" for b in range(256)] * byte_fallback
    tok.train_from_iterator(corpus(), trainers.UnigramTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials + extra, unk_token=unk, show_progress=False,
        max_piece_length=8))
    tj = json.loads(tok.to_str())
    tj["model"]["byte_fallback"] = byte_fallback
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] in specials]
    tok = Tokenizer.from_str(json.dumps(tj))
    tok.add_special_tokens([tokenizers.AddedToken(t, **kw) for t, kw in added.items()])
    tok.decoder = decoders.Metaspace()
    tok.post_processor = post
    return tok


def t5(precompiled, byte_fallback=False):
    """T5: Precompiled nmt_nfkc, whitespace split, "▁" before every word, "$A </s>", sentinels."""
    sentinels = {f"<extra_id_{i}>": {} for i in range(3)}
    return unigram(["<pad>", "</s>", "<unk>"], normalizers.Precompiled(precompiled),
                   pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                            pre_tokenizers.Metaspace()]),
                   processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)]),
                   byte_fallback, **sentinels)


def albert(precompiled):
    """ALBERT: quotes, NFKD, accents and case dropped, nmt_nfkc, space runs collapsed."""
    norm = normalizers.Sequence([
        normalizers.Replace("``", '"'), normalizers.Replace("''", '"'), normalizers.NFKD(),
        normalizers.StripAccents(), normalizers.Lowercase(), normalizers.Precompiled(precompiled),
        normalizers.Replace(Regex(" {2,}"), " ")])
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    post = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                         special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return unigram(["<pad>", "<unk>", "[CLS]", "[SEP]"], norm, pre, post,
                   **{"[MASK]": dict(lstrip=True, normalized=False)})


def deberta_v3(precompiled=None):
    """DeBERTa-v3: as transformers builds it (whitespace regex, NFC, right strip, punctuation
    split) or, with a charsmap, as its converter does (strip, nmt_nfkc, space runs)."""
    if precompiled is None:
        norm = normalizers.Sequence([normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "),
                                     normalizers.NFC(), normalizers.Strip(left=False, right=True)])
        pre = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.Metaspace()])
    else:
        norm = normalizers.Sequence([normalizers.Strip(), normalizers.Precompiled(precompiled),
                                     normalizers.Replace(Regex(" {2,}"), " ")])
        pre = pre_tokenizers.Metaspace()
    post = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                         special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return unigram(["[PAD]", "[CLS]", "[SEP]", "[UNK]"], norm, pre, post, unk="[UNK]",
                   **{"[MASK]": {}})


def bert(**normalizer):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=30))
    tok.normalizer = normalizers.BertNormalizer(**normalizer)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level(style):
    """GPT-2 (ByteLevel's own regex) or Llama 3 (a Split regex, NFC, BOS added)."""
    tok = Tokenizer(models.BPE())
    byte = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style == "gpt2")
    tok.pre_tokenizer = byte if style == "gpt2" else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), byte])
    tok.normalizer = None if style == "gpt2" else normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>", "<s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if style == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
    return tok


FAMILIES = {
    "llama2": lambda pc: llama2(),
    "mistral": lambda pc: llama2(legacy=False),
    "gemma": lambda pc: gemma(),
    "t5": t5,
    "t5_byte_fallback": lambda pc: t5(pc, byte_fallback=True),
    "albert": albert,
    "deberta_v3": lambda pc: deberta_v3(),
    "deberta_v3_converted": deberta_v3,
    "bert": lambda pc: bert(),
    "bert_cased": lambda pc: bert(lowercase=False),
    "bert_cased_stripped": lambda pc: bert(lowercase=False, strip_accents=True),
    "bert_keep_accents": lambda pc: bert(strip_accents=False, handle_chinese_chars=False),
    "bert_raw": lambda pc: bert(clean_text=False),
    "gpt2": lambda pc: byte_level("gpt2"),
    "llama3": lambda pc: byte_level("llama3"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_and_decode_equal_library(family, precompiled):
    ref, ours = reference(FAMILIES[family](precompiled))
    assert ours.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    seen = []
    for text in MIXED + corpus()[:20]:
        for special in (False, True):
            ids = ref.encode(text, add_special_tokens=special).ids
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        seen += ids
    assert len(set(seen)) > 150, "the texts should reach much of the vocabulary"
    g = torch.Generator().manual_seed(0)
    for _ in range(50):   # any ids decode as the library decodes them: bytes cut mid-character
        ids = torch.randint(0, ref.get_vocab_size(), (12,), generator=g).tolist()
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), ids


def test_each_family_exercises_its_special_paths(precompiled):
    """The comparisons above are strong only if the texts reach these paths."""
    _, llama = reference(llama2())
    ids = llama.encode("鬱 🦊 fox")
    assert sum(llama.tokens[i].startswith("<0x") for i in ids) == 7          # byte fallback
    assert llama.decode(ids) == "鬱 🦊 fox"
    _, t5_tok = reference(t5(precompiled))
    assert t5_tok.tokens[2] == "<unk>" and 2 in t5_tok.encode("🦊 x")             # [UNK]
    assert t5_tok.encode("x<extra_id_1>", add_special_tokens=True)[-2:] == [
        t5_tok.raw_added.id["<extra_id_1>"]["id"], 1]                            # sentinel, </s>
    _, g = reference(gemma())
    assert g.model.vocab["▁▁▁▁"] in g.encode("a     b")                          # space runs
    _, b = reference(bert())
    pieces = [b.piece(i) for text in MIXED for i in b.encode(text)]
    assert "[UNK]" in pieces and "[MASK]" in pieces and sum(p.startswith("##") for p in pieces) > 10


# ----------------------------------------------------------------------------------------------
# Loading: a directory or a file, hf:PATH, the meta dict, and one-line refusals


def test_loader_paths_and_meta(tmp_path):
    tok = llama2()
    tok.save(str(tmp_path / "tokenizer.json"))
    a, b = hf_tokenizer(tmp_path), make_tokenizer(f"hf:{tmp_path / 'tokenizer.json'}", "")
    text = MIXED[1]
    assert a.encode(text) == b.encode(text) == tok.encode(text, add_special_tokens=False).ids
    assert isinstance(a, HFTokenizer)
    assert a.meta == {"kind": "hf", "json": (tmp_path / "tokenizer.json").read_text()}
    from data.tokenizers import get_tokenizer
    assert get_tokenizer(json.loads(json.dumps(a.meta))).encode(text) == a.encode(text)


@pytest.mark.parametrize("edit, message", [
    (lambda tj: tj["normalizer"].update(type="Nmt"), "its normalizer 'Nmt' is not supported"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Digits", "individual_digits": True}),
     "its pre-tokenizer 'Digits' is not supported"),
    (lambda tj: tj["model"].update(type="WordLevel"), "its model 'WordLevel' is not supported"),
    (lambda tj: tj["decoder"].update(type="CTC"), "its decoder 'CTC' is not supported"),
    (lambda tj: tj["model"].pop("vocab"), "lacks the entry 'vocab'"),
    (lambda tj: tj["model"]["merges"].append(["zz", "qq"]), "merge ['zz', 'qq'] does not make"),
    (lambda tj: tj.pop("model"), 'no "model" object, so it is not a HF tokenizer.json'),
    (lambda tj: tj["normalizer"].update(type="Replace", pattern={"Regex": "("}, content=""),
     "tokenizer.json: "),
])
def test_unsupported_or_broken_files_are_one_line_errors(tmp_path, edit, message):
    tj = json.loads(llama2().to_str())
    tj["normalizer"] = tj["normalizer"] or {"type": "NFC"}
    edit(tj)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError) as e:
        hf_tokenizer(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert str(tmp_path / "tokenizer.json") in str(e.value)


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    for path, message in [(tmp_path, "is not JSON (Expecting property name enclosed in double "
                                     "quotes at line 1 column 2)"),
                          (tmp_path / "missing", "tokenizer file"),
                          (tmp_path / "empty_dir", "has no tokenizer.json")]:
        (tmp_path / "empty_dir").mkdir(exist_ok=True)
        with pytest.raises(ValueError) as e:
            hf_tokenizer(path)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="cannot read .*tokenizer.json"):
        hf_tokenizer(tmp_path)
