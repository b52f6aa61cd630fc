"""Training objectives: one batch maker per objective, each returning model(**batch)'s arguments.

  lm       next token (decoder_only): input_ids, targets
  mlm      masked LM (encoder_only; BERT, Devlin et al. 2018, arXiv:1810.04805), optionally with
           next-sentence (BERT) or sentence-order (ALBERT, Lan et al. 2019, arXiv:1909.11942)
           prediction on the cls head
  span     span corruption of windows of the token stream (encoder_decoder; T5, Raffel et al.
           2019, arXiv:1910.10683)
  seq2seq  source -> target pairs from a TSV file (encoder_decoder), e.g. translation
  classify a label per text from a TSV file of text<TAB>label lines (encoder_only: BERT's
           fine-tuning, [CLS] text [SEP] read at the pooled [CLS]; decoder_only: the bare text
           read at its last token), on the model's cls head

Every maker is called as  OBJECTIVES[name](data, batch_size, gen, cfg, base_vocab, pair_task)  and
returns a dict of long (B, ...) CPU tensors whose keys are forward's argument names. data is a 1-D
token tensor (lm, mlm, span; a .bin memmap works), a list of (source ids, target ids) from
load_pairs (seq2seq) or a Labeled list of (text ids, class index) from load_labeled (classify);
the train and val splits go through the same makers. gen is a torch.Generator: its state is the
data position. Objectives other than lm add special tokens right after the tokenizer's own
base_vocab ids, so any tokenizer works unchanged; config_overrides says which model keys that
needs.
"""
import math
import re

import torch

from data.prepare import VAL_FRACTION, read_text
from model import check_choice, stack_config

# ----------------------------------------------------------------------------------------------
# 1. Special tokens: ids base_vocab, base_vocab + 1, ... after the tokenizer's own

SPECIALS = ("[PAD]", "[MASK]", "[CLS]", "[SEP]", "[EOS]")
# T5's 100 sentinels: a window of L tokens has about L/20 noise spans (density 0.15, mean length 3),
# so they cover encoder blocks up to ~1800 tokens; for longer blocks span_window picks a window
# shorter than the block.
N_SENTINELS = 100
ALL_SPECIALS = SPECIALS + tuple(f"<extra_id_{i}>" for i in range(N_SENTINELS))
PAIR_TASKS = ("none", "nsp", "sop")
ARCHITECTURE = {"lm": "decoder_only", "mlm": "encoder_only", "span": "encoder_decoder",
                "seq2seq": "encoder_decoder", "classify": "encoder_only decoder_only"}

MASK_PROB = 0.15                  # BERT: this share of the text tokens is predicted ...
MASK_TOKEN, RANDOM_TOKEN = 0.8, 0.1  # ... of those 80% become [MASK], 10% a random token, 10% stay
SHORT_PROB = 0.1                  # BERT's short_seq_prob: some rows shorter, as at fine-tuning
NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0  # T5's span corruption defaults
SHOWN = 5                         # classify: val examples show() prints


def special_ids(base_vocab: int) -> dict:
    """Name -> id of every special token ("[PAD]", ..., "<extra_id_0>", ...): base_vocab + index."""
    return {name: base_vocab + i for i, name in enumerate(ALL_SPECIALS)}


def config_overrides(name: str, base_vocab: int, architecture=None) -> dict:
    """Model config keys objective `name` needs (on `architecture`, for classify): a vocab_size
    with room for the specials (a minimum: a larger one works too) and, for encoder-decoders,
    decoder_start_token_id = [PAD] (as T5). A decoder classifies the bare text: no specials."""
    if name == "lm" or (name, architecture) == ("classify", "decoder_only"):
        return {}
    need = {"vocab_size": base_vocab + len(ALL_SPECIALS)}
    if ARCHITECTURE[name] == "encoder_decoder":
        need["decoder_start_token_id"] = special_ids(base_vocab)["[PAD]"]
    return need


# ----------------------------------------------------------------------------------------------
# 2. Batch makers


def lm_batch(data, batch_size, gen, T):
    """Random windows of T + 1 tokens: the targets are the inputs shifted left by one."""
    check_length(data, T + 1)
    ix = torch.randint(len(data) - T, (batch_size,), generator=gen)
    xy = torch.stack([data[i:i + T + 1] for i in ix.tolist()]).long()     # (B, T + 1)
    return {"input_ids": xy[:, :-1], "targets": xy[:, 1:]}


def mlm_batch(data, batch_size, gen, T, base_vocab, pair_task):
    """[CLS] A [SEP] B [SEP] (pair_task none: [CLS] A [SEP]) padded to T, 15% of the text tokens
    masked.

    A "sentence" is a contiguous span of the token stream cut at a random point (BERT §3: "an
    arbitrary span of contiguous text"); cutting ids, not text, works with every tokenizer. With
    prob SHORT_PROB a row holds fewer tokens than fit, so padding occurs. cls_targets follow HF:
    nsp 0 = B continues A, 1 = B is a random span; sop 0 = A then B as in the text, 1 = swapped.
    """
    sp, B, N, pair = special_ids(base_vocab), batch_size, len(data), pair_task != "none"
    check_length(data, T)
    budget, low = (T - 3, 2) if pair else (T - 2, 1)         # text tokens beside [CLS] and [SEP]s
    short = torch.rand(B, generator=gen) < SHORT_PROB
    n = torch.where(short, torch.randint(low, budget + 1, (B,), generator=gen), budget)  # (B,)
    len_a = 1 + randbelow(n - 1, gen) if pair else n         # A gets 1..n-1 of the n, B the rest
    start = randbelow(N - n + 1, gen)
    label = (torch.rand(B, generator=gen) < 0.5).long()
    other = randbelow(N - (n - len_a), gen)                  # nsp: a random B, never the true one
    other += other >= start + len_a
    rows, types = [], []
    for s, a, m, y, o in zip(*(t.tolist() for t in (start, len_a, n, label, other))):
        seg_a, seg_b = data[s:s + a].long(), data[s + a:s + m].long()
        if pair_task == "nsp" and y:
            seg_b = data[o:o + m - a].long()
        if pair_task == "sop" and y:
            seg_a, seg_b = seg_b, seg_a
        second = [seg_b, torch.tensor([sp["[SEP]"]])] if pair else []
        rows.append(torch.cat([torch.tensor([sp["[CLS]"]]), seg_a, torch.tensor([sp["[SEP]"]]),
                               *second]))
        types.append([0] * (len(seg_a) + 2) + [1] * (len(seg_b) + 1 if pair else 0))
    ids = pad(rows, sp["[PAD]"], T)                                    # (B, T)
    # BERT's create_pretraining_data: exactly max(1, round(15%)) of each row's text tokens, chosen
    # uniformly
    text = ids < base_vocab                                            # not [CLS]/[SEP]/[PAD]
    k = (text.sum(1) * MASK_PROB).round().clamp_min(1)                 # (B,)
    score = torch.rand(B, T, generator=gen).masked_fill(~text, 2.0)    # specials sort last
    chosen = score.argsort(1).argsort(1) < k[:, None]                  # (B, T) each row's k lowest
    r = torch.rand(B, T, generator=gen)
    random_ids = torch.randint(base_vocab, (B, T), generator=gen)
    inputs = torch.where(chosen & (r < MASK_TOKEN), sp["[MASK]"],
                         torch.where(chosen & (r < MASK_TOKEN + RANDOM_TOKEN), random_ids, ids))
    batch = {"input_ids": inputs, "targets": torch.where(chosen, ids, -1),
             "token_type_ids": pad(types, 0, T), "attention_mask": (ids != sp["[PAD]"]).long()}
    return {**batch, "cls_targets": label} if pair else batch


def span_lengths(L):
    """(noise tokens, noise spans) in a window of L tokens, as T5's random_spans_noise_mask counts
    them."""
    n_noise = min(max(round(L * NOISE_DENSITY), 1), L - 1)
    return n_noise, max(round(n_noise / MEAN_SPAN), 1)


def span_window(enc_T, dec_T):
    """Longest window whose corrupted input (text, a sentinel per span, [EOS]) fits the encoder and
    whose target (a sentinel per span, the spans, [EOS]) fits the decoder (T5's
    compute_input_and_target_lengths)."""
    def fits(L):
        n_noise, n_spans = span_lengths(L)
        return (L - n_noise + n_spans + 1 <= enc_T and n_noise + n_spans + 1 <= dec_T
                and n_spans <= N_SENTINELS)
    if not fits(2):
        raise ValueError(f"span corruption needs block_size >= 3 in both stacks (encoder {enc_T}, "
                         f"decoder {dec_T}); raise block_size")
    L = 2
    while fits(L + 1):
        L += 1
    return L


def random_split(total, parts, gen):
    """`parts` positive lengths summing to `total`, uniform over all such splits (T5's
    _random_segmentation)."""
    cuts = (torch.randperm(total - 1, generator=gen)[:parts - 1] + 1).sort().values
    return torch.diff(cuts, prepend=torch.tensor([0]), append=torch.tensor([total]))


def replace_runs(ids, runs, first_sentinel):
    """ids (L,) with each run of True in `runs` replaced by one sentinel, numbered in order
    (T5's noise_span_to_unique_sentinel)."""
    start = runs & ~torch.cat([torch.tensor([False]), runs[:-1]])      # first position of each run
    return torch.where(start, first_sentinel + start.cumsum(0) - 1, ids)[~runs | start]


def span_batch(data, batch_size, gen, cfg, base_vocab):
    """T5 span corruption: input = text with each noise span replaced by a sentinel, then [EOS];
    target = sentinel_0 span_0 sentinel_1 span_1 ... [EOS]. The window is as long as span_window
    allows, and every window corrupts to the same lengths, so no padding (and no attention_mask) is
    needed. As in T5, a window starts with text and ends with a noise span."""
    sp = special_ids(base_vocab)
    L = span_window(*(stack_config(cfg, part).block_size for part in ("encoder", "decoder")))
    check_length(data, L)
    n_noise, n_spans = span_lengths(L)
    kind = (torch.arange(2 * n_spans) % 2).bool()                      # text, noise, text, noise...
    eos = torch.tensor([sp["[EOS]"]])
    src, tgt = [], []
    for s in torch.randint(len(data) - L + 1, (batch_size,), generator=gen).tolist():
        window = data[s:s + L].long()
        lengths = torch.stack([random_split(L - n_noise, n_spans, gen),
                               random_split(n_noise, n_spans, gen)], 1)  # (n_spans, 2)
        noise = kind.repeat_interleave(lengths.flatten())      # (L,) starts with text, as T5's
        src.append(torch.cat([replace_runs(window, noise, sp["<extra_id_0>"]), eos]))
        tgt.append(torch.cat([replace_runs(window, ~noise, sp["<extra_id_0>"]), eos]))
    tgt = torch.stack(tgt)                                             # (B, n_noise + n_spans + 1)
    return {"input_ids": torch.stack(src), "decoder_input_ids": shift_right(tgt, sp["[PAD]"]),
            "targets": tgt}


def seq2seq_batch(pairs, batch_size, gen, cfg, base_vocab):
    """Random pairs: source + [EOS] padded with [PAD] (attention_mask 0 there), target + [EOS]
    padded with -1; each cut to its stack's block_size, [EOS] kept last (T5 appends it after
    trimming)."""
    if not pairs:
        raise ValueError("there are no source/target pairs to draw from; pass a TSV file with more "
                         "lines")
    sp = special_ids(base_vocab)
    enc_T, dec_T = (stack_config(cfg, part).block_size for part in ("encoder", "decoder"))
    rows = [pairs[i] for i in torch.randint(len(pairs), (batch_size,), generator=gen).tolist()]
    src = pad([s[:enc_T - 1] + [sp["[EOS]"]] for s, _ in rows], sp["[PAD]"])           # (B, S)
    tgt = pad([t[:dec_T - 1] + [sp["[EOS]"]] for _, t in rows], -1)                     # (B, T)
    return {"input_ids": src, "attention_mask": (src != sp["[PAD]"]).long(),
            "decoder_input_ids": shift_right(tgt, sp["[PAD]"]), "targets": tgt}


def load_pairs(path, tok):
    """(source ids, target ids) for each line `source<TAB>target` of a UTF-8 file; blank lines are
    skipped."""
    return [(tok.encode(a), tok.encode(b)) for _, a, b in tsv_lines(path, "source<TAB>target")]


def tsv_lines(path, columns):
    """(line number, first column, second column) of each non-blank line of a UTF-8 file whose
    lines are `columns` ("source<TAB>target"): one-line errors name a line that is not."""
    # split("\n"), not splitlines(), which also splits at \x0c and \u2028
    for n, line in enumerate(read_text(path).split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 2 or not all(c.strip() for c in cols):
            what = f"{len(cols)} tab-separated columns" if len(cols) != 2 else "an empty column"
            raise ValueError(f"{path} line {n} has {what}; each line must be {columns} with "
                             f"exactly one TAB: fix or remove that line")
        yield n, cols[0], cols[1]


class Labeled(list):
    """(text ids, class index) rows of a classify split, and `classes`: the label strings the
    indices stand for, sorted."""

    def __init__(self, rows, classes):
        super().__init__(rows)
        self.classes = classes


def load_labeled(path, tok):
    """(train, val) Labeled splits of a UTF-8 file of `text<TAB>label` lines (blank lines skipped;
    labels stripped of spaces). The last VAL_FRACTION of the lines are val, as for seq2seq; the
    classes are the train lines' labels, so a val label outside them is an error naming its
    line."""
    lines = list(tsv_lines(path, "text<TAB>label"))
    n_val = int(len(lines) * VAL_FRACTION)
    if n_val < 1:
        raise ValueError(f"{path} has {len(lines)} text<TAB>label lines; a train/val split needs "
                         f"at least {math.ceil(1 / VAL_FRACTION)} (pass a longer file)")
    classes = sorted({label.strip() for _, _, label in lines[:-n_val]})
    if len(classes) < 2:
        raise ValueError(f"the train lines of {path} (all but the last {n_val}) have only the "
                         f"label {classes[0]!r}; classification needs at least two labels")
    index = {c: i for i, c in enumerate(classes)}
    splits = []
    for part in (lines[:-n_val], lines[-n_val:]):
        rows = []
        for n, text, label in part:
            if label.strip() not in index:
                raise ValueError(f"{path} line {n} (a val line) has the label {label.strip()!r}, "
                                 f"which no train line has (train labels: {classes}); give it "
                                 f"train lines too, or move that line up")
            ids = tok.encode(text)
            if not ids:
                raise ValueError(f"{path} line {n}: the text {text!r} encodes to no tokens; fix "
                                 f"or remove that line")
            rows.append((ids, index[label.strip()]))
        splits.append(Labeled(rows, classes))
    return splits


def classify_inputs(texts, cfg, base_vocab):
    """model(**this) for texts (lists of token ids), each framed as classify trains it: an
    encoder's [CLS] text [SEP], a decoder's bare text, cut to block_size (the start kept) and
    right-padded ([PAD]; attention_mask 0 there)."""
    T = cfg.block_size
    if cfg.architecture == "encoder_only":
        sp = special_ids(base_vocab)
        rows, pad_id = [[sp["[CLS]"], *t[:T - 2], sp["[SEP]"]] for t in texts], sp["[PAD]"]
    else:  # the decoder reads the last text token: nothing to add, and any id pads (masked out)
        rows, pad_id = [t[:T] for t in texts], 0
    lengths = torch.tensor([len(r) for r in rows])
    ids = pad(rows, pad_id)                                                            # (B, L)
    return {"input_ids": ids,
            "attention_mask": (torch.arange(ids.shape[1]) < lengths[:, None]).long()}


def classify_batch(rows, batch_size, gen, cfg, base_vocab):
    """Random rows of a Labeled split (classify_inputs) with their class indices as cls_targets."""
    if not rows:
        raise ValueError("there are no text/label lines to draw from; pass a TSV file with more "
                         "lines")
    pick = [rows[i] for i in torch.randint(len(rows), (batch_size,), generator=gen).tolist()]
    return {**classify_inputs([t for t, _ in pick], cfg, base_vocab),
            "cls_targets": torch.tensor([c for _, c in pick])}


def check_length(data, n):
    if len(data) < n:
        raise ValueError(f"the data has {len(data)} tokens, fewer than the {n} one example takes; "
                         f"use a longer text or a smaller block_size")


def randbelow(high, gen):
    """(B,) integers, each uniform in [0, high[i]) (modulo bias below 2**-40 for any corpus
    size)."""
    return torch.randint(1 << 62, high.shape, generator=gen) % high


def pad(rows, value, length=None):
    """Rows of ids (lists or 1-D tensors) right-padded with value into one (B, length or longest)
    tensor."""
    out = torch.full((len(rows), length or max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r)
    return out


def shift_right(targets, start):
    """Decoder inputs: the start token, then targets without their last; padding (-1) becomes start
    ([PAD])."""
    shifted = torch.cat([torch.full_like(targets[:, :1], start), targets[:, :-1]], 1)    # (B, T)
    return shifted.masked_fill(shifted < 0, start)


# one signature for all (see the module docstring); each entry passes on what its maker reads
OBJECTIVES = {
    "lm": lambda data, B, gen, cfg, base, pair_task: lm_batch(data, B, gen, cfg.block_size),
    "mlm": lambda data, B, gen, cfg, base, pair_task: mlm_batch(data, B, gen, cfg.block_size, base,
                                                                pair_task),
    "span": lambda data, B, gen, cfg, base, pair_task: span_batch(data, B, gen, cfg, base),
    "seq2seq": lambda data, B, gen, cfg, base, pair_task: seq2seq_batch(data, B, gen, cfg, base),
    "classify": lambda data, B, gen, cfg, base, pair_task: classify_batch(data, B, gen, cfg, base),
}


# ----------------------------------------------------------------------------------------------
# 3. Choosing and checking an objective


def default_objective(cfg, data="") -> str:
    """lm for a decoder; for an encoder mlm, or classify on a .tsv file (text<TAB>label); for an
    encoder-decoder span corruption, or seq2seq on a .tsv file of pairs."""
    tsv = str(data).endswith(".tsv")
    return {"decoder_only": "lm", "encoder_only": "classify" if tsv else "mlm",
            "encoder_decoder": "seq2seq" if tsv else "span"}[cfg.architecture]


def check_objective(name, cfg, base_vocab=None, pair_task="none"):
    """A one-line ValueError, naming the fix, when objective `name` (and pair_task) cannot train
    cfg. base_vocab None (the tokenizer not known yet) skips the checks of the vocabulary."""
    check_choice("objective", name, OBJECTIVES)
    check_choice("pair_task", pair_task, PAIR_TASKS)
    arch = ARCHITECTURE[name].split()
    if cfg.architecture not in arch:
        fits = " or ".join(o for o, a in ARCHITECTURE.items() if a == cfg.architecture)
        raise ValueError(f"objective={name!r} trains {' or '.join(arch)} models but this config "
                         f"is {cfg.architecture}; use objective={fits}, or a config with "
                         f"architecture: {arch[0]}")
    if pair_task != "none" and not (name == "mlm" and cfg.cls_head and cfg.type_vocab_size >= 2):
        raise ValueError(f"pair_task={pair_task!r} trains an encoder's cls head on segments A and "
                         f"B: it needs objective=mlm, cls_head: true and type_vocab_size: 2 (here "
                         f"objective={name}, cls_head={cfg.cls_head}, type_vocab_size="
                         f"{cfg.type_vocab_size}); or use pair_task=none")
    need = config_overrides(name, base_vocab, cfg.architecture) if base_vocab is not None else {}
    n_ids = need.get("vocab_size", base_vocab)
    if base_vocab is not None and cfg.vocab_size < n_ids:
        specials = f" + {len(ALL_SPECIALS)} special tokens" if name != "lm" else ""
        raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the {n_ids} ids objective "
                         f"{name} uses (the tokenizer's {base_vocab}{specials}); set vocab_size >= "
                         f"{n_ids} or drop the key")
    start = need.get("decoder_start_token_id", cfg.decoder_start_token_id)
    if cfg.decoder_start_token_id != start:
        raise ValueError(f"decoder_start_token_id={cfg.decoder_start_token_id} is not [PAD]'s id "
                         f"{start}, which {name} starts the decoder from (as T5); set "
                         f"decoder_start_token_id: {start}")
    if name == "mlm" and cfg.block_size < 5:
        raise ValueError(f"block_size={cfg.block_size} cannot hold [CLS] A [SEP] B [SEP]; use "
                         f"block_size >= 5")
    if name == "classify" and cfg.architecture == "encoder_only" and cfg.block_size < 3:
        raise ValueError(f"block_size={cfg.block_size} cannot hold [CLS] text [SEP]; use "
                         f"block_size >= 3")
    if name == "span":
        span_window(*(stack_config(cfg, part).block_size for part in ("encoder", "decoder")))


# ----------------------------------------------------------------------------------------------
# 4. Inference: text with special tokens, fill-mask, one example shown after training


def encode(tok, text, base_vocab) -> list:
    """Ids of text in which special token names ("[MASK]", "<extra_id_0>", ...) stand for those
    tokens."""
    pieces = re.split(f"({'|'.join(map(re.escape, ALL_SPECIALS))})", text)  # text, name, ..., text
    sp = special_ids(base_vocab)
    return [i for k, piece in enumerate(pieces)
            for i in ([sp[piece]] if k % 2 else tok.encode(piece))]


def fill_mask_ids(tok, text, base_vocab) -> list:
    """[CLS] text [SEP] as ids, each literal "[MASK]" in text the [MASK] token: "The [MASK] sat"."""
    if "[MASK]" not in text:
        raise ValueError(f"{text!r} has no [MASK]; write [MASK] where the model should fill in a "
                         f"token, e.g. 'The [MASK] sat'")
    sp = special_ids(base_vocab)
    return [sp["[CLS]"], *encode(tok, text, base_vocab), sp["[SEP]"]]


@torch.no_grad()
def fill_masks(model, input_ids, base_vocab, **kwargs):
    """input_ids (B, T) with every [MASK] replaced by the model's most likely text token (never a
    special).
    kwargs (token_type_ids, attention_mask) go to the model."""
    logits = model(input_ids, **kwargs).logits[..., :base_vocab]       # (B, T, base_vocab)
    return torch.where(input_ids == special_ids(base_vocab)["[MASK]"], logits.argmax(-1), input_ids)


def decode(tok, ids, base_vocab) -> str:
    """Text of ids: the tokenizer's pieces, special tokens by name; [PAD] and ids past the specials
    (a vocabulary padded larger) are left out."""
    out, run = [], []
    for i in ids:
        if i < base_vocab:
            run.append(i)
            continue
        out.append(tok.decode(run))
        run = []
        if base_vocab < i < base_vocab + len(ALL_SPECIALS):
            out.append(ALL_SPECIALS[i - base_vocab])
    return "".join(out) + tok.decode(run)


@torch.no_grad()
def class_probs(model, texts, base_vocab):
    """(len(texts), n_classes) class probabilities of texts (lists of token ids) as classify
    frames them."""
    device = next(model.parameters()).device
    batch = classify_inputs(texts, model.config, base_vocab)
    return model(**{k: v.to(device) for k, v in batch.items()}).cls_logits.float().softmax(-1)


@torch.no_grad()
def show(model, name, data, tok, base_vocab, gen, max_new_tokens=None) -> str:
    """One example of objective `name` (not lm) drawn from data and the model's answer, as text:
    mlm fills its masks, span and seq2seq generate the target greedily up to [EOS] (or
    max_new_tokens); classify shows SHOWN texts, each with the model's label and its
    probability."""
    if name == "classify":
        rows = [data[i] for i in torch.randperm(len(data), generator=gen)[:SHOWN].tolist()]
        probs = class_probs(model, [t for t, _ in rows], base_vocab)          # (n, n_classes)
        short = lambda t: t if len(t) <= 60 else t[:57] + "..."           # noqa: E731
        return "\n".join(f"{short(tok.decode(t))!r} -> {data.classes[p.argmax()]} "
                         f"({p.max():.2f}); label {data.classes[c]}"
                         for (t, c), p in zip(rows, probs))
    device = next(model.parameters()).device
    batch = OBJECTIVES[name](data, 1, gen, model.config, base_vocab, "none")
    batch = {k: v.to(device) for k, v in batch.items()}
    text = lambda ids: decode(tok, ids[0].tolist(), base_vocab)        # noqa: E731
    if name == "mlm":
        filled = fill_masks(model, batch["input_ids"], base_vocab,
                            token_type_ids=batch["token_type_ids"],
                            attention_mask=batch["attention_mask"])
        return f"input: {text(batch['input_ids'])}\nmodel: {text(filled)}"
    n = min(batch["targets"].shape[1], max_new_tokens or batch["targets"].shape[1])
    out = model.generate(batch["input_ids"], n, temperature=0,
                         stop_tokens=(special_ids(base_vocab)["[EOS]"],),
                         attention_mask=batch.get("attention_mask"))
    return (f"input:  {text(batch['input_ids'])}\ntarget: {text(batch['targets'])}\n"
            f"model:  {text(out[:, 1:])}")
