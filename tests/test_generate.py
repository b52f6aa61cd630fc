"""generate.py end to end through generate.main([...]): checkpoints written with save_checkpoint and
a data/tokenizers.py tokenizer (char, byte), with objectives' special tokens (span: --source, mlm:
--fill_mask), HF-format directories (tiny random Llama 3 / GPT-2 / Gemma / BART / T5 / BERT, each
with its family's tokenizer.json built by tests/test_tokenizers.py with the `tokenizers` library),
and every user error as one stderr line.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hf_decoder import redraw
from test_tokenizers import MIXED, bert, byte_level, charsmap, corpus, gemma, nmt_rules, t5

import generate
from data.objectives import (
    ARCHITECTURE,
    OBJECTIVES,
    config_overrides,
    decode,
    encode,
    fill_mask_ids,
    fill_masks,
    special_ids,
)
from data.tokenizers import hf_tokenizer, make_tokenizer
from model import Config, Transformer, save_checkpoint

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

TEXT = "the quick brown fox jumps over the lazy dog.\nhello world, again and again!\n"
SPEED = re.compile(r"^\d+ tokens in [\d.]+ s: [\d.]+ tokens/s$")
SMALL = dict(block_size=48, n_layer=2, n_head=2, d_model=32)


def checkpoint(path, tokenizer, steps=0, **kw):
    """A tiny model saved as train.py saves it: weights, config and the tokenizer's meta. A few
    training steps on TEXT make its greedy text varied (an untrained model repeats one token)."""
    torch.manual_seed(0)
    tok = make_tokenizer(tokenizer, TEXT)
    model = Transformer(Config(**{**SMALL, "vocab_size": tok.vocab_size, **kw}))
    data, opt = torch.tensor(tok.encode(TEXT * 4)), torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        i = torch.randint(0, len(data) - 33, (8, 1)) + torch.arange(33)          # (8, 33) windows
        loss = model(data[i[:, :-1]], targets=data[i[:, 1:]]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(path, model.eval(), tokenizer=tok.meta)
    return model, tok


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {"char": (d / "char.pt", *checkpoint(d / "char.pt", "char", steps=150)),  # learned pos.
            "byte": (d / "byte.pt", *checkpoint(d / "byte.pt", "byte", steps=150, position="rope",
                                                 norm="rmsnorm")),
            "enc": (d / "enc.pt", *checkpoint(d / "enc.pt", "byte", architecture="encoder_only")),
            "encdec": (d / "encdec.pt", *checkpoint(d / "encdec.pt", "byte",
                                                     architecture="encoder_decoder",
                                                     decoder_start_token_id=10))}


def cli(capsys, *argv):
    """-> (exit status, stdout, stderr) of one generate.py run."""
    rc = generate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def greedy(model, ids, n):
    return model.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()


def test_greedy_text_equals_model_generate(ckpts, capsys):
    path, model, tok = ckpts["char"]
    rc, out, err = cli(capsys, "--checkpoint", path, "--prompt", "hello", "--max_new_tokens", 20,
                       "--temperature", 0)
    assert rc == 0
    assert out == "hello" + tok.decode(greedy(model, tok.encode("hello"), 20)) + "\n"
    assert len(set(out)) > 6, "a continuation that repeats one character is a weak check"
    assert SPEED.match(err.strip()) and err.startswith("20 tokens in ")


def test_text_streams_token_by_token(ckpts, monkeypatch):
    """Each token is written (and flushed) as it is sampled: the prompt, then one piece a token."""
    path, model, tok = ckpts["char"]
    writes = []
    out = {"write": lambda self, s: writes.append(s), "flush": lambda self: writes.append(None)}
    monkeypatch.setattr(sys, "stdout", type("Out", (), out)())
    assert generate.main(["--checkpoint", str(path), "--prompt", "the", "--max_new_tokens", "8",
                          "--temperature", "0"]) == 0
    expected = ["the", *tok.decode(greedy(model, tok.encode("the"), 8)), "\n"]
    assert writes == [w for s in expected for w in (s, None)]


def test_byte_tokenizer_and_ids(ckpts, capsys):
    path, model, tok = ckpts["byte"]
    prompt = "héllo"                                                 # a two-byte character
    rc, out, _ = cli(capsys, "--checkpoint", path, "--prompt", prompt, "--max_new_tokens", 12,
                     "--temperature", 0)
    assert rc == 0 and out == prompt + tok.decode(greedy(model, list(prompt.encode()), 12)) + "\n"
    rc, out2, _ = cli(capsys, "--checkpoint", path, "--ids", ",".join(map(str, prompt.encode())),
                      "--max_new_tokens", 12, "--temperature", 0)
    assert rc == 0 and out2 == out


def test_prompt_file(ckpts, capsys, tmp_path):
    path, _, _ = ckpts["char"]
    (tmp_path / "p.txt").write_text("the lazy\ndog")
    args = ("--checkpoint", path, "--max_new_tokens", 10, "--temperature", 0.7, "--seed", 3)
    rc, out, _ = cli(capsys, *args, "--prompt_file", tmp_path / "p.txt")
    assert rc == 0 and out.startswith("the lazy\ndog")
    assert cli(capsys, *args, "--prompt", "the lazy\ndog")[1] == out


def test_seed_reproduces_and_num_samples(ckpts, capsys):
    path, _, _ = ckpts["char"]
    args = ("--checkpoint", path, "--prompt", "the", "--max_new_tokens", 30, "--temperature", 1.0)
    a, b, c = (cli(capsys, *args, "--seed", s)[1] for s in (1, 1, 2))
    assert a == b and a != c
    rc, out, err = cli(capsys, *args, "--seed", 1, "--num_samples", 3)
    samples = out.split(generate.SEPARATOR + "\n")
    assert rc == 0 and len(samples) == 3 and samples[0] == a     # the first is the one-sample run
    assert len(set(samples)) == 3                                 # the generator moves on
    assert all(s.startswith("the") and len(s) == 3 + 30 + 1 for s in samples)
    assert len(err.splitlines()) == 3 and all(SPEED.match(line) for line in err.splitlines())


def test_default_length_runs_past_a_learned_position_table(ckpts, capsys):
    """No --max_new_tokens: 256, past the 48-token context of learned positions (the last 48
    tokens are re-encoded for each new one, as the educational GPT does)."""
    path, _, _ = ckpts["char"]
    rc, out, err = cli(capsys, "--checkpoint", path, "--prompt", "hello")
    assert rc == 0 and len(out) == 5 + 256 + 1 and err.startswith("256 tokens in ")


def test_encoder_decoder_checkpoint(ckpts, capsys):
    """The output is the target, not a continuation: the source is not echoed. A checkpoint
    without an objective (lm) has no special tokens: the source is its text's ids alone."""
    path, model, tok = ckpts["encdec"]
    rc, out, _ = cli(capsys, "--checkpoint", path, "--source", "dog", "--max_new_tokens", 9,
                     "--temperature", 0)
    target = model.generate(torch.tensor([list(b"dog")]), 9, temperature=0)[0, 1:].tolist()
    assert rc == 0 and out == tok.decode(target) + "\n"


# ----------------------------------------------------------------------------------------------
# Checkpoints trained with data/objectives.py: special tokens by name, [EOS] ends a target


def objective_checkpoint(path, objective, steps, lr=1e-2, **kw):
    """A tiny model of the objective's architecture, its vocabulary sized by config_overrides,
    trained a few steps on TEXT with the objective's own batches and saved with the keys train.py
    writes."""
    torch.manual_seed(0)
    tok = make_tokenizer("char", TEXT)
    cfg = Config(**{**SMALL, "architecture": ARCHITECTURE[objective],
                    **config_overrides(objective, tok.vocab_size), **kw})
    model, gen = Transformer(cfg), torch.Generator().manual_seed(0)
    data, opt = torch.tensor(tok.encode(TEXT * 4)), torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(**OBJECTIVES[objective](data, 8, gen, cfg, tok.vocab_size, "none")).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(path, model.eval(), tokenizer=tok.meta, objective=objective, pair_task="none")
    return path, model, tok


@pytest.fixture(scope="module")
def objective_ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("objective")
    return {"span": objective_checkpoint(d / "span.pt", "span", steps=60, position="rope"),
            "mlm": objective_checkpoint(d / "mlm.pt", "mlm", steps=300, lr=1e-3, position="rope")}


SOURCE = "the quick brown<extra_id_0> jumps over<extra_id_1>dog.\nhello"


def test_span_source_streams_the_target_up_to_eos(objective_ckpts, capsys):
    """The source is encoded as span_batch frames it (text, sentinels by name, [EOS]); the target
    streams as objectives.decode writes it, sentinels by name, and stops at [EOS]."""
    path, model, tok = objective_ckpts["span"]
    sp = special_ids(tok.vocab_size)
    rc, out, err = cli(capsys, "--checkpoint", path, "--source", SOURCE, "--max_new_tokens", 40,
                       "--temperature", 0)
    src = encode(tok, SOURCE, tok.vocab_size) + [sp["[EOS]"]]
    assert sp["<extra_id_1>"] in src
    target = model.generate(torch.tensor([src]), 40, temperature=0,
                            stop_tokens=(sp["[EOS]"],))[0, 1:].tolist()
    n = target.index(sp["[EOS]"])                            # the trained model ends its target
    assert rc == 0 and out == decode(tok, target[:n], tok.vocab_size) + "\n"
    assert out.startswith("<extra_id_0>") and len(out) > 6
    assert err.startswith(f"{n + 1} tokens in ")


def test_span_source_samples_and_reads_files(objective_ckpts, capsys, tmp_path):
    """The sampling flags reach the decoder: the text is model.generate's with the same seed."""
    path, model, tok = objective_ckpts["span"]
    (tmp_path / "src.txt").write_text(SOURCE)
    rc, out, _ = cli(capsys, "--checkpoint", path, "--source_file", tmp_path / "src.txt",
                     "--max_new_tokens", 30, "--temperature", 1.5, "--top_k", 20, "--seed", 5)
    eos = special_ids(tok.vocab_size)["[EOS]"]
    gen = torch.Generator().manual_seed(5)
    src = torch.tensor([encode(tok, SOURCE, tok.vocab_size) + [eos]])
    target = model.generate(src, 30, temperature=1.5, top_k=20, stop_tokens=(eos,),
                            generator=gen)[0, 1:].tolist()
    assert rc == 0 and out == decode(tok, [t for t in target if t != eos], tok.vocab_size) + "\n"
    assert out != cli(capsys, "--checkpoint", path, "--source", SOURCE, "--max_new_tokens", 30,
                      "--temperature", 0)[1]


def expected_fill(probs, ids, mask_id, k, show):
    """The lines --fill_mask prints, from the probabilities (T, V) over the ids a mask allows."""
    where = [i for i, t in enumerate(ids) if t == mask_id]
    top = probs[where].topk(k)
    lines = [f"[MASK] {m}: " + ", ".join(f"{show(t)} {q:.4f}" for t, q in zip(i, p))
             for m, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1)]
    filled = list(ids)
    for i, t in zip(where, top.indices[:, 0].tolist()):
        filled[i] = t
    return lines, filled


def test_mlm_fill_mask_equals_model_logits(objective_ckpts, capsys):
    """[CLS] text [SEP] as mlm_batch frames a row; each mask's top-k text tokens (never a special
    one) with probabilities from the model's logits; the argmax-filled text equals
    objectives.fill_masks. (Our model on both sides: the printed numbers are the same floats.)"""
    path, model, tok = objective_ckpts["mlm"]
    base, text = tok.vocab_size, "the quick [MASK]rown fox jumps [MASK]ver the lazy dog."
    rc, out, err = cli(capsys, "--checkpoint", path, "--fill_mask", text, "--top_k", 3)
    ids = fill_mask_ids(tok, text, base)
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0].softmax(-1)[:, :base]       # (T, base)
    mask = special_ids(base)["[MASK]"]
    lines, filled = expected_fill(probs, ids, mask, 3, lambda i: repr(tok.decode([i])))
    assert torch.equal(torch.tensor([filled]), fill_masks(model, torch.tensor([ids]), base))
    assert rc == 0 and err == ""
    assert out == "\n".join(lines) + "\n" + decode(tok, filled[1:-1], base) + "\n"
    assert probs[ids.index(mask)].max() > 5 / base, "flat probabilities make a weak check"
    rc, out_ids, _ = cli(capsys, "--checkpoint", path, "--ids", ",".join(map(str, ids)),
                         "--top_k", 3)
    assert rc == 0 and out_ids == out                   # the same ids given directly


@pytest.mark.parametrize("ckpt, extra, message", [
    ("mlm", ["--fill_mask", "no mask here"], "has no [MASK]; write [MASK] where"),
    ("mlm", ["--fill_mask", "the [MASK]", "--top_k", "0"], "--fill_mask shows at least one"),
    ("mlm", ["--ids", "1,2,3"], "the input has no [MASK]"),
    ("mlm", ["--source", "x"], "--source is for encoder_decoder models, but"),
    ("span", ["--prompt", "x"], "is encoder_decoder: give its input with --source TEXT"),
    ("span", ["--source", "the Dog"], "character 'D' (U+0044) is not in this char vocabulary"),
])
def test_objective_errors(objective_ckpts, capsys, ckpt, extra, message):
    rc, out, err = cli(capsys, "--checkpoint", objective_ckpts[ckpt][0], *extra)
    assert rc == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert message in err, err


# ----------------------------------------------------------------------------------------------
# Errors: one line on stderr starting "error:", exit status 2, nothing on stdout

def write_bad(tmp_path, ckpts, kind):
    raw = ckpts["byte"][0].read_bytes()
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    if kind == "corrupt":
        path.write_bytes(raw[:2000] + bytes(b ^ 0xFF for b in raw[2000:2400]) + raw[2400:])
    if kind == "not_ours":
        torch.save({"weights": torch.zeros(3)}, path)
    return path


@pytest.mark.parametrize("ckpt, extra, message", [
    ("char", ["--temperature", "-0.5"], "temperature=-0.5 must be >= 0"),
    ("char", ["--top_p", "0"], "top_p=0.0 must be in (0, 1]"),
    ("char", ["--top_p", "1.5"], "top_p=1.5 must be in (0, 1]"),
    ("char", ["--top_k", "-3"], "top_k=-3 must be >= 0"),
    ("char", ["--max_new_tokens", "0"], "--max_new_tokens=0 must be at least 1"),
    ("char", ["--prompt", "hello " * 9], "prompt of 54 tokens"),     # learned positions: 48 rows
    ("char", ["--prompt", "Hello"], "character 'H' (U+0048) is not in this char vocab"),
    ("char", ["--ids", "1,x"], "must be comma-separated integers"),
    ("char", ["--ids", "1,999"], "999, outside the model's vocabulary"),
    ("char", ["--device", "cuda"], "--device cuda was asked for, but this torch"),
    ("char", ["--prompt_file", "/no/such/file"], "cannot read --prompt_file /no/such/file"),
    ("char", ["--prompt", "a\udcff"], "--prompt is not UTF-8 text (a byte at character 1)"),
    ("byte", ["--max_new_tokens", str(10 ** 13)], "no memory for the cache of 1 + "),   # RoPE
    ("char", ["--bogus"], "unrecognized arguments: --bogus"),
    ("enc", [], "enc.pt is encoder_only: give its input with --fill_mask"),
    ("enc", ["--fill_mask", "a [MASK]"], "has no [MASK] token to fill"),
    ("enc", ["--prompt", "a"], "--prompt is for decoder_only models, but"),
    ("encdec", [], "encdec.pt is encoder_decoder: give its input with --source TEXT"),
    ("encdec", ["--prompt", "dog"], "is encoder_decoder: give its input with --source TEXT (or "
                                    "--source_file)"),
    ("encdec", ["--fill_mask", "a [MASK]"], "--fill_mask is for encoder_only models, but"),
    ("char", ["--source", "the dog"], "--source is for encoder_decoder models, but"),
    ("char", ["--fill_mask", "the [MASK]"], "--fill_mask is for encoder_only models, but"),
    ("char", ["--ids", ""], "--ids is empty"),
    ("char", ["--source_file", "/no/such/file", "--prompt", "x"], "not allowed with argument"),
    ("missing", [], "does not exist"),
    ("truncated", [], "is truncated or corrupt"),
    ("corrupt", [], "is truncated or corrupt"),
    ("not_ours", [], "is not an anyformer checkpoint"),
])
def test_errors_are_one_line(ckpts, capsys, tmp_path, monkeypatch, ckpt, extra, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same on a GPU machine
    path = ckpts[ckpt][0] if ckpt in ckpts else write_bad(tmp_path, ckpts, ckpt)
    rc, out, err = cli(capsys, "--checkpoint", path, "--max_new_tokens", 5, *extra)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


# ----------------------------------------------------------------------------------------------
# HF directories: a tiny random HF model and its family's tokenizer.json (tests/test_tokenizers.py
# builds them with the `tokenizers` library): the CLI's text equals HF generate's, decoded by HF

PROMPT = "the quick café 123, über fox"


def hf_text(hf_tok, ids):
    return hf_tok.decode(ids, skip_special_tokens=True)


def save_hf(d, model, tok):
    model.save_pretrained(d)
    tok.save(str(d / "tokenizer.json"))
    return d, model, tok


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (directory, HF model, `tokenizers` tokenizer): decoder-only families."""
    out = {}
    for name, make, cls, kw in [
        ("llama3", lambda: byte_level("llama3"), "LlamaForCausalLM", dict(
            model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)),
        ("gpt2", lambda: byte_level("gpt2"), "GPT2LMHeadModel", dict(
            model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128)),
        ("gemma", gemma, "Gemma3ForCausalLM", dict(
            model_type="gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
            pad_token_id=0)),
    ]:
        tok = make()
        bos, eos = (2, 1) if name == "gemma" else (1, 0)   # <bos>, <eos>; <s>, <|endoftext|>
        torch.manual_seed(0)
        cfg = transformers.AutoConfig.for_model(**kw, vocab_size=tok.get_vocab_size(),
                                                 bos_token_id=bos, eos_token_id=eos,
                                                 initializer_range=0.3)
        model = getattr(transformers, cls)(cfg).eval()
        if name == "gemma":   # HF's init makes Gemma repeat one token: weights every part shows in
            redraw(model, zero_centred_norms=True)
        out[name] = save_hf(tmp_path_factory.mktemp(name), model, tok)
    return out


@pytest.mark.parametrize("name", ["llama3", "gpt2", "gemma"])
def test_hf_directory_greedy_equals_hf_generate(hf_dirs, capsys, name):
    """The prompt's ids are the tokenizer's with its special tokens (Llama 3's and Gemma's BOS);
    the text after the echoed prompt is HF's decoding of HF's own greedy continuation."""
    d, model, hf_tok = hf_dirs[name]
    rc, out, err = cli(capsys, "--hf", d, "--prompt", PROMPT, "--max_new_tokens", 15,
                       "--temperature", 0)
    x = torch.tensor([hf_tok.encode(PROMPT).ids])
    assert (x[0, 0] == 2) == (name == "gemma")                       # Gemma's BOS is added
    with torch.no_grad():
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=15,
                             do_sample=False, eos_token_id=None)[0].tolist()
    assert len(set(ref[x.shape[1]:])) > 3, "a continuation repeating one token is a weak check"
    assert rc == 0 and SPEED.match(err.strip())
    full, prompt = hf_text(hf_tok, ref), hf_text(hf_tok, ref[:x.shape[1]])
    assert full.startswith(prompt) and out == PROMPT + full[len(prompt):] + "\n"


def test_hf_directory_stops_at_eos(hf_dirs, capsys):
    """Sampling ends at the family's EOS (config.json's eos_token_id), which is not printed."""
    d, model, hf_tok = hf_dirs["gemma"]
    x = torch.tensor([hf_tok.encode(PROMPT).ids])
    with torch.no_grad():
        first = model(x).logits[0, -1].argmax().item()
    config = json.loads((d / "config.json").read_text())
    (d / "generation_config.json").unlink(missing_ok=True)
    try:   # make the greedy first token the EOS
        (d / "config.json").write_text(json.dumps({**config, "eos_token_id": first}))
        rc, out, err = cli(capsys, "--hf", d, "--prompt", PROMPT, "--max_new_tokens", 15,
                           "--temperature", 0)
    finally:
        (d / "config.json").write_text(json.dumps(config))
    assert rc == 0 and out == PROMPT + "\n" and err.startswith("1 tokens in ")


def test_hf_directory_without_tokenizer_asks_for_ids(hf_dirs, capsys, tmp_path):
    d, _, _ = hf_dirs["llama3"]
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    rc, out, err = cli(capsys, "--hf", tmp_path, "--prompt", "hello")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: ") and "has no tokenizer.json; give the prompt as token ids " \
        "with --ids" in err
    rc, out, _ = cli(capsys, "--hf", tmp_path, "--ids", "5,6,7", "--max_new_tokens", 4,
                     "--temperature", 0)
    ours = Transformer.from_pretrained(tmp_path)
    stop = json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"]
    new = [t for t in greedy(ours, [5, 6, 7], 4) if t != stop]
    assert rc == 0 and out == "5,6,7" + "".join(f",{t}" for t in new) + "\n"


# ----------------------------------------------------------------------------------------------
# HF encoder-decoders: --source through BART's and T5's tokenizer.json


def bart_tokenizer(d):
    """BART's tokenizer.json as HF writes it (RobertaProcessing: <s> text </s>; <mask> takes the
    space before it along), over a BPE trained here whose ids are shuffled, as fairseq's frequency
    order leaves BART's: the ids do not follow the merges, so ranking by id would merge wrongly."""
    tj = json.loads(byte_level("gpt2").to_str())
    rest = [t for t in tj["model"]["vocab"] if t not in ("<|endoftext|>", "<s>")]
    rest = [rest[i] for i in torch.randperm(len(rest), generator=torch.Generator().manual_seed(0))]
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *rest, "<mask>"])}
    tok = transformers.BartTokenizer(vocab=vocab, merges=[tuple(m) for m in tj["model"]["merges"]],
                                     mask_token=tokenizers.AddedToken("<mask>", lstrip=True,
                                                                      special=True))
    tok.save_pretrained(d)
    return tok


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    """-> (directory, HF model, HF tokenizer): a tiny random BART, weights large enough for
    varied output."""
    d = tmp_path_factory.mktemp("bart")
    tok = bart_tokenizer(d)
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2,
                                  decoder_layers=2, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, init_std=0.3)
    model = transformers.BartForConditionalGeneration(cfg).eval()
    model.save_pretrained(d)
    return d, model, tok


def test_bart_tokenizer_matches_hf(bart_dir):
    d, _, hf_tok = bart_dir
    ours = hf_tokenizer(d)
    texts = MIXED + corpus()[:20] + ["UN Chief Says There Is No <mask> in Syria",
                                     "a  <mask>b<mask>", "<s>x</s> y"]
    for text in texts:
        ids = hf_tok(text).input_ids
        assert ours.encode(text, add_special_tokens=True) == ids, text
        assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert ours.encode("a <mask>")[-1] == hf_tok.mask_token_id
    assert ours.encode("x", add_special_tokens=True)[::2] == [0, 2]            # <s> x </s>


def test_bart_source_greedy_equals_hf_generate(bart_dir, capsys):
    """The target streamed for --source equals the HF tokenizer's decoding of HF's own greedy
    generate (no forced BOS/EOS: generate.py stops at eos_token_id only)."""
    d, model, hf_tok = bart_dir
    source = "Привет, как дела? the lazy dog 42"
    rc, out, err = cli(capsys, "--hf", d, "--source", source, "--max_new_tokens", 15,
                       "--temperature", 0, "--repetition_penalty", 1.3)
    x = torch.tensor([hf_tok(source).input_ids])
    with torch.no_grad():
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=15,
                             do_sample=False, repetition_penalty=1.3, forced_bos_token_id=None,
                             forced_eos_token_id=None)
    assert len(set(ref[0].tolist())) > 8, "a target repeating one token is a weak check"
    assert rc == 0 and SPEED.match(err.strip())
    assert out == hf_tok.decode(ref[0, 1:].tolist(), skip_special_tokens=True) + "\n"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """-> (directory, HF model, `tokenizers` tokenizer): T5's Unigram tokenizer.json (nmt_nfkc
    charsmap, "▁" words, "$A </s>", sentinels) and a tiny random T5."""
    tok = t5(charsmap(nmt_rules()))
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=tok.get_vocab_size(), d_model=32, d_kv=8, d_ff=64,
                                num_layers=2, num_heads=4, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1, initializer_factor=3.0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    return save_hf(tmp_path_factory.mktemp("t5"), model, tok)


def test_t5_source_greedy_equals_hf_generate(t5_dir, capsys):
    """--source text is T5's tokenizer's ids, "</s>" appended; the target is HF's greedy one,
    decoded by the tokenizer (its first "▁" dropped), up to </s>."""
    d, model, hf_tok = t5_dir
    source = "the quick brown fox<extra_id_0> über café 123"
    rc, out, err = cli(capsys, "--hf", d, "--source", source, "--max_new_tokens", 12,
                       "--temperature", 0, "--repetition_penalty", 1.3)
    ids = hf_tok.encode(source).ids
    assert ids[-1] == 1 and hf_tok.token_to_id("<extra_id_0>") in ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12,
                             do_sample=False, repetition_penalty=1.3)[0, 1:].tolist()
    assert len(set(ref)) > 3, "a target repeating one token is a weak check"
    assert rc == 0 and SPEED.match(err.strip())
    assert out == hf_text(hf_tok, ref[:ref.index(1) if 1 in ref else None]) + "\n"


# ----------------------------------------------------------------------------------------------
# HF encoders: --fill_mask through BERT's WordPiece tokenizer.json


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """-> (directory, HF BertForMaskedLM read from it, HF tokenizer). The file is a
    BertForPreTraining one (MLM + NSP heads, as bert-base-uncased's); weights large enough for
    peaked probabilities."""
    d = tmp_path_factory.mktemp("bert")
    tok = bert()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64, initializer_range=0.3)
    transformers.BertForPreTraining(cfg).save_pretrained(d)
    tok.save(str(d / "tokenizer.json"))
    transformers.logging.set_verbosity_error()
    return d, transformers.BertForMaskedLM.from_pretrained(d).eval(), \
        transformers.AutoTokenizer.from_pretrained(d)


FILL_LINE = re.compile(r"^\[MASK\] (\d+): (.*)$")


def test_bert_fill_mask_equals_hf(bert_dir, capsys):
    """Ids as HF's tokenizer gives them ([CLS] text [SEP], the literal [MASK] its token); each
    mask's top 5 (the same tokens, in order; probabilities within 1e-4 of HF's: the printed
    values are compared as numbers, not as rounded text) and the filled text from HF's masked-LM
    logits, decoded as HF's fill-mask pipeline does."""
    d, hf, hf_tok = bert_dir
    text = "The quick [MASK] fox jumps over the [MASK] dog!"
    rc, out, err = cli(capsys, "--hf", d, "--fill_mask", text)
    ids = hf_tok(text).input_ids
    assert hf_tokenizer(d).encode(text, add_special_tokens=True) == ids
    assert ids.count(hf_tok.mask_token_id) == 2
    with torch.no_grad():
        probs = hf(torch.tensor([ids])).logits[0].softmax(-1)                    # (T, V)
    where = [i for i, t in enumerate(ids) if t == hf_tok.mask_token_id]
    top = probs[where].topk(5)
    *lines, filled_text = out.splitlines()
    assert rc == 0 and err == "" and len(lines) == 2
    for m, line in enumerate(lines):
        number, shown = FILL_LINE.match(line).groups()
        pairs = [(tok, float(p)) for tok, p in re.findall(r"('(?:[^'\\]|\\.)*') ([\d.]+)", shown)]
        want = [repr(hf_tok.convert_ids_to_tokens(i)) for i in top.indices[m].tolist()]
        assert int(number) == m + 1 and [t for t, _ in pairs] == want
        assert torch.allclose(torch.tensor([p for _, p in pairs]), top.values[m], atol=1e-4)
    filled = list(ids)
    for i, t in zip(where, top.indices[:, 0].tolist()):
        filled[i] = t
    assert filled_text == hf_tok.decode(filled, skip_special_tokens=True)
    assert probs[where[0]].max() > 5 / probs.shape[-1], "flat probabilities make a weak check"


@pytest.mark.parametrize("extra, message", [
    (["--fill_mask", "no mask here"], "the input has no [MASK] (id 4)"),
    (["--source", "a [MASK]"], "--source is for encoder_decoder models, but"),
    ([], 'is encoder_only: give its input with --fill_mask "TEXT with [MASK]"'),
])
def test_bert_errors(bert_dir, capsys, extra, message):
    rc, out, err = cli(capsys, "--hf", bert_dir[0], *extra)
    assert rc == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1 \
        and message in err, err


# ----------------------------------------------------------------------------------------------
# Bad HF directories and input files: one line, exit status 2, no traceback


def broken_hf_dir(tmp_path, hf_dirs, kind):
    """A copy of the gemma directory with one thing wrong."""
    src, d = hf_dirs["gemma"][0], tmp_path / kind
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    tj = json.loads((d / "tokenizer.json").read_text())
    if kind == "tokenizer_not_json":
        (d / "tokenizer.json").write_text('{"model": ')
    if kind == "tokenizer_no_vocab":
        del tj["model"]["vocab"]
        (d / "tokenizer.json").write_text(json.dumps(tj))
    if kind == "tokenizer_unknown_part":
        tj["normalizer"] = {"type": "Nmt"}
        (d / "tokenizer.json").write_text(json.dumps(tj))
    if kind == "tokenizer_not_utf8":
        (d / "tokenizer.json").write_bytes(b"\xff" + (d / "tokenizer.json").read_bytes())
    if kind == "generation_config_not_json":
        (d / "generation_config.json").write_text("{eos")
    if kind == "no_dir":
        return tmp_path / "missing"
    return d


@pytest.mark.parametrize("kind, extra, message", [
    ("tokenizer_not_json", [], "tokenizer.json is not JSON (Expecting value at line 1 column 11)"),
    ("tokenizer_no_vocab", [], "tokenizer.json lacks the entry 'vocab'"),
    ("tokenizer_unknown_part", [], "its normalizer 'Nmt' is not supported"),
    ("tokenizer_not_utf8", [], "cannot read"),
    ("generation_config_not_json", [], "generation_config.json is not a JSON object"),
    ("no_dir", [], "is not a directory; pass a HF-format directory"),
    ("ok", ["--prompt_file", "DIR"], "cannot read --prompt_file"),
    ("ok", ["--prompt_file", "LATIN1"], "is not UTF-8 text (byte at offset 3)"),
    ("ok", ["--prompt_file", "EMPTY"], "empty.txt is empty; pass some text"),
    ("ok", ["--prompt", ""], "--prompt is empty"),
    ("ok", ["--temperature", "nan"], "argument --temperature: invalid finite value: 'nan'"),
    ("ok", ["--top_p", "inf"], "argument --top_p: invalid finite value: 'inf'"),
    ("ok", ["--max_new_tokens", "ten"], "argument --max_new_tokens: invalid int value: 'ten'"),
    ("ok", ["--seed", "-1"], "--seed=-1 must be in [0, 2**63)"),
    ("ok", ["--num_samples", "0"], "--num_samples=0 must be at least 1"),
    ("ok", ["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    ("ok", ["--ids", "1,,2,99999"], "--ids has 99999, outside the model's vocabulary"),
])
def test_bad_hf_inputs_are_one_line(hf_dirs, capsys, tmp_path, kind, extra, message):
    d = hf_dirs["gemma"][0] if kind == "ok" else broken_hf_dir(tmp_path, hf_dirs, kind)
    files = {"DIR": tmp_path, "LATIN1": tmp_path / "latin1.txt", "EMPTY": tmp_path / "empty.txt"}
    files["LATIN1"].write_bytes("café".encode("latin-1"))
    files["EMPTY"].write_text("")
    extra = [str(files.get(a, a)) for a in extra]
    rc, out, err = cli(capsys, "--hf", d, "--max_new_tokens", 3, *(extra or ["--prompt", "hi"]))
    assert rc == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert message in err, err
    if "prompt_file" in " ".join(extra):
        assert str(files[[k for k in files if str(files[k]) in extra][0]]) in err   # the file named


def test_cli_exit_status_and_no_traceback(hf_dirs, tmp_path):
    """As a process: exit status 2, one line, no traceback (main's handler, not argparse's)."""
    d = broken_hf_dir(tmp_path, hf_dirs, "tokenizer_no_vocab")
    for argv in (["--hf", str(d), "--prompt", "hi"], ["--hf", str(d), "--temperature", "x"]):
        r = subprocess.run([sys.executable, str(ROOT / "generate.py"), *argv], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
