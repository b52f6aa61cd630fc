"""Training objectives (data/objectives.py): BERT masking statistics and NSP/SOP pairs checked
against the source stream, T5 span corruption reassembled into its window, TSV pairs, the errors,
and a tiny model of each matching architecture trained a few dozen steps with its objective."""
import pytest
import torch

from data.objectives import (
    ALL_SPECIALS,
    N_SENTINELS,
    OBJECTIVES,
    check_objective,
    config_overrides,
    decode,
    default_objective,
    encode,
    fill_mask_ids,
    fill_masks,
    load_pairs,
    show,
    span_lengths,
    span_window,
    special_ids,
)
from data.prepare import make_tokenizer
from model import Config, Transformer

# synthetic streams: a permutation of the base vocabulary, so every token says where it is
BASE = 5000
STREAM = torch.randperm(BASE, generator=torch.Generator().manual_seed(0)).to(torch.uint16)
WHERE = torch.argsort(STREAM.long())      # token id -> its position in STREAM
PAD, MASK, CLS, SEP, EOS = (BASE + i for i in range(5))
SENT0 = BASE + 5
TEXT = ("The cat sat on the mat. The dog sat on the log. A bird sang in the tree, and the cat "
        "looked up.\nThe dog barked at the bird, and the bird flew away over the hill. Then the "
        "cat went back to sleep on the mat.\nIn the morning the sun rose over the hill and the "
        "bird came back to the tree to sing again.\n") * 12


def encoder(vocab, **kw):
    return Config(architecture="encoder_only", vocab_size=vocab, block_size=64, n_layer=2, n_head=2,
                  d_model=64, type_vocab_size=2, cls_head=True, **kw)


def encdec(vocab, base):  # a tiny Enhanced Transformer: RMSNorm, RoPE, pre-LN, no biases
    return Config(architecture="encoder_decoder", vocab_size=vocab, block_size=64, n_layer=2,
                  n_head=2, d_model=64, norm="rmsnorm", position="rope", bias=False,
                  decoder_start_token_id=special_ids(base)["[PAD]"])


def draw(name, data, n, cfg, base=BASE, pair_task="none", seed=0):
    return OBJECTIVES[name](data, n, torch.Generator().manual_seed(seed), cfg, base, pair_task)


def test_special_ids_and_overrides():
    ids = special_ids(BASE)
    names = ("[PAD]", "[MASK]", "[CLS]", "[SEP]", "[EOS]", "<extra_id_0>")
    assert [ids[s] for s in names] == [PAD, MASK, CLS, SEP, EOS, SENT0]
    assert ids[f"<extra_id_{N_SENTINELS - 1}>"] == BASE + len(ALL_SPECIALS) - 1 == BASE + 104
    assert config_overrides("lm", BASE) == {}
    assert config_overrides("mlm", BASE) == {"vocab_size": BASE + 105}
    assert config_overrides("seq2seq", BASE) == {"vocab_size": BASE + 105,
                                                 "decoder_start_token_id": PAD}


def test_lm_windows():
    b = draw("lm", STREAM, 32, Config(block_size=16, vocab_size=BASE))
    assert set(b) == {"input_ids", "targets"}
    assert torch.equal(b["input_ids"][:, 1:], b["targets"][:, :-1])
    starts = WHERE[b["input_ids"][:, 0]]
    assert torch.equal(b["targets"], STREAM[starts[:, None] + torch.arange(1, 17)].long())


def split_rows(b):
    """Per row: the original ids (masks undone), the positions of its [SEP]s, the padding start."""
    original = torch.where(b["targets"] >= 0, b["targets"], b["input_ids"])
    for row in original:
        seps = (row == SEP).nonzero().flatten().tolist()
        yield row, seps, int((row != PAD).sum())


@pytest.mark.parametrize("pair_task", ["nsp", "sop", "none"])
def test_mlm_structure(pair_task):
    """[CLS] A [SEP] B [SEP] + padding; token types, attention mask and the NSP/SOP labels checked
    against where each segment sits in the stream; masking never touches a special token."""
    b = draw("mlm", STREAM, 512, encoder(BASE + 105), pair_task=pair_task)
    assert set(b) == {"input_ids", "targets", "token_type_ids", "attention_mask"} | (
        {"cls_targets"} if pair_task != "none" else set())
    assert b["input_ids"].shape == (512, 64)
    padded = 0
    for i, (row, seps, n) in enumerate(split_rows(b)):
        assert row[0] == CLS and (row[:n] >= BASE).sum() == 1 + len(seps) and (row[n:] == PAD).all()
        assert seps[-1] == n - 1 and len(seps) == (2 if pair_task != "none" else 1)
        assert torch.equal(b["attention_mask"][i], (torch.arange(64) < n).long())
        types = torch.zeros(64, dtype=torch.long)
        types[seps[0] + 1:n] = 1
        assert torch.equal(b["token_type_ids"][i], types)
        assert (b["targets"][i][row >= BASE] == -1).all()               # specials never masked
        padded += n < 64
        a = WHERE[row[1:seps[0]]]
        assert torch.equal(a, a[0] + torch.arange(len(a)))              # A: one contiguous span
        if pair_task == "none":
            continue
        bb = WHERE[row[seps[0] + 1:seps[1]]]
        assert torch.equal(bb, bb[0] + torch.arange(len(bb)))
        y = int(b["cls_targets"][i])
        if pair_task == "nsp":                                          # 0: B continues A, 1: not
            assert (bb[0] == a[-1] + 1) == (y == 0)
        else:                                                           # 0: A then B, 1: swapped
            assert (bb[0] == a[-1] + 1 if y == 0 else a[0] == bb[-1] + 1)
    assert 0.05 < padded / 512 < 0.16                                   # BERT's short_seq_prob 0.1
    if pair_task != "none":
        assert abs(b["cls_targets"].float().mean() - 0.5) < 0.07


def test_mlm_masking_statistics():
    """15% of the text tokens predicted; of those 80% [MASK], 10% a random text token, 10% kept."""
    b = draw("mlm", STREAM, 1024, encoder(BASE + 105), pair_task="nsp")
    x, y = b["input_ids"], b["targets"]
    text = torch.where(y >= 0, y, x) < BASE
    chosen = y >= 0
    assert abs(chosen.sum() / text.sum() - 0.15) < 0.005
    kept, masked = (x == y)[chosen], (x == MASK)[chosen]
    replaced = chosen & (x != y) & (x != MASK)
    assert abs(masked.float().mean() - 0.8) < 0.015
    assert abs(kept.float().mean() - 0.1) < 0.012          # (+ 1/5000: random picks of the same)
    assert abs(replaced.sum() / chosen.sum() - 0.1) < 0.012
    assert (x[replaced] < BASE).all()


def test_span_reassembles_the_window():
    """Putting each sentinel's span from the target back into the input gives the window exactly;
    the decoder input is the target shifted right behind [PAD]; lengths fill the encoder block."""
    cfg = encdec(BASE + 105, BASE)
    b = draw("span", STREAM, 200, cfg)
    src, tgt, dec = b["input_ids"], b["targets"], b["decoder_input_ids"]
    assert set(b) == {"input_ids", "decoder_input_ids", "targets"}
    assert src.shape[1] in (63, 64) and tgt.shape[1] <= 64
    assert torch.equal(dec[:, 0], torch.full((200,), PAD)) and torch.equal(dec[:, 1:], tgt[:, :-1])
    L = span_window(64, 64)
    n_noise, n_spans = span_lengths(L)
    noise_at, span_lens = torch.zeros(L), []
    for s, t in zip(src.tolist(), tgt.tolist()):
        assert s[-1] == EOS and t[-1] == EOS
        sentinels = list(range(SENT0, SENT0 + n_spans))         # in order, once each, in both
        assert [i for i in s if i >= BASE][:-1] == [i for i in t if i >= BASE][:-1] == sentinels
        spans, cur = {}, None
        for i in t[:-1]:
            if i >= SENT0:
                cur = spans.setdefault(i, [])
            else:
                cur.append(i)
        window, pos = [], []
        for i in s[:-1]:
            pos.extend([False] if i < BASE else [True] * len(spans[i]))
            window.extend([i] if i < BASE else spans[i])
        start = int(WHERE[window[0]])
        assert window == STREAM[start:start + L].tolist()
        noise_at += torch.tensor(pos)
        span_lens += [len(v) for v in spans.values()]
    assert noise_at.sum() == 200 * n_noise and abs(n_noise / L - 0.15) < 0.01
    assert abs(n_noise / n_spans - 3) < 0.5
    assert noise_at[0] == 0 and noise_at[-1] == 200         # T5: text first, a noise span last,
    inner = noise_at[1:L - 8] / 200                         # uniform in between
    assert abs(inner[:len(inner) // 2].mean() - inner[len(inner) // 2:].mean()) < 0.03
    assert inner.min() > 0.02
    assert min(span_lens) == 1 and max(span_lens) >= 6      # lengths vary around the mean of 3


def test_span_window_matches_t5():
    assert span_window(512, 512) == 568              # T5: 568 raw tokens -> 512 inputs, 114 targets
    assert span_lengths(568) == (85, 28)


def test_seq2seq_pairs(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("hello world\tbonjour le monde\r\n\nthe cat\tle chat\n" + "a" * 80 + "\t"
                    + "b" * 90 + "\n")
    tok = make_tokenizer("char", path.read_text())
    pairs = load_pairs(path, tok)
    assert [(tok.decode(s), tok.decode(t)) for s, t in pairs][:2] == [
        ("hello world", "bonjour le monde"), ("the cat", "le chat")]
    base = tok.vocab_size
    sp = special_ids(base)
    cfg = encdec(base + 105, base)
    b = draw("seq2seq", pairs, 64, cfg, base)
    for i in range(64):
        s, t = b["input_ids"][i], b["targets"][i]
        n, m = int(b["attention_mask"][i].sum()), int((t >= 0).sum())
        assert (s[n:] == sp["[PAD]"]).all() and (t[m:] == -1).all()
        assert s[n - 1] == t[m - 1] == sp["[EOS]"]
        src, tgt = next((a, c) for a, c in pairs if a[:n - 1] == s[:n - 1].tolist())
        assert s[:n - 1].tolist() == src[:63] and t[:m - 1].tolist() == tgt[:63]   # [EOS] kept last
        # [PAD] t_0 ... t_m-1 [PAD] ... (as HF's _shift_right: the [EOS] moves into padding, where
        # the targets are -1)
        d = b["decoder_input_ids"][i]
        assert d[0] == sp["[PAD]"] and torch.equal(d[1:m + 1], t[:m][:len(d) - 1])
        assert (d[m + 1:] == sp["[PAD]"]).all()


@pytest.mark.parametrize("text, message", [
    ("a\tb\nno tab here\n", r"pairs\.tsv line 2 has 1 tab-separated columns; each line must be "
                          r"source<TAB>target"),
    ("a\tb\nc\td\n\ne\tf\tg\n", r"line 4 has 3 tab-separated columns"),
    ("a\tb\n\t c\n", r"line 2 has an empty column"),
    ("", r"pairs\.tsv.* is empty"),
])
def test_pair_file_errors(tmp_path, text, message):
    path = tmp_path / "pairs.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_pairs(path, make_tokenizer("byte", ""))


@pytest.mark.parametrize("name, pair_task", [("mlm", "nsp"), ("mlm", "sop"), ("span", "none"),
                                             ("seq2seq", "none")])
def test_tiny_model_learns(tmp_path, name, pair_task):
    """A tiny model of the matching architecture, trained 40 AdamW steps on a char-level text: the
    loss on fixed val batches (including the NSP/SOP term) falls below 0.8 x its start. The example
    shown after training is the objective's; max_new_tokens cuts a generated answer short."""
    torch.manual_seed(0)
    if name == "seq2seq":  # reverse words: a task the decoder can only solve by reading the source
        words = TEXT.split()
        path = tmp_path / "reverse.tsv"
        path.write_text("".join(f"{w} {v}\t{v[::-1]} {w[::-1]}\n"
                                for w, v in zip(words, words[1:])))
        tok = make_tokenizer("char", path.read_text())
        pairs = load_pairs(path, tok)
        train, val = pairs[:-40], pairs[-40:]
    else:
        tok = make_tokenizer("char", TEXT)
        ids = torch.tensor(tok.encode(TEXT), dtype=torch.uint16)        # as in prepare.py's .bin
        train, val = ids[:-600], ids[-600:]
    base = tok.vocab_size
    cfg = encoder(base + 105) if name == "mlm" else encdec(base + 105, base)
    check_objective(name, cfg, base, pair_task)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    val_batches = [OBJECTIVES[name](val, 32, torch.Generator().manual_seed(i), cfg, base, pair_task)
                   for i in range(2)]

    def val_loss():
        with torch.no_grad():
            return sum(model(**b).loss.item() for b in val_batches) / len(val_batches)

    first, gen = val_loss(), torch.Generator().manual_seed(1)
    for _ in range(40):
        loss = model(**OBJECTIVES[name](train, 16, gen, cfg, base, pair_task)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = val_loss()
    assert last < 0.8 * first, (first, last)
    model.eval()
    shown = show(model, name, val, tok, base, torch.Generator().manual_seed(0))
    assert shown.startswith("input: ") and "[PAD]" not in shown
    if name == "mlm":  # each [MASK] filled by one character
        masked, filled = shown[len("input: "):].split("\nmodel: ")
        assert "[MASK]" in masked and "[MASK]" not in filled
        assert len(filled) == len(masked) - 5 * masked.count("[MASK]")
    else:
        target, answer = shown.split("\ntarget: ")[1].split("\nmodel:  ")
        assert target.endswith("[EOS]") and len(answer) > 0
        short = show(model, name, val, tok, base, torch.Generator().manual_seed(0),
                     max_new_tokens=1)
        first = short.split("\nmodel:  ")[1]
        assert short.split("\nmodel:  ")[0] == shown.split("\nmodel:  ")[0]   # the same example
        assert 0 < len(first) < len(answer) and answer.startswith(first)      # its first token
    if name == "span":  # every target starts with the first sentinel: learnt within 40 steps
        assert target.startswith("<extra_id_0>") and answer.startswith("<extra_id_0>")


def test_fill_mask():
    tok = make_tokenizer("char", "The cat sat")
    base = tok.vocab_size
    sp = special_ids(base)
    ids = fill_mask_ids(tok, "The [MASK] sat[MASK]", base)
    assert ids == [sp["[CLS]"], *tok.encode("The "), sp["[MASK]"], *tok.encode(" sat"),
                   sp["[MASK]"], sp["[SEP]"]]
    assert decode(tok, ids, base) == "[CLS]The [MASK] sat[MASK][SEP]"
    padded = [sp["[PAD]"], sp["<extra_id_3>"], *tok.encode("cat"), sp["[EOS]"], base + 999]
    assert decode(tok, padded, base) == "<extra_id_3>cat[EOS]"
    assert encode(tok, "<extra_id_1>at[EOS]", base) == [sp["<extra_id_1>"], *tok.encode("at"),
                                                        sp["[EOS]"]]
    with pytest.raises(ValueError, match=r"has no \[MASK\]; write \[MASK\] where"):
        fill_mask_ids(tok, "The cat sat", base)
    torch.manual_seed(0)
    model = Transformer(encoder(base + 105)).eval()
    x = torch.tensor([ids])
    out = fill_masks(model, x, base)
    logits = model(x).logits[0]
    is_mask = x[0] == sp["[MASK]"]
    assert torch.equal(out[0][~is_mask], x[0][~is_mask])
    assert torch.equal(out[0][is_mask], logits[is_mask, :base].argmax(-1))   # best text token


def test_default_objective():
    assert default_objective(Config()) == "lm"
    assert default_objective(encoder(200)) == "mlm"
    assert default_objective(encdec(200, 95), "my.txt") == "span"
    assert default_objective(encdec(200, 95), "data/en-fr.tsv") == "seq2seq"


@pytest.mark.parametrize("name, cfg, pair_task, message", [
    ("mlm", Config(vocab_size=200), "none",
     r"objective='mlm' trains encoder_only models but this config is decoder_only; use "
     r"objective=lm, or a config with architecture: encoder_only"),
    ("mlm", encdec(200, 95), "none", r"is encoder_decoder; use objective=span or seq2seq"),
    ("span", encoder(200), "none",
     r"objective='span' trains encoder_decoder models .* use objective=mlm"),
    ("seq2seq", Config(vocab_size=200), "none",
     r"objective='seq2seq' trains encoder_decoder .* objective=lm"),
    ("lm", encoder(200), "none",
     r"objective='lm' trains decoder_only models but this config is encoder_only"),
    ("spam", encdec(200, 95), "none", r"objective='spam' is not one of .*; did you mean 'span'\?"),
    ("mlm", encoder(200), "nps", r"pair_task='nps' is not one of .*; did you mean 'nsp'\?"),
    ("mlm", Config(architecture="encoder_only", vocab_size=200), "nsp",
     r"pair_task='nsp' .* needs objective=mlm, cls_head: true and type_vocab_size: 2 "
     r".*cls_head=False"),
    ("span", encdec(200, 95), "sop", r"pair_task='sop' .* needs objective=mlm"),
    ("mlm", encoder(150), "nsp",
     r"vocab_size=150 is smaller than the 200 ids objective mlm uses \(the tokenizer's 95 \+ 105 "
     r"special tokens\); set vocab_size >= 200 or drop the key"),
    ("lm", Config(vocab_size=90), "none",
     r"vocab_size=90 is smaller than the 95 ids objective lm uses \(the tokenizer's 95\); set "
     r"vocab_size >= 95"),
    ("span", Config(architecture="encoder_decoder", vocab_size=200), "none",
     r"decoder_start_token_id=0 is not \[PAD\]'s id 95, .*; set decoder_start_token_id: 95"),
])
def test_check_objective_errors(name, cfg, pair_task, message):
    with pytest.raises(ValueError, match=message):
        check_objective(name, cfg, 95, pair_task)


def test_check_objective_accepts_matches():
    for name, cfg, pair_task in [("lm", Config(vocab_size=95), "none"),
                                 ("mlm", encoder(200), "sop"), ("mlm", encoder(300), "none"),
                                 ("span", encdec(200, 95), "none"),
                                 ("seq2seq", encdec(200, 95), "none")]:
        check_objective(name, cfg, 95, pair_task)                       # raises on any mismatch
    with pytest.raises(ValueError, match=r"block_size >= 3 in both stacks"):
        check_objective("span", Config(architecture="encoder_decoder", vocab_size=200,
                                       decoder_start_token_id=95, block_size=2), 95)


def test_check_objective_without_the_tokenizer():
    """base_vocab None (train.py checks before the data is prepared): the vocabulary is not checked
    yet, everything else is."""
    check_objective("mlm", encoder(10), None, "nsp")                   # 10 ids: too few, once known
    check_objective("span", Config(architecture="encoder_decoder", vocab_size=10), None)
    with pytest.raises(ValueError, match=r"vocab_size=10 is smaller than the 200 ids"):
        check_objective("mlm", encoder(10), 95, "nsp")
    with pytest.raises(ValueError, match=r"objective='mlm' trains encoder_only models"):
        check_objective("mlm", Config(vocab_size=200), None)
    with pytest.raises(ValueError, match=r"pair_task='nsp' .* needs objective=mlm"):
        check_objective("span", encdec(200, 95), None, "nsp")
    with pytest.raises(ValueError, match=r"block_size=4 cannot hold \[CLS\] A \[SEP\] B \[SEP\]"):
        check_objective("mlm", Config(architecture="encoder_only", vocab_size=200, block_size=4))
