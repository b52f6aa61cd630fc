"""Sample from an anyformer checkpoint or a HF-format directory, streaming text as it is generated.

  python generate.py --checkpoint out/ckpt.pt --prompt "def main(" --max_new_tokens 200
  python generate.py --hf path/to/gemma-3-1b --prompt "The capital of France is" --temperature 0
  python generate.py --hf path/to/t5-small --source "translate English to German: Hello"
  python generate.py --hf path/to/bert-base-uncased --fill_mask "The [MASK] sat on the mat."
  python generate.py --checkpoint out/ckpt.pt --ids 1,2,3       # raw token ids, used as given
  python generate.py --checkpoint out/ckpt.pt --classify "a superb film"   # objective=classify
  python generate.py --hf path/to/llama --prompt "Hi" --quantize int8 --compile    # faster decoding
  python generate.py --hf path/to/llama --prompt "Hi" --draft path/to/small-llama   # speculative
  python generate.py --hf path/to/t5-small --source_file in.txt --batch --num_beams 4

Each architecture takes its own input: a decoder_only model continues --prompt, an
encoder_decoder one encodes --source once and streams the target it decodes, an encoder_only one
fills the [MASK]s of --fill_mask (the top-k candidates of each with their probabilities, then the
text filled with the most likely). Text is read and written by the checkpoint's tokenizer or the
HF directory's tokenizer.json (data/tokenizers.py), with the special tokens the model expects
(BOS, </s>, [CLS] ... [SEP]); sampling stops at the end-of-sequence token. The text goes to stdout
as it is generated; tokens/s goes to stderr. Bad input ends in one line on stderr, "error: ...",
and exit status 2.
A checkpoint trained with objective=classify takes --classify TEXT instead and prints the
predicted label, then each class's probability.

Decoding options: --quantize int8 (int8 weights: decoding.quantize), --compile (the decode step
compiled), --draft with --draft_tokens (speculative decoding: the same text as without it, greedy,
or the same distribution, sampling), --num_beams with --length_penalty and --early_stopping (beam
search as HF generate runs it), --batch (each line of --prompt_file / --source_file is a prompt:
they decode as one padded batch, each printed when all are done).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from data.objectives import checkpoint_specials, class_probs
from data.tokenizers import ObjectiveTokenizer, get_tokenizer, hf_tokenizer
from decoding import QUANTIZERS, beam_search, quantize, speculative_generate
from hf import hub_dir
from model import Transformer, check_sampling, from_checkpoint, load_checkpoint

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SEPARATOR = "\n" + "-" * 40
DEFAULT_NEW_TOKENS = 256
DEFAULT_CANDIDATES = 5  # --fill_mask: candidates shown per mask without --top_k
DEFAULT_TEMPERATURE = 0.8
EARLY_STOPPING = {"false": False, "true": True, "never": "never"}  # --early_stopping, as HF's
# the option giving each architecture its input, and how to give it as ids without a tokenizer
INPUTS = {"prompt": "decoder_only", "prompt_file": "decoder_only", "source": "encoder_decoder",
          "source_file": "encoder_decoder", "fill_mask": "encoder_only"}
HOW = {"decoder_only": "--prompt TEXT (or --prompt_file)",
       "encoder_decoder": "--source TEXT (or --source_file)",
       "encoder_only": '--fill_mask "TEXT with [MASK]"'}
AS_IDS = {"decoder_only": "give the prompt as token ids with --ids 1,2,3",
          "encoder_decoder": "give the source as token ids with --ids 1,2,3, ending in the EOS id "
                             "as a tokenizer would",
          "encoder_only": "give the text as token ids with --ids 1,2,3, the [MASK] id where a "
                          "token is to be filled"}


# other inference scripts' options, named in the error with ours (the Enhanced Transformer seed's)
FOREIGN_FLAGS = {"--max_length": "--max_new_tokens (tokens after the prompt)",
                 "--model": "--checkpoint (or --hf DIR)", "--model_path": "--checkpoint",
                 "--precision": "--dtype", "--num_return_sequences": "--num_samples"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through main's handler, not argparse's usage block
        words = {w.partition("=")[0] for w in message.split()}
        ours = "".join(f"; {k} is {v} here" for k, v in FOREIGN_FLAGS.items() if k in words)
        raise ValueError(f"{message}{ours} (see --help)")


def finite(text):  # argparse's type for floats: "nan" and "inf" are refused as invalid values
    if not math.isfinite(x := float(text)):
        raise ValueError(text)
    return x


def parse_args(argv):
    p = Parser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a ckpt.pt written by train.py")
    src.add_argument("--hf", help="a HF-format directory (config.json, safetensors, "
                     "tokenizer.json) or a Hub model id (gpt2, org/name: downloaded once)")
    given = p.add_mutually_exclusive_group()
    given.add_argument("--prompt", help="decoder_only: the text to continue (default a newline)")
    given.add_argument("--prompt_file", help="decoder_only: read the prompt from this file")
    given.add_argument("--source", help="encoder_decoder: the text to encode; the output is the "
                                        "decoded target")
    given.add_argument("--source_file", help="encoder_decoder: read the source from this file")
    given.add_argument("--fill_mask", help="encoder_only: a text whose [MASK]s the model fills in")
    given.add_argument("--ids", help="the input as comma-separated token ids, used as given "
                                     "(nothing added)")
    given.add_argument("--classify", help="a checkpoint trained with objective=classify: the text "
                                          "to label")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"default {DEFAULT_NEW_TOKENS} (an encoder-decoder's fewer where its "
                        f"decoder's position table ends sooner); past a learned position table "
                        f"a decoder keeps its last block_size tokens, re-encoded for each token")
    p.add_argument("--temperature", type=finite, default=None,
                   help=f"0 = greedy (default {DEFAULT_TEMPERATURE})")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (0 = "
                   f"off); with --fill_mask, the candidates shown per mask (default "
                   f"{DEFAULT_CANDIDATES})")
    p.add_argument("--top_p", type=finite, default=None, help="keep the smallest set with "
                   "this much mass")
    p.add_argument("--min_p", type=finite, default=None, help="keep tokens with p >= min_p * max p")
    p.add_argument("--repetition_penalty", type=finite, default=1.0, help="1 = off")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--quantize", choices=QUANTIZERS, help="int8 weights for the Linear layers "
                   "where that is faster (the draft's too)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (a "
                   "one-time compile, then less per-token overhead; CUDA graphs on a GPU)")
    p.add_argument("--draft", help="speculative decoding: a smaller model over the same "
                   "vocabulary (a ckpt.pt, a HF-format directory or a Hub id) drafts tokens the "
                   "model checks")
    p.add_argument("--draft_tokens", type=int, default=4, help="tokens drafted per check")
    p.add_argument("--num_beams", type=int, default=1, help="beam search with this many beams")
    p.add_argument("--length_penalty", type=finite, default=1.0, help="beam search: a finished "
                   "beam scores sum(log p) / length**length_penalty")
    p.add_argument("--early_stopping", choices=EARLY_STOPPING, default="false",
                   help="beam search stops: false, when no beam can improve; true, as soon as "
                        "num_beams are finished; never, at the length limit's best case")
    p.add_argument("--batch", action="store_true", help="each line of --prompt_file or "
                   "--source_file is a prompt: one padded batch")
    args = p.parse_args(argv)
    check_decoding(args)
    args.temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    check_sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    for key in ("max_new_tokens", "num_samples", "num_beams", "draft_tokens"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ValueError(f"--{key}={getattr(args, key)} must be at least 1")
    if not 0 <= args.seed < 2 ** 63:
        raise ValueError(f"--seed={args.seed} must be in [0, 2**63)")
    return args


def check_decoding(args):
    """The decoding options that do not go together, each a one-line error."""
    sampling = [f"--{k}" for k in ("temperature", "top_k", "top_p", "min_p")
                if getattr(args, k)] + (["--repetition_penalty"] if args.repetition_penalty != 1.0
                                        else [])  # (greedy --temperature 0 goes with beams)
    for broken, message in [
        (args.num_beams > 1 and sampling, f"beam search keeps the most likely beams, it does not "
         f"sample: drop {' '.join(sampling)} or --num_beams"),
        (args.num_beams > 1 and args.num_samples > 1, "beam search is deterministic: "
         "--num_samples would repeat one text; drop it"),
        (args.num_beams > 1 and args.draft, "--draft and --num_beams are two ways to decode; "
         "pick one"),
        (args.batch and args.draft, "speculative decoding runs one prompt at a time (rows accept "
         "different numbers of drafts); drop --batch or --draft"),
        (args.compile and (args.draft or args.num_beams > 1), "--compile applies to plain "
         "sampling; drop it with --draft or --num_beams"),
        (args.batch and not (args.prompt_file or args.source_file), "--batch reads one prompt a "
         "line from --prompt_file or --source_file; give one of them"),
        (args.fill_mask is not None and (args.draft or args.num_beams > 1 or args.compile),
         "--fill_mask runs one forward pass: --draft, --num_beams and --compile do not apply")]:
        if broken:
            raise ValueError(message)


def pick_device(name):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    if name == "auto":
        return next(d for d, ok in available.items() if ok)
    if not available[name]:
        raise ValueError(f"--device {name} was asked for, but this torch ({torch.__version__}) "
                         f"sees no {name} device; use --device cpu or auto")
    return name


# ----------------------------------------------------------------------------------------------
# Loading: the model, and what reads and writes its tokens


class Loaded(NamedTuple):
    model: torch.nn.Module
    tok: object           # decode(ids) -> text, piece(id) -> text; None: --ids only
    encode: Callable      # text -> the ids the model takes (special tokens added)
    stop: tuple           # ids that end a sample
    mask_id: int | None   # the token --fill_mask fills
    n_fill: int           # a mask is filled with an id below this (ours: a text token, never a
                          # special one)
    classes: tuple = ()   # a classifier's labels (objective=classify)


def load(args):
    """The model and its tokenizer. Without a tokenizer the input must be --ids."""
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        model, meta, objective = from_checkpoint(ckpt), ckpt.get("tokenizer"), ckpt.get(
            "objective", "lm")
        tok = get_tokenizer(meta) if meta else None
        if tok is None or objective == "lm":
            return Loaded(model, tok, tok.encode if tok else None, (), None, 0,
                          tuple(ckpt.get("classes", ())))
        tok = ObjectiveTokenizer(tok, objective, checkpoint_specials(tok, ckpt))
        if objective == "classify":  # class_probs frames the text itself
            return Loaded(model, tok, tok.tok.encode, (), None, 0, tuple(ckpt["classes"]))
        return Loaded(model, tok, tok.encode, (tok.eos,), tok.mask_id, tok.base)
    hf_dir = hub_dir(args.hf)
    model = load_hf_model(hf_dir)
    arch = model.config.architecture
    try:
        tok = hf_tokenizer(hf_dir)
    except ValueError as e:
        if args.ids is None:
            raise ValueError(f"{e}; {AS_IDS[arch]}") from None
        return Loaded(model, None, None, hf_stop_tokens(hf_dir), None, model.config.vocab_size)
    return Loaded(model, tok, lambda text: tok.encode(text, add_special_tokens=True),
                  hf_stop_tokens(hf_dir), tok.mask_id, model.config.vocab_size)


def load_hf_model(hf_dir):
    if not hf_dir.is_dir():
        raise ValueError(f"--hf {hf_dir} is not a directory; pass a HF-format directory "
                         f"(config.json, *.safetensors, tokenizer.json)")
    try:
        return Transformer.from_pretrained(hf_dir)
    except ValueError:
        raise
    except Exception as e:  # a broken weight file fails deep in safetensors or torch: one line
        what = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"cannot load {hf_dir}: {type(e).__name__} {what}".strip()) from None


def hf_stop_tokens(hf_dir: Path):
    """eos_token_id of generation_config.json, else of config.json: an int or a list."""
    for name in ("generation_config.json", "config.json"):
        if not (hf_dir / name).is_file():
            continue
        try:
            eos = json.loads((hf_dir / name).read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{hf_dir / name} is not a JSON object ({e})") from None
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (eos,)
    return ()


# ----------------------------------------------------------------------------------------------
# Input and output


def input_ids(args, arch, loaded, name, vocab_size):
    """-> (the input's token ids, the text a decoder_only model's output continues)."""
    given = next((k for k in INPUTS if getattr(args, k) is not None), None)
    if given and INPUTS[given] != arch:
        raise ValueError(f"--{given} is for {INPUTS[given]} models, but {name} is {arch}: give "
                         f"its input with {HOW[arch]}")
    if args.ids is not None:
        try:
            ids = [int(s) for s in args.ids.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--ids {args.ids!r} must be comma-separated integers, e.g. "
                             f"--ids 1,2,3") from None
        if bad := [i for i in ids if not 0 <= i < vocab_size]:
            raise ValueError(f"--ids has {bad[0]}, outside the model's vocabulary "
                             f"[0, {vocab_size})")
        if not ids:
            raise ValueError("--ids is empty; pass some token ids")
        return ids, loaded.tok.decode(ids) if loaded.tok else ",".join(map(str, ids))
    if given is None and arch != "decoder_only":
        raise ValueError(f"{name} is {arch}: give its input with {HOW[arch]}")
    if loaded.tok is None:
        raise ValueError(f"{name} stores no tokenizer; {AS_IDS[arch]}")
    text = read_input(given, getattr(args, given)) if given else "\n"
    if not text:
        file = f" {getattr(args, given)}" if given.endswith("_file") else ""
        raise ValueError(f"--{given}{file} is empty; pass some text (or --ids)")
    return loaded.encode(text), text


def read_input(option, value):
    """The text of --prompt or --source, or of the file --prompt_file/--source_file names."""
    if not option.endswith("_file"):
        try:  # a command line with bytes that are not UTF-8 arrives with lone surrogates
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"--{option} is not UTF-8 text (a byte at character {e.start}); "
                             f"pass UTF-8, or the text in a file with --{option}_file") from None
        return value
    try:
        return Path(value).read_bytes().decode("utf-8")
    except OSError as e:
        raise ValueError(f"cannot read --{option} {value}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--{option} {value} is not UTF-8 text (byte at offset {e.start}); "
                         f"convert it first, e.g. iconv -f latin1 -t utf-8") from None


class Streamer:
    """The generate() callback: prints each new token as it comes. A tokenizer may decode a token
    differently after others (SentencePiece drops a leading space at the start), so each step
    decodes a short window of tokens (from a few back) and prints what the new ones add; text
    waits while it ends inside a UTF-8 character (U+FFFD), up to 8 tokens."""

    def __init__(self, tok, stop, echo="", context=()):
        self.tok, self.stop, self.echo, self.count = tok, set(stop), echo, 0
        self.ids = list(context)                    # decoder_only: the prompt the output continues
        self.read = len(self.ids)                   # ids[:read] are printed (or the prompt)
        self.start = max(0, self.read - 5)          # the window decoded: ids[start:]

    def __call__(self, ids):                                     # ids: (1,) the new token
        token = int(ids[0])
        if not self.count:  # the prompt is echoed with the first token: an input error leaves
            self.write(self.echo)  # stdout empty
        self.count += 1
        if token in self.stop:
            return
        if self.tok is None:  # ids, comma-separated after the echoed ones
            return self.write(f"{',' if self.echo or self.count > 1 else ''}{token}")
        self.ids.append(token)
        self.flush(waiting=True)

    def flush(self, waiting=False):
        if self.tok is None or self.read == len(self.ids):
            return
        done = self.tok.decode(self.ids[self.start:self.read])
        text = self.tok.decode(self.ids[self.start:])
        if waiting and text.endswith("\ufffd") and len(self.ids) - self.read < 8:
            return                                  # 8 tokens cover any 4-byte character
        self.write(text[len(done):])
        self.start, self.read = self.read, len(self.ids)

    def write(self, text):
        sys.stdout.write(text)
        sys.stdout.flush()


def default_new_tokens(model):
    """DEFAULT_NEW_TOKENS; an encoder-decoder's fewer if its decoder's position table ends sooner
    (a decoder_only model generates past its table by cropping, as model.generate says)."""
    if model.config.architecture == "encoder_decoder":   # the target starts from one start token
        return max(1, min(DEFAULT_NEW_TOKENS, model.decoder.config.block_size - 1))
    return DEFAULT_NEW_TOKENS


def decode(model, x, n, args, stop, generator, callback=None, draft=None, stats=None,
           attention_mask=None):
    """The model's continuation of x (a (B, T) tensor, or a decoder's list of prompts) by the
    decoding the options ask for: beam search, speculative decoding, or sampling."""
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              repetition_penalty=args.repetition_penalty, stop_tokens=stop, generator=generator,
              callback=callback)
    T = max(map(len, x)) if isinstance(x, list) else x.shape[1]
    try:
        if args.num_beams > 1:
            return beam_search(model, x, n, args.num_beams, args.length_penalty,
                               EARLY_STOPPING[args.early_stopping], stop, attention_mask)
        if draft is not None:
            return speculative_generate(model, draft, x, n, args.draft_tokens, stats=stats, **kw)
        if attention_mask is not None:                    # an encoder-decoder's padded sources
            return model.generate(x, n, attention_mask=attention_mask, **kw)
        return model.generate(x, n, **kw, **({"compile": True} if args.compile else {}))
    except RuntimeError as e:  # the cache for T + n positions is allocated first: too large a n
        if not (isinstance(e, torch.OutOfMemoryError) or "allocate" in str(e)):
            raise
        raise ValueError(f"no memory for the cache of {T} + --max_new_tokens={n} positions; ask "
                         f"for fewer tokens") from None


def sample(model, x, tok, stop, generator, echo, args, draft=None):
    """One sample streamed to stdout; its speed (and a draft's acceptance) to stderr."""
    # an encoder-decoder's output does not continue the prompt: no echo, no context
    decoder_only = model.config.architecture == "decoder_only"
    streamer = Streamer(tok, stop, echo if decoder_only else "", x[0].tolist() if decoder_only
                        else ())
    n = args.max_new_tokens or default_new_tokens(model)
    stats = {}
    t0 = time.perf_counter()
    out = decode(model, x, n, args, stop, generator, streamer, draft, stats)
    for t in out[0, x.shape[1] if decoder_only else 1:] if args.num_beams > 1 else ():
        streamer(t[None])                         # beam search knows its text only at the end
    streamer.flush()
    dt = time.perf_counter() - t0
    streamer.write("\n")
    print(f"{streamer.count} tokens in {dt:.2f} s: {streamer.count / dt:.1f} tokens/s"
          + (" (--compile: the first sample includes compiling the step)" if args.compile
             else ""),
          file=sys.stderr)
    if stats:
        print(f"draft: {stats['accepted']} of {stats['drafted']} drafted tokens accepted "
              f"({stats['accepted'] / max(stats['drafted'], 1):.0%}) in {stats['rounds']} "
              f"rounds", file=sys.stderr)


def sample_batch(model, rows, texts, tok, stop, generator, args):
    """--batch: every prompt (rows: lists of ids) decoded as one padded batch; each printed, a
    decoder's continuation after its prompt, once all are done."""
    decoder_only = model.config.architecture == "decoder_only"
    n = args.max_new_tokens or default_new_tokens(model)
    if decoder_only and model.config.positions_bounded and not args.max_new_tokens:
        n = max(1, min(n, model.config.block_size - max(map(len, rows))))  # a batch does not crop
    t0 = time.perf_counter()
    if decoder_only:
        new = [out[len(r):] for r, out in zip(rows, decode(model, rows, n, args, stop, generator))]
    else:  # sources padded on the right, as an encoder takes them
        device = model.encoder.wte.weight.device
        S = max(map(len, rows))
        src = torch.tensor([r + [0] * (S - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (S - len(r)) for r in rows], device=device)
        out = decode(model, src, n, args, stop, generator, attention_mask=mask)
        new = [row[1:].tolist() for row in out]
        new = [row[:next((i + 1 for i, t in enumerate(row) if t in stop), len(row))]
               for row in new]
    dt = time.perf_counter() - t0
    for i, (text, ids) in enumerate(zip(texts, new)):
        if i:
            print(SEPARATOR)
        print((text if decoder_only else "") + tok.decode([t for t in ids if t not in stop]))
    count = sum(map(len, new))
    print(f"{count} tokens ({len(rows)} prompts) in {dt:.2f} s: {count / dt:.1f} tokens/s",
          file=sys.stderr)


@torch.no_grad()
def classify(model, loaded, text, name):
    """--classify: the predicted label, then every class with its probability, most likely
    first."""
    if not loaded.classes:
        raise ValueError(f"{name} is not a classifier: --classify takes a checkpoint that train.py "
                         f"wrote with objective=classify")
    ids = loaded.encode(text)
    if not ids:
        raise ValueError("--classify got no text; pass the text to label")
    probs = class_probs(model, [ids], loaded.tok.sp)[0]                  # (n_classes,)
    order = probs.argsort(descending=True).tolist()
    print(loaded.classes[order[0]])
    for i in order:
        print(f"  {loaded.classes[i]}: {probs[i]:.4f}")


@torch.no_grad()
def fill_mask(model, x, tok, mask_id, n_fill, top_k):
    """For each mask in x (1, T), one line: its top_k candidates with their probabilities; then
    the input with every mask replaced by its most likely candidate."""
    k = DEFAULT_CANDIDATES if top_k is None else top_k
    if k < 1:
        raise ValueError(f"--top_k={top_k}: --fill_mask shows at least one candidate per mask")
    where = (x[0] == mask_id).nonzero().flatten()                         # (M,) mask positions
    if not len(where):
        raise ValueError(f"the input has no [MASK] (id {mask_id}); write [MASK] where a token is "
                         f"to be filled in")
    probs = model(x).logits[0, where].float().softmax(-1)[:, :n_fill]     # (M, n_fill)
    top = probs.topk(min(k, n_fill))
    show = (lambda i: repr(tok.piece(i))) if tok else str
    for m, (p, ids) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"[MASK] {m}: " + ", ".join(f"{show(i)} {q:.4f}" for i, q in zip(ids, p)))
    filled = x[0].index_put((where,), top.indices[:, 0]).tolist()
    print(tok.decode(filled) if tok else ",".join(map(str, filled)))


def run(args):
    device = pick_device(args.device)
    loaded = load(args)
    model, name = loaded.model, args.checkpoint or args.hf
    if args.classify is not None:
        return classify(model.to(device=device, dtype=DTYPES[args.dtype]).eval(), loaded,
                        args.classify, name)
    if loaded.classes:
        raise ValueError(f"{name} is a classifier (objective=classify): give its text with "
                         f"--classify TEXT")
    arch = model.config.architecture
    if args.compile and arch != "decoder_only":
        raise ValueError(f"--compile compiles a decoder's step; {name} is {arch}: drop it")
    if args.batch:
        rows, texts = batch_inputs(args, arch, loaded, name)
    else:
        ids, echo = input_ids(args, arch, loaded, name, model.config.vocab_size)
    if arch == "encoder_only" and loaded.mask_id is None:
        raise ValueError(f"{name} has no [MASK] token to fill (our checkpoints have one when "
                         f"trained with objective=mlm; a HF directory's tokenizer.json names it)")
    model = prepare(model, device, args)
    draft = prepare(load_draft(args.draft, arch), device, args) if args.draft else None
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.batch:
        for i in range(args.num_samples):
            if i:
                print(SEPARATOR)
            sample_batch(model, rows, texts, loaded.tok, loaded.stop, generator, args)
        return
    x = torch.tensor([ids], dtype=torch.long, device=device)                # (1, T)
    if arch == "encoder_only":
        return fill_mask(model, x, loaded.tok, loaded.mask_id, loaded.n_fill, args.top_k)
    for i in range(args.num_samples):
        if i:
            print(SEPARATOR)
        sample(model, x, loaded.tok, loaded.stop, generator, echo, args, draft)


def prepare(model, device, args):
    """The model on its device in --dtype, for inference, with --quantize's weights."""
    model = model.to(device=device, dtype=DTYPES[args.dtype]).eval()
    return quantize(model, args.quantize) if args.quantize else model


def load_draft(path, arch):
    """--draft: a ckpt.pt or a HF-format directory holding a decoder (speculative decoding needs
    only the vocabulary to match, which speculative_generate checks; a poor draft costs speed)."""
    if arch != "decoder_only":
        raise ValueError(f"--draft drafts for a decoder_only model; this one is {arch}")
    path = hub_dir(path)
    return load_hf_model(path) if path.is_dir() else from_checkpoint(load_checkpoint(path))


def batch_inputs(args, arch, loaded, name):
    """--batch: the non-empty lines of --prompt_file / --source_file, as (ids per line, text)."""
    given = "prompt_file" if args.prompt_file else "source_file"
    if INPUTS[given] != arch:
        raise ValueError(f"--{given} is for {INPUTS[given]} models, but {name} is {arch}: give "
                         f"its input with {HOW[arch]}")
    if loaded.tok is None:
        raise ValueError(f"{name} stores no tokenizer; --batch needs one to read the lines")
    texts = [line for line in read_input(given, getattr(args, given)).splitlines() if line]
    if not texts:
        raise ValueError(f"--{given} {getattr(args, given)} has no non-empty line; write one "
                         f"prompt a line")
    return [loaded.encode(t) for t in texts], texts


def main(argv=None):
    try:
        run(parse_args(argv))
    except ValueError as e:  # everything a user can cause is a ValueError with a one-line message
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
