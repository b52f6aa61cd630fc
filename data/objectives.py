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

Every maker is called as  OBJECTIVES[name](data, batch_size, gen, cfg, sp, pair_task)  and returns
a dict of long (B, ...) CPU tensors whose keys are forward's argument names. data is a 1-D token
tensor (lm, mlm, span; a .bin memmap works), a list of (source ids, target ids) from load_pairs
(seq2seq) or a Labeled list of (text ids, class index) from load_labeled (classify); the train and
val splits go through the same makers. gen is a torch.Generator: its state is the data position.
sp is the special tokens' ids (special_tokens): the tokenizer's own where it has every token the
objective needs (a HF tokenizer.json of BERT, ALBERT, DeBERTa, T5, BART: the vocabulary stays
the model's), else ours appended after its vocabulary, so that any tokenizer works; an int n
stands for ours after n ids. config_overrides says which model keys that needs.
"""
import math
import re
from typing import NamedTuple

import torch

from data.prepare import VAL_FRACTION, read_text
from model import check_choice, stack_config

# ----------------------------------------------------------------------------------------------
# 1. Special tokens: the tokenizer's own, or ours at ids base_vocab, base_vocab + 1, ... after it

SPECIALS = ("[PAD]", "[MASK]", "[CLS]", "[SEP]", "[EOS]")
# T5's 100 sentinels: a window of L tokens has about L/20 noise spans (density 0.15, mean length 3),
# so they cover encoder blocks up to ~1800 tokens; for longer blocks span_window picks a window
# shorter than the block.
N_SENTINELS = 100
ALL_SPECIALS = SPECIALS + tuple(f"<extra_id_{i}>" for i in range(N_SENTINELS))
# how the families' tokenizer.json files spell our tokens (BERT, ALBERT, DeBERTa: [..]; T5, BART:
# <..>; an EOS also as the decoders spell it, which a decoder classifier pads with); T5's sentinels
# are <extra_id_i> there too (numbered down from the vocabulary's end: found by name)
OWN_NAMES = {"[PAD]": ("[PAD]", "<pad>"), "[MASK]": ("[MASK]", "<mask>"),
             "[CLS]": ("[CLS]", "<s>"), "[SEP]": ("[SEP]", "</s>"),
             "[EOS]": ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"),
             "[BOS]": ("<s>", "<bos>", "<|begin_of_text|>")}  # own only: BART's <s> source ...
NEEDS = {"lm": (), "mlm": ("[PAD]", "[MASK]", "[CLS]", "[SEP]"),  # what each objective frames with
         "span": ("[PAD]", "[EOS]", "<extra_id_0>"), "seq2seq": ("[PAD]", "[EOS]"),
         "classify": ("[PAD]", "[CLS]", "[SEP]")}  # (a decoder classifies the bare text: none)
PAIR_TASKS = ("none", "nsp", "sop")
ARCHITECTURE = {"lm": "decoder_only", "mlm": "encoder_only", "span": "encoder_decoder",
                "seq2seq": "encoder_decoder", "classify": "encoder_only decoder_only"}

MASK_PROB = 0.15                  # BERT: this share of the text tokens is predicted ...
MASK_TOKEN, RANDOM_TOKEN = 0.8, 0.1  # ... of those 80% become [MASK], 10% a random token, 10% stay
SHORT_PROB = 0.1                  # BERT's short_seq_prob: some rows shorter, as at fine-tuning
NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0  # T5's span corruption defaults
SHOWN = 5                         # classify: val examples show() prints


def special_ids(base_vocab: int) -> dict:
    """Name -> id of every special token of ours ("[PAD]", ..., "<extra_id_0>", ...) appended after
    a vocabulary of base_vocab ids: base_vocab + index."""
    return {name: base_vocab + i for i, name in enumerate(ALL_SPECIALS)}


class Specials(NamedTuple):
    """The special tokens' ids an objective frames its examples with, for one tokenizer: the
    tokenizer's own, or ours appended after its vocabulary (special_tokens)."""
    ids: dict                  # our name ("[PAD]", "<extra_id_0>", ...) -> id: those there are
    names: dict                # id -> name, for every special id (text shows them by name)
    vocab: int                 # the tokenizer's ids
    appended: bool             # ours after them (the model embeds vocab + len(ALL_SPECIALS) ids)
    missing: str | None        # the first token the objective needs that the tokenizer lacks
    text: torch.Tensor         # (n_ids,) bool: True for the ids ordinary text is made of

    @property
    def n_ids(self):
        """The ids a model must embed."""
        return self.vocab + len(ALL_SPECIALS) * self.appended

    @property
    def pad(self):
        """The id rows are padded with; a decoder classifier without a pad token pads with its EOS
        (as HF pads GPT-2 and Llama classifiers) or, with neither, 0 (masked out either way)."""
        return self.ids.get("[PAD]", self.ids.get("[EOS]", 0))

    @property
    def bos(self):
        """What a seq2seq source and target start with: the tokenizer's own BOS (BART's <s>)."""
        return [self.ids["[BOS]"]] if not self.appended and "[BOS]" in self.ids else []

    @property
    def sentinels(self):
        """<extra_id_0>, <extra_id_1>, ... as long as the ids have them, as a tensor."""
        n = next(i for i in range(N_SENTINELS + 1) if f"<extra_id_{i}>" not in self.ids)
        return torch.tensor([self.ids[f"<extra_id_{i}>"] for i in range(n)], dtype=torch.long)


def needs(objective, architecture=None):
    """The special tokens objective frames its examples with (on `architecture`, for classify)."""
    return () if (objective, architecture) == ("classify", "decoder_only") else NEEDS[objective]


def special_tokens(tok, objective, architecture=None, choice=None) -> Specials:
    """The special tokens objective uses with tokenizer tok: the tokenizer's own, found by name
    (OWN_NAMES, <extra_id_i>), when it has every one the objective needs; else ours appended after
    its vocabulary (SPECIALS, the sentinels), which any tokenizer takes but which need that many
    more embeddings. choice "own" or "appended" (a checkpoint's) keeps what it was trained with; an
    objective that needs none uses the tokenizer's own as they are."""
    own = tok.specials
    found = {name: next(own[s] for s in spellings if s in own)
             for name, spellings in OWN_NAMES.items() if any(s in own for s in spellings)}
    found.update({s: own[s] for s in ALL_SPECIALS[len(SPECIALS):] if s in own})
    missing = next((n for n in needs(objective, architecture) if n not in found), None)
    appended = bool(needs(objective, architecture)) and (
        missing is not None if choice is None else choice == "appended")
    if not appended and missing is not None:
        raise ValueError(f"the tokenizer has no {spelled(missing)} token, which objective "
                         f"{objective} needs and which this checkpoint was trained to read as its "
                         f"own; pass the tokenizer it was trained with")
    return make_specials(tok.vocab_size, found, {i: s for s, i in own.items()}, missing) \
        if not appended else appended_specials(tok.vocab_size, missing)


def make_specials(vocab, ids, names, missing=None, appended=False):
    text = torch.ones(vocab + len(ALL_SPECIALS) * appended, dtype=torch.bool)
    text[list(names)] = False
    return Specials(ids, names, vocab, appended, missing, text)


def appended_specials(vocab, missing=None) -> Specials:
    ids = special_ids(vocab)
    return make_specials(vocab, ids, {i: name for name, i in ids.items()}, missing, True)


def specials(sp) -> Specials:
    """sp as Specials: an int n stands for ours appended after n ids."""
    return sp if isinstance(sp, Specials) else appended_specials(sp)


def spelled(name):
    """A token as the tokenizer.json files spell it: '</s>', or '[PAD]' or '<pad>'."""
    return " or ".join(OWN_NAMES.get(name, (name,)))


def checkpoint_specials(tok, ckpt: dict) -> Specials:
    """The special tokens a checkpoint's objective was trained with (its "specials"; checkpoints
    written before that key existed appended ours)."""
    return special_tokens(tok, ckpt.get("objective", "lm"),
                          ckpt["config"].get("architecture", "decoder_only"),
                          ckpt.get("specials", "appended"))


def config_overrides(name: str, sp, architecture=None) -> dict:
    """Model config keys objective `name` needs (on `architecture`, for classify) with special
    tokens sp: a vocab_size with room for ours when appended (a minimum: a larger one works too)
    and then, for encoder-decoders, decoder_start_token_id = our [PAD] (as T5). The tokenizer's own
    tokens leave both as they are: the decoder starts as its family's config says."""
    sp = specials(sp)
    if not needs(name, architecture):
        return {}
    need = {"vocab_size": sp.n_ids}
    if ARCHITECTURE[name] == "encoder_decoder" and sp.appended:
        need["decoder_start_token_id"] = sp.ids["[PAD]"]
    return need


# ----------------------------------------------------------------------------------------------
# 2. Batch makers


def lm_batch(data, batch_size, gen, T):
    """Random windows of T + 1 tokens: the targets are the inputs shifted left by one."""
    check_length(data, T + 1)
    ix = torch.randint(len(data) - T, (batch_size,), generator=gen)
    xy = torch.stack([data[i:i + T + 1] for i in ix.tolist()]).long()     # (B, T + 1)
    return {"input_ids": xy[:, :-1], "targets": xy[:, 1:]}


def mlm_batch(data, batch_size, gen, T, sp, pair_task):
    """[CLS] A [SEP] B [SEP] (pair_task none: [CLS] A [SEP]) padded to T, 15% of the text tokens
    masked.

    A "sentence" is a contiguous span of the token stream cut at a random point (BERT §3: "an
    arbitrary span of contiguous text"); cutting ids, not text, works with every tokenizer. With
    prob SHORT_PROB a row holds fewer tokens than fit, so padding occurs. cls_targets follow HF:
    nsp 0 = B continues A, 1 = B is a random span; sop 0 = A then B as in the text, 1 = swapped.
    """
    sp, B, N, pair = specials(sp), batch_size, len(data), pair_task != "none"
    cls, sep, pad_id = (sp.ids[name] for name in ("[CLS]", "[SEP]", "[PAD]"))
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
        second = [seg_b, torch.tensor([sep])] if pair else []
        rows.append(torch.cat([torch.tensor([cls]), seg_a, torch.tensor([sep]), *second]))
        types.append([0] * (len(seg_a) + 2) + [1] * (len(seg_b) + 1 if pair else 0))
    ids = pad(rows, pad_id, T)                                         # (B, T)
    # BERT's create_pretraining_data: exactly max(1, round(15%)) of each row's text tokens, chosen
    # uniformly; a special token ([CLS], [SEP], [PAD], a HF tokenizer's [UNK]) never, as HF's
    text = sp.text[ids]                                                # (B, T)
    k = (text.sum(1) * MASK_PROB).round().clamp_min(1)                 # (B,)
    score = torch.rand(B, T, generator=gen).masked_fill(~text, 2.0)    # specials sort last
    chosen = score.argsort(1).argsort(1) < k[:, None]                  # (B, T) each row's k lowest
    r = torch.rand(B, T, generator=gen)
    text_ids = sp.text.nonzero().flatten()                # a random token is a text token
    random_ids = text_ids[torch.randint(len(text_ids), (B, T), generator=gen)]
    inputs = torch.where(chosen & (r < MASK_TOKEN), sp.ids["[MASK]"],
                         torch.where(chosen & (r < MASK_TOKEN + RANDOM_TOKEN), random_ids, ids))
    batch = {"input_ids": inputs, "targets": torch.where(chosen, ids, -1),
             "token_type_ids": pad(types, 0, T), "attention_mask": (ids != pad_id).long()}
    return {**batch, "cls_targets": label} if pair else batch


def span_lengths(L):
    """(noise tokens, noise spans) in a window of L tokens, as T5's random_spans_noise_mask counts
    them."""
    n_noise = min(max(round(L * NOISE_DENSITY), 1), L - 1)
    return n_noise, max(round(n_noise / MEAN_SPAN), 1)


def span_window(enc_T, dec_T, n_sentinels=N_SENTINELS):
    """Longest window whose corrupted input (text, a sentinel per span, [EOS]) fits the encoder and
    whose target (a sentinel per span, the spans, [EOS]) fits the decoder (T5's
    compute_input_and_target_lengths), with a sentinel for each span."""
    def fits(L):
        n_noise, n_spans = span_lengths(L)
        return (L - n_noise + n_spans + 1 <= enc_T and n_noise + n_spans + 1 <= dec_T
                and n_spans <= n_sentinels)
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


def replace_runs(ids, runs, sentinels):
    """ids (L,) with each run of True in `runs` replaced by one sentinel, the k-th run by
    sentinels[k] (T5's noise_span_to_unique_sentinel)."""
    start = runs & ~torch.cat([torch.tensor([False]), runs[:-1]])      # first position of each run
    nth = (start.cumsum(0) - 1).clamp_min(0)                           # (L,) the run it is in
    return torch.where(start, sentinels[nth], ids)[~runs | start]


def span_batch(data, batch_size, gen, cfg, sp):
    """T5 span corruption: input = text with each noise span replaced by a sentinel, then [EOS];
    target = sentinel_0 span_0 sentinel_1 span_1 ... [EOS]. The window is as long as span_window
    allows, and every window corrupts to the same lengths, so no padding (and no attention_mask) is
    needed. As in T5, a window starts with text and ends with a noise span."""
    sp = specials(sp)
    sentinels = sp.sentinels
    L = span_window(*(stack_config(cfg, part).block_size for part in ("encoder", "decoder")),
                    len(sentinels))
    check_length(data, L)
    n_noise, n_spans = span_lengths(L)
    kind = (torch.arange(2 * n_spans) % 2).bool()                      # text, noise, text, noise...
    eos = torch.tensor([sp.ids["[EOS]"]])
    src, tgt = [], []
    for s in torch.randint(len(data) - L + 1, (batch_size,), generator=gen).tolist():
        window = data[s:s + L].long()
        lengths = torch.stack([random_split(L - n_noise, n_spans, gen),
                               random_split(n_noise, n_spans, gen)], 1)  # (n_spans, 2)
        noise = kind.repeat_interleave(lengths.flatten())      # (L,) starts with text, as T5's
        src.append(torch.cat([replace_runs(window, noise, sentinels), eos]))
        tgt.append(torch.cat([replace_runs(window, ~noise, sentinels), eos]))
    tgt = torch.stack(tgt)                                             # (B, n_noise + n_spans + 1)
    return {"input_ids": torch.stack(src), "targets": tgt,
            "decoder_input_ids": shift_right(tgt, cfg.decoder_start_token_id, sp.ids["[PAD]"])}


def seq2seq_batch(pairs, batch_size, gen, cfg, sp):
    """Random pairs: source + [EOS] padded with [PAD] (attention_mask 0 there), target + [EOS]
    padded with -1; each cut to its stack's block_size, [EOS] kept last (T5 appends it after
    trimming). A tokenizer's own BOS starts both, as its family frames them (BART: <s> ... </s>)."""
    if not pairs:
        raise ValueError("there are no source/target pairs to draw from; pass a TSV file with more "
                         "lines")
    sp = specials(sp)
    bos, eos, pad_id = sp.bos, sp.ids["[EOS]"], sp.ids["[PAD]"]
    enc_T, dec_T = (stack_config(cfg, part).block_size - len(bos) - 1
                    for part in ("encoder", "decoder"))           # text tokens beside BOS and EOS
    rows = [pairs[i] for i in torch.randint(len(pairs), (batch_size,), generator=gen).tolist()]
    src = pad([bos + s[:enc_T] + [eos] for s, _ in rows], pad_id)                      # (B, S)
    tgt = pad([bos + t[:dec_T] + [eos] for _, t in rows], -1)                          # (B, T)
    return {"input_ids": src, "attention_mask": (src != pad_id).long(), "targets": tgt,
            "decoder_input_ids": shift_right(tgt, cfg.decoder_start_token_id, pad_id)}


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


def classify_inputs(texts, cfg, sp):
    """model(**this) for texts (lists of token ids), each framed as classify trains it: an
    encoder's [CLS] text [SEP], a decoder's bare text, cut to block_size (the start kept) and
    right-padded (sp.pad; attention_mask 0 there). The decoder reads the last text token, where
    HF's *ForSequenceClassification reads the last token that is not its pad_token_id: sp.pad is
    one no text ends with (a pad or EOS token of the tokenizer's own)."""
    T, sp = cfg.block_size, specials(sp)
    rows = [[sp.ids["[CLS]"], *t[:T - 2], sp.ids["[SEP]"]] for t in texts] \
        if cfg.architecture == "encoder_only" else [t[:T] for t in texts]
    lengths = torch.tensor([len(r) for r in rows])
    ids = pad(rows, sp.pad)                                                            # (B, L)
    return {"input_ids": ids,
            "attention_mask": (torch.arange(ids.shape[1]) < lengths[:, None]).long()}


def classify_batch(rows, batch_size, gen, cfg, sp):
    """Random rows of a Labeled split (classify_inputs) with their class indices as cls_targets."""
    if not rows:
        raise ValueError("there are no text/label lines to draw from; pass a TSV file with more "
                         "lines")
    pick = [rows[i] for i in torch.randint(len(rows), (batch_size,), generator=gen).tolist()]
    return {**classify_inputs([t for t, _ in pick], cfg, sp),
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


def shift_right(targets, start, pad_id):
    """Decoder inputs: the start token (the config's decoder_start_token_id), then targets without
    their last; padding (-1) becomes pad_id (as HF's shift_tokens_right)."""
    shifted = torch.cat([torch.full_like(targets[:, :1], start), targets[:, :-1]], 1)    # (B, T)
    return shifted.masked_fill(shifted < 0, pad_id)


# one signature for all (see the module docstring); each entry passes on what its maker reads
OBJECTIVES = {
    "lm": lambda data, B, gen, cfg, sp, pair_task: lm_batch(data, B, gen, cfg.block_size),
    "mlm": lambda data, B, gen, cfg, sp, pair_task: mlm_batch(data, B, gen, cfg.block_size, sp,
                                                              pair_task),
    "span": lambda data, B, gen, cfg, sp, pair_task: span_batch(data, B, gen, cfg, sp),
    "seq2seq": lambda data, B, gen, cfg, sp, pair_task: seq2seq_batch(data, B, gen, cfg, sp),
    "classify": lambda data, B, gen, cfg, sp, pair_task: classify_batch(data, B, gen, cfg, sp),
}


# ----------------------------------------------------------------------------------------------
# 3. Choosing and checking an objective


def default_objective(cfg, data="") -> str:
    """lm for a decoder, or classify on a .tsv file (text<TAB>label) when it has a classifier
    (cls_head: a decoder *ForSequenceClassification); for an encoder mlm, or classify on a .tsv
    file; for an encoder-decoder span corruption, or seq2seq on a .tsv file of pairs."""
    tsv = str(data).endswith(".tsv")
    return {"decoder_only": "classify" if tsv and cfg.cls_head else "lm",
            "encoder_only": "classify" if tsv else "mlm",
            "encoder_decoder": "seq2seq" if tsv else "span"}[cfg.architecture]


def check_objective(name, cfg, sp=None, pair_task="none"):
    """A one-line ValueError, naming the fix, when objective `name` (and pair_task) cannot train
    cfg with special tokens sp (special_tokens; an int n: ours after n ids). sp None (the tokenizer
    not known yet) skips the checks of the vocabulary."""
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
    sp = specials(sp) if sp is not None else None
    need = config_overrides(name, sp, cfg.architecture) if sp is not None else {}
    n_ids = need.get("vocab_size", sp and sp.vocab)
    if sp is not None and cfg.vocab_size < n_ids:
        ours = f" + {len(ALL_SPECIALS)} special tokens" if sp.appended and need else ""
        raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the {n_ids} ids objective "
                         f"{name} uses (the tokenizer's {sp.vocab}{ours}); set vocab_size >= "
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
    if ARCHITECTURE[name] != "encoder_decoder":
        return
    blocks = [stack_config(cfg, part).block_size for part in ("encoder", "decoder")]
    if name == "span":
        span_window(*blocks, len(sp.sentinels) if sp is not None else N_SENTINELS)
    if name == "seq2seq" and sp is not None and min(blocks) < len(sp.bos) + 1:
        raise ValueError(f"block_size={min(blocks)} cannot hold the tokenizer's BOS and EOS that "
                         f"frame a source and a target; use block_size >= {len(sp.bos) + 1}")


# ----------------------------------------------------------------------------------------------
# 4. Inference: text with special tokens, fill-mask, one example shown after training


def encode(tok, text, sp) -> list:
    """Ids of text in which special token names stand for those tokens: ours ("[MASK]",
    "<extra_id_0>", ...) when appended, else the tokenizer's own as it spells them (which its own
    encode() finds: "[MASK]", "<mask>", "<extra_id_0>", ...)."""
    sp = specials(sp)
    if not sp.appended:
        return tok.encode(text)
    pieces = re.split(f"({'|'.join(map(re.escape, ALL_SPECIALS))})", text)  # text, name, ..., text
    return [i for k, piece in enumerate(pieces)
            for i in ([sp.ids[piece]] if k % 2 else tok.encode(piece))]


def fill_mask_ids(tok, text, sp) -> list:
    """[CLS] text [SEP] as ids, each [MASK] in text (as the tokens are named: encode) the mask
    token: "The [MASK] sat"."""
    sp = specials(sp)
    mask, ids = sp.names[sp.ids["[MASK]"]], encode(tok, text, sp)
    if sp.ids["[MASK]"] not in ids:
        raise ValueError(f"{text!r} has no {mask}; write {mask} where the model should fill in a "
                         f"token, e.g. 'The {mask} sat'")
    return [sp.ids["[CLS]"], *ids, sp.ids["[SEP]"]]


@torch.no_grad()
def fill_masks(model, input_ids, sp, **kwargs):
    """input_ids (B, T) with every [MASK] replaced by the model's most likely text token (never a
    special one).
    kwargs (token_type_ids, attention_mask) go to the model."""
    sp = specials(sp)
    logits = model(input_ids, **kwargs).logits[..., :len(sp.text)]     # (B, T, n_ids)
    logits = logits.masked_fill(~sp.text.to(logits.device), -math.inf)
    return torch.where(input_ids == sp.ids["[MASK]"], logits.argmax(-1), input_ids)


def decode(tok, ids, sp) -> str:
    """Text of ids: the tokenizer's pieces, special tokens by name; [PAD] and ids past the
    vocabulary and specials (a vocabulary padded larger) are left out."""
    sp = specials(sp)
    out, run = [], []
    for i in ids:
        if i not in sp.names:
            run.append(i)  # (tokenizers decode ids past their vocabulary to nothing)
            continue
        out.append(tok.decode(run))
        run = []
        if i != sp.ids.get("[PAD]"):
            out.append(sp.names[i])
    return "".join(out) + tok.decode(run)


@torch.no_grad()
def class_probs(model, texts, sp):
    """(len(texts), n_classes) class probabilities of texts (lists of token ids) as classify
    frames them."""
    device = next(model.parameters()).device
    batch = classify_inputs(texts, model.config, sp)
    return model(**{k: v.to(device) for k, v in batch.items()}).cls_logits.float().softmax(-1)


@torch.no_grad()
def show(model, name, data, tok, sp, gen, max_new_tokens=None) -> str:
    """One example of objective `name` (not lm) drawn from data and the model's answer, as text:
    mlm fills its masks, span and seq2seq generate the target greedily up to [EOS] (or
    max_new_tokens); classify shows SHOWN texts, each with the model's label and its
    probability."""
    sp = specials(sp)
    if name == "classify":
        rows = [data[i] for i in torch.randperm(len(data), generator=gen)[:SHOWN].tolist()]
        probs = class_probs(model, [t for t, _ in rows], sp)                  # (n, n_classes)
        short = lambda t: t if len(t) <= 60 else t[:57] + "..."           # noqa: E731
        return "\n".join(f"{short(tok.decode(t))!r} -> {data.classes[p.argmax()]} "
                         f"({p.max():.2f}); label {data.classes[c]}"
                         for (t, c), p in zip(rows, probs))
    device = next(model.parameters()).device
    batch = OBJECTIVES[name](data, 1, gen, model.config, sp, "none")
    batch = {k: v.to(device) for k, v in batch.items()}
    text = lambda ids: decode(tok, ids[0].tolist(), sp)                # noqa: E731
    if name == "mlm":
        filled = fill_masks(model, batch["input_ids"], sp, token_type_ids=batch["token_type_ids"],
                            attention_mask=batch["attention_mask"])
        return f"input: {text(batch['input_ids'])}\nmodel: {text(filled)}"
    n = min(batch["targets"].shape[1], max_new_tokens or batch["targets"].shape[1])
    out = model.generate(batch["input_ids"], n, temperature=0, stop_tokens=(sp.ids["[EOS]"],),
                         attention_mask=batch.get("attention_mask"))
    return (f"input:  {text(batch['input_ids'])}\ntarget: {text(batch['targets'])}\n"
            f"model:  {text(out[:, 1:])}")
