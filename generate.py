"""Sample from an anyformer checkpoint or a HF-format directory, streaming text as it is generated.

  python generate.py --checkpoint out/ckpt.pt --prompt "def main(" --max_new_tokens 200
  python generate.py --hf path/to/Llama-3.2-1B --prompt "The capital of France is" --temperature 0
  python generate.py --checkpoint out/ckpt.pt --ids 1,2,3       # raw token ids (no tokenizer needed)
  python generate.py --hf path/to/bart-base --source "UN Chief Says There Is No <mask> in Syria" --temperature 0
  python generate.py --hf path/to/bert-base-uncased --fill_mask "The [MASK] sat on the mat."

Each architecture takes its own input: a decoder_only model continues --prompt, an encoder_decoder one
encodes --source once and streams the target it decodes, an encoder_only one fills the [MASK]s of
--fill_mask (the top-k candidates of each with their probabilities, then the text filled with the most
likely). The text goes to stdout as it is generated; tokens/s goes to stderr. A HF directory's
tokenizer.json is run here when it is a byte-level BPE (GPT-2, Llama 3, Qwen, BART; on tiktoken) or a
WordPiece (BERT); other tokenizers (SentencePiece: T5, Marian, ALBERT, DeBERTa-v3) need --ids. Bad input
(a sampling option out of range, a missing or corrupt file, a prompt longer than the context) ends in
one line on stderr, "error: ...", and exit status 2.
"""
import argparse
import json
import re
import string
import sys
import time
import unicodedata
from pathlib import Path
from typing import NamedTuple

import torch

from data.objectives import decode, encode, fill_mask_ids, special_ids
from data.prepare import GPT2_SPLIT, get_tokenizer
from model import Transformer, check_sampling, from_checkpoint, load_checkpoint

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SEPARATOR = "\n" + "-" * 40
DEFAULT_NEW_TOKENS = 256
DEFAULT_CANDIDATES = 5  # --fill_mask: candidates shown per mask without --top_k
# the option giving each architecture its input, and how to give it as ids when there is no tokenizer
INPUTS = {"prompt": "decoder_only", "prompt_file": "decoder_only", "source": "encoder_decoder",
          "source_file": "encoder_decoder", "fill_mask": "encoder_only"}
HOW = {"decoder_only": "--prompt TEXT (or --prompt_file)", "encoder_decoder": "--source TEXT (or --source_file)",
       "encoder_only": '--fill_mask "TEXT with [MASK]"'}
AS_IDS = {"decoder_only": "give the prompt as token ids with --ids 1,2,3",
          "encoder_decoder": "give the source as token ids with --ids 1,2,3, ending in the EOS id as a tokenizer would",
          "encoder_only": "give the text as token ids with --ids 1,2,3, the [MASK] id where a token is to be filled"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through main's handler, not argparse's usage block
        raise ValueError(f"{message} (see --help)")


def parse_args(argv):
    p = Parser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a ckpt.pt written by train.py")
    src.add_argument("--hf", help="a HF-format directory: config.json, safetensors, tokenizer.json")
    given = p.add_mutually_exclusive_group()
    given.add_argument("--prompt", help="decoder_only: the text to continue (default a newline)")
    given.add_argument("--prompt_file", help="decoder_only: read the prompt from this file")
    given.add_argument("--source", help="encoder_decoder: the text to encode; the output is the decoded target")
    given.add_argument("--source_file", help="encoder_decoder: read the source from this file")
    given.add_argument("--fill_mask", help="encoder_only: a text whose [MASK]s the model fills in")
    given.add_argument("--ids", help="the input as comma-separated token ids, used as given (nothing added)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"default {DEFAULT_NEW_TOKENS}, or fewer where the model's context (block_size) ends sooner")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (0 = off); "
                   f"with --fill_mask, the candidates shown per mask (default {DEFAULT_CANDIDATES})")
    p.add_argument("--top_p", type=float, default=None, help="keep the smallest set with this much mass")
    p.add_argument("--min_p", type=float, default=None, help="keep tokens with p >= min_p * max p")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    args = p.parse_args(argv)
    check_sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    for key in ("max_new_tokens", "num_samples"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ValueError(f"--{key}={getattr(args, key)} must be at least 1")
    return args


def pick_device(name):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return next(d for d, ok in available.items() if ok)
    if not available[name]:
        raise ValueError(f"--device {name} was asked for, but this torch ({torch.__version__}) sees no {name} "
                         f"device; use --device cpu or auto")
    return name


# ----------------------------------------------------------------------------------------------
# HF tokenizer.json: byte-level BPE (on tiktoken) and WordPiece


def bytes_to_unicode():
    """GPT-2's byte <-> printable character table: byte-level BPE vocabularies spell bytes with these."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))  # the other bytes (controls, space, ...) move up past Latin-1
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def parts(node):
    """A tokenizer.json component and, for a Sequence, its members, as a flat list."""
    if not node:
        return []
    members = node.get("pretokenizers") or node.get("processors") or node.get("decoders") or node.get("normalizers")
    return [q for p in members for q in parts(p)] if members else [node]


def template(post):
    """(ids before, ids after) the text, as the post-processor adds them: Llama 3's BOS, BART's <s> ... </s>,
    BERT's [CLS] ... [SEP]."""
    for p in parts(post):
        if p.get("type") in ("RobertaProcessing", "BertProcessing"):
            return [p["cls"][1]], [p["sep"][1]]
        if p.get("type") == "TemplateProcessing":
            names = [q["SpecialToken"]["id"] if "SpecialToken" in q else None for q in p["single"]]
            cut = names.index(None)  # where the text ($A) goes
            ids = [[i for n in side for i in p["special_tokens"][n]["ids"]] for side in (names[:cut], names[cut + 1:])]
            return ids[0], ids[1]
    return [], []


class HFTokenizer:
    """What every tokenizer.json shares: added tokens, split off the text before the model runs (one with
    lstrip/rstrip takes the whitespace beside it along), and the ids the post-processor puts around the text."""

    def __init__(self, tj: dict):
        tokens = sorted(tj.get("added_tokens", []), key=lambda t: -len(t["content"]))  # HF: leftmost-longest
        self.added = {t["content"]: t["id"] for t in tokens}
        self.special = {t["id"] for t in tokens if t.get("special")}  # left out of printed text, as HF's pipelines
        self.added_re = re.compile("|".join(r"\s*" * bool(t.get("lstrip")) + re.escape(t["content"])
                                            + r"\s*" * bool(t.get("rstrip")) for t in tokens)) if tokens else None
        self.prefix, self.suffix = template(tj.get("post_processor"))

    def encode(self, text):
        """HF's tokenizer(text).input_ids."""
        ids, at = [], 0
        for m in self.added_re.finditer(text) if self.added_re else ():
            token = m.group() if m.group() in self.added else m.group().strip()   # without lstrip/rstrip's space
            ids += self.encode_text(text[at:m.start()]) + [self.added[token]]
            at = m.end()
        return self.prefix + ids + self.encode_text(text[at:]) + self.suffix


class ByteLevelBPE(HFTokenizer):
    """A HF byte-level BPE tokenizer.json (GPT-2, Llama 3, Qwen, BART) run by tiktoken, which merges the pair
    whose joined bytes rank lowest: the ranks follow the merge list and map back to the vocabulary's ids
    (BART's do not follow the merges: fairseq numbered its tokens by frequency). The pre-tokenizer's Split
    regex becomes tiktoken's pattern. Same ids as the `tokenizers` library."""

    NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}

    def __init__(self, tj: dict):
        import tiktoken  # lazy: only this path needs it
        super().__init__(tj)
        model, pre, dec = tj.get("model") or {}, parts(tj.get("pre_tokenizer")), parts(tj.get("decoder"))
        byte_level = [p for p in pre if p.get("type") == "ByteLevel"]
        if model.get("type") != "BPE" or not byte_level or "ByteLevel" not in [d.get("type") for d in dec]:
            raise ValueError(f"the tokenizer is {model.get('type')} with pre-tokenizer "
                             f"{[p.get('type') for p in pre]}, not a byte-level BPE (GPT-2, Llama 3, Qwen style)")
        norms = [n.get("type") for n in parts(tj.get("normalizer"))]
        if set(norms) - self.NORMALIZERS or byte_level[0].get("add_prefix_space"):
            raise ValueError(f"the tokenizer's normalizer {norms} or add_prefix_space is not supported")
        splits = [p for p in pre if p.get("type") == "Split"]
        if splits and (splits[0].get("behavior") != "Isolated" or splits[0].get("invert")):
            raise ValueError("the tokenizer's Split pre-tokenizer is not the usual isolated regex split")
        pattern = splits[0]["pattern"] if splits else {"Regex": GPT2_SPLIT}
        pat_str = pattern.get("Regex") or re.escape(pattern["String"])
        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        added = set(self.added.values())
        try:  # added tokens are split off before BPE, never merged into: keep them out of the ranks
            spell = {i: bytes(to_byte[c] for c in tok) for tok, i in model["vocab"].items() if i not in added}
        except KeyError as e:
            raise ValueError(f"the vocabulary has a character {e.args[0]!r} outside the byte-level alphabet") from None
        vocab = {tok: i for tok, i in model["vocab"].items() if i in spell}
        merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
        ranks, self.ids = {}, []  # tiktoken rank -> vocabulary id; merge results first, then the rest by id
        for i in [vocab[a + b] for a, b in merges if a + b in vocab] + sorted(spell):
            if spell[i] not in ranks:
                ranks[spell[i]] = len(ranks)
                self.ids.append(i)
        if missing := [b for b in range(256) if bytes([b]) not in ranks]:
            raise ValueError(f"the vocabulary lacks {len(missing)} of the 256 single-byte tokens")
        self.enc = tiktoken.Encoding("hf", pat_str=pat_str, mergeable_ranks=ranks, special_tokens={})
        self.bytes = {**spell, **{i: tok.encode() for tok, i in self.added.items()}}      # id -> its bytes
        self.norms, self.vocab_size = norms, max(self.bytes) + 1

    def encode_text(self, text):
        for form in self.norms:
            text = unicodedata.normalize(form, text)
        return [self.ids[r] for r in self.enc.encode_ordinary(text)]

    def decode(self, ids):  # special tokens and ids the vocabulary lacks (a padded embedding) decode to nothing
        return b"".join(self.bytes.get(i, b"") for i in ids if i not in self.special).decode(errors="replace")

    def piece(self, i):
        return self.bytes.get(i, b"").decode(errors="replace")


CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))  # BertNormalizer's ideograph blocks
TIDY = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
        (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # the WordPiece decoder's cleanup


class WordPiece(HFTokenizer):
    """A HF WordPiece tokenizer.json (BERT): BertNormalizer, BertPreTokenizer (words split at whitespace and
    punctuation), then each word cut greedily into the longest vocabulary pieces from the left, "##" marking
    a continuation, [UNK] for a word that cannot be cut (Wu et al. 2016, arXiv:1609.08144). Same ids as the
    `tokenizers` library."""

    def __init__(self, tj: dict):
        super().__init__(tj)
        model, norm, pre, dec = (tj.get(k) or {} for k in ("model", "normalizer", "pre_tokenizer", "decoder"))
        kinds = (norm.get("type", "BertNormalizer"), pre.get("type"), dec.get("type"))
        if kinds != ("BertNormalizer", "BertPreTokenizer", "WordPiece"):
            raise ValueError(f"the WordPiece tokenizer's normalizer, pre-tokenizer and decoder are {kinds}, "
                             f"not BERT's (BertNormalizer, BertPreTokenizer, WordPiece)")
        self.vocab, self.cont, self.max_chars = model["vocab"], model["continuing_subword_prefix"], \
            model["max_input_chars_per_word"]
        self.unk, self.tidy = self.vocab[model["unk_token"]], dec.get("cleanup", True)
        self.clean, self.cjk, self.lower = (norm.get(k, False) for k in ("clean_text", "handle_chinese_chars",
                                                                          "lowercase"))
        self.strip = self.lower if norm.get("strip_accents") is None else norm["strip_accents"]
        self.pieces = {i: t for t, i in {**self.vocab, **self.added}.items()}              # id -> its text
        self.vocab_size = max(self.pieces) + 1

    def normalize(self, text):  # BertNormalizer's steps, in its order
        if self.clean:  # drop U+FFFD and control characters; any other whitespace becomes a space
            text = "".join(" " if c.isspace() else c for c in text
                           if c != "\ufffd" and (c in "\t\n\r" or unicodedata.category(c)[0] != "C"))
        if self.cjk:  # an ideograph is a word of its own
            text = "".join(f" {c} " if any(a <= ord(c) <= b for a, b in CJK) else c for c in text)
        if self.strip:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        return "".join(c.lower() for c in text) if self.lower else text  # per character: no final-sigma rule

    def encode_text(self, text):
        words, word = [], ""
        for c in self.normalize(text):  # BertPreTokenizer: punctuation is a word, whitespace ends one
            if c.isspace() or c in string.punctuation or unicodedata.category(c)[0] == "P":
                words += [word] * bool(word) + [c] * (not c.isspace())
                word = ""
            else:
                word += c
        return [i for w in words + [word] * bool(word) for i in self.word_ids(w)]

    def word_ids(self, word):
        """The longest piece in the vocabulary from the left, then the longest "##" piece, and so on."""
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

    def decode(self, ids):  # the WordPiece decoder: "##" pieces join the word before, others follow a space
        words = [self.pieces[i] for i in ids if i in self.pieces and i not in self.special]
        text = ""
        for k, w in enumerate(words):
            w = w if not k else w[len(self.cont):] if w.startswith(self.cont) else " " + w
            for dirty, clean in TIDY if self.tidy else ():  # per piece, as the decoder tidies
                w = w.replace(dirty, clean)
            text += w
        return text

    def piece(self, i):
        return self.pieces.get(i, "")


HF_TOKENIZERS = {"BPE": ByteLevelBPE, "WordPiece": WordPiece}  # tokenizer.json's model type -> its runner


def hf_tokenizer(hf_dir: Path):
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{hf_dir} has no tokenizer.json")
    tj = json.loads(path.read_text())
    kind = (tj.get("model") or {}).get("type")
    if kind not in HF_TOKENIZERS:
        raise ValueError(f"{path} is a {kind} tokenizer (SentencePiece style: T5, Marian, ALBERT, DeBERTa-v3); "
                         f"generate.py runs byte-level BPE and WordPiece ones")
    try:
        return HF_TOKENIZERS[kind](tj)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: {e}; generate.py runs byte-level BPE and BERT-style WordPiece tokenizers") from None


def hf_stop_tokens(hf_dir: Path):
    """eos_token_id of generation_config.json, else of config.json: an int or a list."""
    for name in ("generation_config.json", "config.json"):
        eos = json.loads((hf_dir / name).read_text()).get("eos_token_id") if (hf_dir / name).is_file() else None
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (eos,)
    return ()


def hf_mask_id(hf_dir: Path):
    """The id of the added token [MASK] (BERT, ALBERT, DeBERTa-v3) in tokenizer.json, or None."""
    path = hf_dir / "tokenizer.json"
    added = json.loads(path.read_text()).get("added_tokens", []) if path.is_file() else []
    return next((t["id"] for t in added if t["content"] == "[MASK]"), None)


# ----------------------------------------------------------------------------------------------
# Our checkpoints: the special tokens of data/objectives.py


class ObjectiveTokenizer:
    """A checkpoint's tokenizer plus the special tokens objective mlm, span or seq2seq appended after its
    vocabulary: their names in text ("[MASK]", "<extra_id_0>") encode to them and decode back to the names.
    A text is framed as training framed it."""

    def __init__(self, tok, objective):
        self.tok, self.base, self.objective = tok, tok.vocab_size, objective
        sp = special_ids(self.base)
        self.mask_id, self.eos = sp["[MASK]"], sp["[EOS]"]
        self.framing = {sp["[CLS]"], sp["[SEP]"]} if objective == "mlm" else set()  # not printed

    def encode(self, text):
        if self.objective == "mlm":  # [CLS] text [SEP], a row of mlm_batch (token types 0)
            return fill_mask_ids(self.tok, text, self.base)
        return encode(self.tok, text, self.base) + [self.eos]  # source [EOS], as span and seq2seq batches end it

    def decode(self, ids):
        return decode(self.tok, [i for i in ids if i not in self.framing], self.base)

    def piece(self, i):
        return decode(self.tok, [i], self.base)


# ----------------------------------------------------------------------------------------------
# The CLI


class Loaded(NamedTuple):
    model: torch.nn.Module
    tok: object           # encode(text) -> ids, decode(ids) -> text, piece(id) -> text; None: --ids only
    stop: tuple           # ids that end a sample
    mask_id: int | None   # the token --fill_mask fills
    n_fill: int           # a mask is filled with an id below this (ours: a text token, never a special one)


def load(args):
    """The model and what reads and writes its tokens. Without a tokenizer the input must be --ids."""
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        model, meta, objective = from_checkpoint(ckpt), ckpt.get("tokenizer"), ckpt.get("objective", "lm")
        tok = get_tokenizer(meta) if meta else None
        if tok is None or objective == "lm":
            return Loaded(model, tok, (), None, 0)
        tok = ObjectiveTokenizer(tok, objective)
        return Loaded(model, tok, (tok.eos,), tok.mask_id, tok.base)
    hf_dir = Path(args.hf)
    model = Transformer.from_pretrained(hf_dir)
    arch = model.config.architecture
    try:
        tok = hf_tokenizer(hf_dir)
    except ValueError as e:
        if args.ids is None:
            raise ValueError(f"{e}; {AS_IDS[arch]}") from None
        tok = None  # the ids are the input, and the output is printed as ids
    mask_id = hf_mask_id(hf_dir) if arch == "encoder_only" else None
    return Loaded(model, tok, hf_stop_tokens(hf_dir), mask_id, model.config.vocab_size)


def input_ids(args, arch, tok, name, vocab_size):
    """-> (the input's token ids, the text a decoder_only model's output continues)."""
    given = next((k for k in INPUTS if getattr(args, k) is not None), None)
    if given and INPUTS[given] != arch:
        raise ValueError(f"--{given} is for {INPUTS[given]} models, but {name} is {arch}: give its input with "
                         f"{HOW[arch]}")
    if args.ids is not None:
        try:
            ids = [int(s) for s in args.ids.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--ids {args.ids!r} must be comma-separated integers, e.g. --ids 1,2,3") from None
        if bad := [i for i in ids if not 0 <= i < vocab_size]:
            raise ValueError(f"--ids has {bad[0]}, outside the model's vocabulary [0, {vocab_size})")
        if not ids:
            raise ValueError("--ids is empty; pass some token ids")
        return ids, tok.decode(ids) if tok else ",".join(map(str, ids))
    if given is None and arch != "decoder_only":
        raise ValueError(f"{name} is {arch}: give its input with {HOW[arch]}")
    if tok is None:
        raise ValueError(f"{name} stores no tokenizer; {AS_IDS[arch]}")
    text = getattr(args, given) if given else "\n"
    if given in ("prompt_file", "source_file"):
        try:
            text = Path(text).read_text()
        except OSError as e:
            raise ValueError(f"cannot read --{given} {text}: {e.strerror}") from None
    if not text:
        raise ValueError("the input is empty; pass some text (or --ids)")
    return tok.encode(text), text


class Streamer:
    """The generate() callback: prints each new token as it comes. Text is decoded in pieces that end
    on a whole character, so a UTF-8 character split over several byte tokens prints once, complete."""

    def __init__(self, tok, stop, echo=""):
        self.tok, self.stop, self.echo, self.pending, self.count = tok, set(stop), echo, [], 0

    def __call__(self, ids):                                     # ids: (1,) the new token
        token = int(ids[0])
        if not self.count:  # the prompt is echoed with the first token: an input error leaves stdout empty
            self.write(self.echo)
        self.count += 1
        if token in self.stop:
            return
        if self.tok is None:  # ids, comma-separated after the echoed ones
            return self.write(f"{',' if self.echo or self.count > 1 else ''}{token}")
        self.pending.append(token)
        text = self.tok.decode(self.pending)
        if not text.endswith("\ufffd") or len(self.pending) >= 8:  # 8 tokens cover any 4-byte character
            self.write(text)
            self.pending = []

    def write(self, text):
        sys.stdout.write(text)
        sys.stdout.flush()

    def flush(self):
        if self.pending:
            self.write(self.tok.decode(self.pending))
            self.pending = []


def default_new_tokens(model, prompt_len):
    """DEFAULT_NEW_TOKENS, or fewer if the context ends sooner (a learned position table has no more rows)."""
    if model.config.architecture == "encoder_decoder":   # the target starts from one start token
        return max(1, min(DEFAULT_NEW_TOKENS, model.decoder.config.block_size - 1))
    return max(1, min(DEFAULT_NEW_TOKENS, model.config.block_size - prompt_len))


def sample(model, x, tok, stop, generator, echo, args):
    """One sample streamed to stdout; its speed to stderr."""
    # an encoder-decoder's output does not continue the prompt: no echo
    streamer = Streamer(tok, stop, echo if model.config.architecture == "decoder_only" else "")
    n = args.max_new_tokens or default_new_tokens(model, x.shape[1])
    t0 = time.perf_counter()
    model.generate(x, n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   min_p=args.min_p, repetition_penalty=args.repetition_penalty, stop_tokens=stop,
                   generator=generator, callback=streamer)
    streamer.flush()
    dt = time.perf_counter() - t0
    streamer.write("\n")
    print(f"{streamer.count} tokens in {dt:.2f} s: {streamer.count / dt:.1f} tokens/s", file=sys.stderr)


@torch.no_grad()
def fill_mask(model, x, tok, mask_id, n_fill, top_k):
    """For each mask in x (1, T), one line: its top_k candidates with their probabilities; then the input
    with every mask replaced by its most likely candidate."""
    k = DEFAULT_CANDIDATES if top_k is None else top_k
    if k < 1:
        raise ValueError(f"--top_k={top_k}: --fill_mask shows at least one candidate per mask")
    where = (x[0] == mask_id).nonzero().flatten()                              # (M,) mask positions
    if not len(where):
        raise ValueError(f"the input has no [MASK] (id {mask_id}); write [MASK] where a token is to be filled in")
    probs = model(x).logits[0, where].float().softmax(-1)[:, :n_fill]        # (M, n_fill)
    top = probs.topk(min(k, n_fill))
    show = (lambda i: repr(tok.piece(i))) if tok else str
    for m, (p, ids) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"[MASK] {m}: " + ", ".join(f"{show(i)} {q:.4f}" for i, q in zip(ids, p)))
    filled = x[0].index_put((where,), top.indices[:, 0]).tolist()
    print(tok.decode(filled) if tok else ",".join(map(str, filled)))


def run(args):
    device = pick_device(args.device)
    model, tok, stop, mask_id, n_fill = load(args)
    arch, name = model.config.architecture, args.checkpoint or args.hf
    ids, echo = input_ids(args, arch, tok, name, model.config.vocab_size)
    if arch == "encoder_only" and mask_id is None:
        raise ValueError(f"{name} has no [MASK] token to fill (our checkpoints have one when trained with "
                         f"objective=mlm; a HF directory's tokenizer.json names it)")
    model = model.to(device=device, dtype=DTYPES[args.dtype]).eval()
    x = torch.tensor([ids], dtype=torch.long, device=device)                # (1, T)
    if arch == "encoder_only":
        return fill_mask(model, x, tok, mask_id, n_fill, args.top_k)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        if i:
            print(SEPARATOR)
        sample(model, x, tok, stop, generator, echo, args)


def main(argv=None):
    try:
        run(parse_args(argv))
    except ValueError as e:  # everything a user can cause is a ValueError with a one-line message
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
