"""Sample from an anyformer checkpoint or a HF-format directory, streaming text as it is generated.

  python generate.py --checkpoint out/ckpt.pt --prompt "def main(" --max_new_tokens 200
  python generate.py --hf path/to/Llama-3.2-1B --prompt "The capital of France is" --temperature 0
  python generate.py --checkpoint out/ckpt.pt --ids 1,2,3       # raw token ids (no tokenizer needed)

The text goes to stdout as it is generated; tokens/s goes to stderr. A HF directory's byte-level BPE
tokenizer.json (GPT-2, Llama 3, Qwen) runs on tiktoken, so no other tokenizer library is needed. Bad
input (a sampling option out of range, a missing or corrupt file, a prompt longer than the context)
ends in one line on stderr, "error: ...", and exit status 2.
"""
import argparse
import json
import sys
import time
import unicodedata
from pathlib import Path

import torch

from data.prepare import GPT2_SPLIT, get_tokenizer
from model import Transformer, check_sampling, from_checkpoint, load_checkpoint

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SEPARATOR = "\n" + "-" * 40
NEEDS_IDS = "give the prompt as token ids with --ids 1,2,3"
DEFAULT_NEW_TOKENS = 256


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through main's handler, not argparse's usage block
        raise ValueError(f"{message} (see --help)")


def parse_args(argv):
    p = Parser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a ckpt.pt written by train.py")
    src.add_argument("--hf", help="a HF-format directory: config.json, safetensors, tokenizer.json")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="\n")
    prompt.add_argument("--prompt_file", help="read the prompt from this file")
    prompt.add_argument("--ids", help="the prompt as comma-separated token ids")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"default {DEFAULT_NEW_TOKENS}, or fewer where the model's context (block_size) ends sooner")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
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
# HF tokenizer.json (byte-level BPE) -> tiktoken


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


class ByteLevelBPE:
    """A HF byte-level BPE tokenizer.json (GPT-2, Llama 3, Qwen) run by tiktoken: vocabulary ids
    become tiktoken ranks, added tokens its special tokens, the pre-tokenizer's Split regex its pattern.
    Same ids as the `tokenizers` library (both merge the lowest-id pair first when ids follow the merges)."""

    NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}

    def __init__(self, tj: dict, name="hf"):
        import tiktoken  # lazy: only this path needs it
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
        pat_str = pattern.get("Regex") or __import__("re").escape(pattern["String"])
        specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        try:  # added tokens are split off before BPE, never merged into: keep them out of the ranks
            ranks = {bytes(to_byte[c] for c in tok): i for tok, i in model["vocab"].items()
                     if i not in specials.values()}
        except KeyError as e:
            raise ValueError(f"the vocabulary has a character {e.args[0]!r} outside the byte-level alphabet") from None
        if missing := [b for b in range(256) if bytes([b]) not in ranks]:
            raise ValueError(f"the vocabulary lacks {len(missing)} of the 256 single-byte tokens")
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
        self.prefix = template_prefix(tj.get("post_processor"))  # Llama 3's <|begin_of_text|>
        self.norms, self.vocab_size = norms, max([*ranks.values(), *specials.values()]) + 1
        self.known = set(ranks.values()) | set(specials.values())

    def encode(self, text):
        for form in self.norms:
            text = unicodedata.normalize(form, text)
        return self.prefix + self.enc.encode(text, allowed_special="all")  # as HF: added tokens match in text

    def decode(self, ids):  # ids the vocabulary lacks (a padded embedding) decode to nothing
        return self.enc.decode([i for i in ids if i in self.known], errors="replace")


def template_prefix(post):
    """Ids a TemplateProcessing post-processor puts before the text (a BOS); what follows is ignored."""
    for p in parts(post):
        if p.get("type") == "TemplateProcessing":
            prefix = []
            for piece in p["single"]:
                if "Sequence" in piece:
                    return prefix
                prefix += p["special_tokens"][piece["SpecialToken"]["id"]]["ids"]
    return []


def hf_tokenizer(hf_dir: Path):
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{hf_dir} has no tokenizer.json; {NEEDS_IDS}")
    try:
        return ByteLevelBPE(json.loads(path.read_text()), hf_dir.name)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: {e}; generate.py runs only byte-level BPE tokenizers, so {NEEDS_IDS}") from None


def hf_stop_tokens(hf_dir: Path):
    """eos_token_id of generation_config.json, else of config.json: an int or a list."""
    for name in ("generation_config.json", "config.json"):
        eos = json.loads((hf_dir / name).read_text()).get("eos_token_id") if (hf_dir / name).is_file() else None
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (eos,)
    return ()


# ----------------------------------------------------------------------------------------------
# The CLI


def load(args):
    """-> (model, tokenizer or None, stop token ids). Without a tokenizer the prompt must be --ids."""
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        meta = ckpt.get("tokenizer")
        return from_checkpoint(ckpt), get_tokenizer(meta) if meta else None, ()
    hf_dir = Path(args.hf)
    model = Transformer.from_pretrained(hf_dir)
    try:
        tok = hf_tokenizer(hf_dir)
    except ValueError:
        if args.ids is None:
            raise
        tok = None  # the ids are the prompt, and the output is printed as ids
    return model, tok, hf_stop_tokens(hf_dir)


def prompt_ids(args, tok, vocab_size):
    """-> (prompt token ids, the prompt as it is echoed)."""
    if args.ids is not None:
        try:
            ids = [int(s) for s in args.ids.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--ids {args.ids!r} must be comma-separated integers, e.g. --ids 1,2,3") from None
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"--ids has {bad[0]}, outside the model's vocabulary [0, {vocab_size})")
        echo = tok.decode(ids) if tok else ",".join(map(str, ids))
    elif tok is None:
        raise ValueError(f"{args.checkpoint} stores no tokenizer; {NEEDS_IDS}")
    else:
        try:
            echo = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
        except OSError as e:
            raise ValueError(f"cannot read --prompt_file {args.prompt_file}: {e.strerror}") from None
        ids = tok.encode(echo)
    if not ids:
        raise ValueError("the prompt is empty; pass some text (or --ids)")
    return ids, echo


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
        if self.tok is None:
            return self.write(f",{token}")
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


def run(args):
    device = pick_device(args.device)
    model, tok, stop = load(args)
    if model.config.architecture == "encoder_only":
        raise ValueError(f"{args.checkpoint or args.hf} holds an encoder_only model, which does not generate; "
                         f"pass a decoder_only or encoder_decoder one")
    model = model.to(device=device, dtype=DTYPES[args.dtype]).eval()
    ids, echo = prompt_ids(args, tok, model.config.vocab_size)
    x = torch.tensor([ids], dtype=torch.long, device=device)                # (1, T)
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
