"""decoding.py and the batched decode path, each checked against an independent reference.

int8        decoding.quantize: a Linear's int8 output against fp32 on random matrices; on a small
            Llama trained here with HF (saved with save_pretrained, loaded with from_pretrained),
            the held-out loss moves by at most 0.02 and greedy decoding gives fp32's tokens; every
            decoder family quantizes (MoE is refused in one line).
speculative greedy output equals plain greedy decoding token for token (drafts that never and that
            always agree, learned positions, RoPE, a sliding window); sampling is distributed as
            the target's: a chi-square test of the verification step against exact distributions,
            and of whole generate calls against the target's next-token probabilities.
beams       beam_search returns HF generate(num_beams=...)'s sequences for T5, BART, Marian and
            Llama random models, with stop tokens that end beams at varied lengths.
batches     a list of prompts decodes as one left-padded batch; each row equals the prompt decoded
            alone (tokens, and logits within fp32 tolerance) for RoPE, learned positions, a sliding
            window and DeltaNet; a static cache (what a compiled step reads) equals a full forward.
CLI         generate.py's decoding options end to end, and their conflicts as one-line errors.
"""
import copy
import inspect
import tempfile

import pytest
import torch
import torch.nn as nn
from test_cache import BASE, redraw
from test_hf_encoder import CASES as SEQ2SEQ_CASES
from test_hf_encoder import hf_decoder_cache, padding_mask
from test_hf_encoder import ids as source_ids
from test_hf_encoder import make_hf as make_seq2seq

import generate
from decoding import (
    DynamicInt8Linear,
    WeightOnlyInt8Linear,
    beam_search,
    quantize,
    speculative_accept,
    speculative_generate,
)
from model import Config, KVCache, Transformer, save_checkpoint

transformers = pytest.importorskip("transformers")

ROPE = dict(position="rope", norm="rmsnorm", n_kv_head=2)
FAMILIES = {  # name -> Config overrides of test_cache's BASE (vocab 97, 2 layers, width 32)
    "rope_gqa": ROPE,
    "learned": dict(),
    "window": dict(ROPE, layer_pattern=["local_attn"], sliding_window=5),
    "deltanet": dict(ROPE, attention_type="hybrid", hybrid_ratio=1, dn_heads=2, dn_head_dim=8),
}


def model_of(name, seed=0, **kw):
    return redraw(Transformer(Config(**{**BASE, **FAMILIES[name], **kw})), seed)


def chi_square(counts, probs):
    """Pearson's statistic of observed counts against expected probabilities (cells with an
    expected count under 5 pooled into one, as the test requires)."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = torch.cat((counts[~small], counts[small].sum()[None]))
    exp = torch.cat((expected[~small], expected[small].sum()[None]))
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


CHI2_999 = {4: 18.47, 5: 20.52, 9: 27.88, 14: 36.12, 19: 43.82, 24: 51.18, 29: 58.30,
            34: 65.25, 35: 66.62}  # the chi-square 0.999 quantile by degrees of freedom


def chi2_limit(dof):
    return CHI2_999.get(dof) or dof + 3.1 * (2 * dof) ** 0.5 + 3  # Wilson-Hilferty-like bound


# ----------------------------------------------------------------------------------------------
# int8 weights


@pytest.mark.parametrize("kernel, bound", [(DynamicInt8Linear, 0.02), (WeightOnlyInt8Linear, 0.01)])
def test_int8_linear_is_close_to_fp32(kernel, bound):
    """Per-row int8 weights: ~0.5% error alone (weight-only), ~1% with the input quantized too
    (the CPU kernel); the bias passes through exactly."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 384)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(384, 256, generator=g) / 16)
        lin.bias.copy_(torch.randn(384, generator=g))
    x = torch.randn(3, 5, 256, generator=g)
    with torch.no_grad():
        ref, got = lin(x), kernel(lin)(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err = ((got - ref).norm() / (ref - lin.bias).norm()).item()
    assert 1e-4 < err <= bound


def test_quantize_replaces_linears_above_the_size_where_int8_pays():
    """A GLU's gate and up become one int8 matrix (one kernel call, each has a fixed cost): the
    same outputs as the two, stacked."""
    m = model_of("rope_gqa", d_ff=4096, ffn="glu", activation="silu")  # FFN: 4096 x 32: 131k
    ffn = copy.deepcopy(m.blocks[0].ffn)
    quantize(m, "int8", min_weights=100_000)
    kinds = {name: type(mod).__name__ for name, mod in m.named_modules()
             if isinstance(mod, (nn.Linear, DynamicInt8Linear))}
    assert kinds["blocks.0.ffn.gate_up"] == kinds["blocks.0.ffn.down"] == "DynamicInt8Linear"
    assert kinds["blocks.0.mixer.q_proj"] == "Linear"          # 32 x 32: fp32 is faster
    assert "blocks.0.ffn.gate" not in kinds and "blocks.0.ffn.up" not in kinds
    h = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = ffn(h), m.blocks[0].ffn(h)
    assert 0 < ((got - ref).norm() / ref.norm()).item() < 0.05   # two int8 layers: ~3.5%
    quantize(m, "int8", min_weights=0)
    assert not any(isinstance(mod, nn.Linear) for mod in m.modules())


@pytest.mark.parametrize("name", ["rope_gqa", "learned", "window", "deltanet", "gemma_like",
                                  "brt"])
def test_every_decoder_family_quantizes(name):
    """Logits near fp32's, through the cache too: within 25% here, where random weights at unit
    gain make the nets chaotic (2-15% measured; a wrong scale or layout is off by 100%), while
    the trained model below stays within its loss bound. (The CPU kernel quantizes each call's
    input with one scale, so a token's result depends a little on what shares its call: cached
    steps are close to the full forward, not equal.)"""
    extra = {"gemma_like": dict(ROPE, norm_unit_offset=True, norm_placement="sandwich",
                                attn_softcap=2.0, final_softcap=3.0, qk_norm=True),
             "brt": dict(block_width=4, recurrent_layers=(1,), n_states=4, position="rope")}
    m = (redraw(Transformer(Config(**{**BASE, **extra[name]}))) if name in extra
         else model_of(name))
    q = quantize(copy.deepcopy(m), "int8", min_weights=0)
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = m(x).logits, q(x).logits
    assert 0 < ((got - ref).norm() / ref.norm()).item() < 0.25
    if name != "brt":                      # block-recurrent decoding runs by blocks, not tokens
        cache = q.setup_cache(2, 12)
        with torch.no_grad():
            steps = [q(x[:, :5], cache=cache, input_pos=torch.arange(5)).logits]
            steps += [q(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])).logits
                      for t in range(5, 12)]
        assert ((torch.cat(steps, 1) - ref).norm() / ref.norm()).item() < 0.25


def test_quantize_refuses_moe_in_one_line():
    m = Transformer(Config(**BASE, ffn_pattern=["moe"], n_expert=4, moe_top_k=2))
    with pytest.raises(ValueError) as e:
        quantize(m, "int8")
    assert "MoE" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="is not one of"):
        quantize(model_of("learned"), "int4")


TRAIN_TEXT = inspect.getsource(inspect)[:60_000].encode()   # the stdlib's own source: real text


@pytest.fixture(scope="module")
def trained_llama():
    """A small HF Llama trained on bytes of real text (a few seconds), saved with save_pretrained
    and loaded with from_pretrained: weights with real structure, unlike random ones."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    hf = transformers.LlamaForCausalLM(cfg)
    data = torch.tensor(list(TRAIN_TEXT))
    split = int(len(data) * 0.9)
    opt = torch.optim.AdamW(hf.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        i = torch.randint(0, split - 65, (8, 1), generator=g) + torch.arange(65)
        loss = hf(input_ids=data[i[:, :-1]], labels=data[i[:, :-1]]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with tempfile.TemporaryDirectory() as d:
        hf.eval().save_pretrained(d)
        ours = Transformer.from_pretrained(d).eval()
    return ours, data[split:]


def test_int8_keeps_a_trained_models_loss_and_greedy_tokens(trained_llama):
    model, val = trained_llama
    q = quantize(copy.deepcopy(model), "int8", min_weights=0)
    assert sum(isinstance(m, DynamicInt8Linear) for m in q.modules()) == 13  # q k v o gate_up
    # down: 6 a layer, + head
    windows = val[:64 * 33].view(64, 33)
    with torch.no_grad():
        loss = model(windows[:, :-1], targets=windows[:, 1:]).loss.item()
        loss8 = q(windows[:, :-1], targets=windows[:, 1:]).loss.item()
    assert loss < 2.6, f"the model did not learn ({loss:.2f}): a weak check"
    assert abs(loss8 - loss) <= 0.02
    prompt = torch.tensor([list(b"    def __init__(self")])
    ref, got = (m.generate(prompt, 24, temperature=0) for m in (model, q))
    assert len(set(ref[0, -24:].tolist())) >= 6, "a repetitive continuation is a weak check"
    assert torch.equal(got, ref)


# ----------------------------------------------------------------------------------------------
# speculative decoding


@pytest.mark.parametrize("name", ["rope_gqa", "learned", "window"])
def test_speculative_greedy_equals_plain_greedy(name):
    """A draft that disagrees (another random model: every round ends at its first draft), the
    target itself (every draft kept: chunks of k + 1 through the ring buffer), any k, a
    repetition penalty (on the tokens before each drafted position), a stop token."""
    target, other = model_of(name), model_of(name, seed=3, n_layer=1)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    ref = target.generate(x, 30, temperature=0)
    assert len(set(ref[0, 5:].tolist())) >= 8, "a repetitive continuation is a weak check"
    for k in (1, 3, 6):
        for draft, accepted in ((other, None), (target, 30 - 30 // (k + 1))):
            stats = {}
            got = speculative_generate(target, draft, x, 30, k, temperature=0, stats=stats)
            assert torch.equal(got, ref), (k, draft is target)
            assert stats["accepted"] <= stats["drafted"]
            if accepted is not None:
                assert stats["accepted"] == stats["drafted"] >= accepted - 1
    penalised = target.generate(x, 30, temperature=0, repetition_penalty=1.5)
    assert not torch.equal(penalised, ref)
    assert torch.equal(speculative_generate(target, other, x, 30, 3, temperature=0,
                                            repetition_penalty=1.5), penalised)
    stop = int(ref[0, 15])
    streamed = []
    got = speculative_generate(target, other, x, 30, 3, temperature=0, stop_tokens=(stop,),
                               callback=lambda t: streamed.append(int(t)))
    want = target.generate(x, 30, temperature=0, stop_tokens=(stop,))
    n = want[0, 5:].tolist().index(stop) + 1
    assert got.tolist() == want[:, :5 + n].tolist() and streamed == got[0, 5:].tolist()


def test_speculative_verification_is_distributed_as_the_target():
    """Exact check of the rejection rule on a vocabulary of 5 with k = 2 drafts: the first two
    tokens it emits (the second drawn from the target directly when the round ends after one)
    must follow p(x1) p(x2 | x1), whatever the draft q. The same counts of draft-only tokens fail
    the test, so it can tell."""
    V, k, N = 5, 2, 20000
    g = torch.Generator().manual_seed(0)
    sharp = lambda *shape: torch.softmax(2 * torch.randn(*shape, V, generator=g), -1)
    P1, P2, P3 = sharp(), sharp(V), sharp(V, V)                    # target: p(x1), p(x2|x1), ..
    Q1, Q2 = sharp(), sharp(V)                                     # draft
    d1 = torch.multinomial(Q1.expand(N, V), 1, generator=g)[:, 0]
    d2 = torch.multinomial(Q2[d1], 1, generator=g)[:, 0]
    p = torch.stack((P1.expand(N, V), P2[d1], P3[d1, d2]), 1)     # (N, k + 1, V)
    q = torch.stack((Q1.expand(N, V), Q2[d1]), 1)                 # (N, k, V)
    m, nxt = speculative_accept(p, q, torch.stack((d1, d2), 1), g)
    x1 = torch.where(m == 0, nxt, d1)
    x2 = torch.where(m == 1, nxt, d2)
    ended = m == 0                                                # x2 from the next round
    x2[ended] = torch.multinomial(P2[x1[ended]], 1, generator=g)[:, 0]
    counts = torch.bincount(x1 * V + x2, minlength=V * V).float()
    exact = (P1[:, None] * P2).flatten()
    stat, dof = chi_square(counts, exact)
    assert stat < chi2_limit(dof)
    naive = torch.bincount(d1 * V + d2, minlength=V * V).float()  # every draft accepted
    assert chi_square(naive, exact)[0] > 10 * chi2_limit(dof)
    assert 0 < (m == k).float().mean() < 1                        # every branch was taken


def test_speculative_sampling_matches_the_targets_next_token_distribution():
    """End to end on a model with 4 tokens: the first two new tokens of many seeded calls follow
    the target's own probabilities (temperature 1.5, top_k 3), computed by full forwards."""
    cfg = dict(vocab_size=4, block_size=32, n_layer=2, n_head=2, d_model=16, **ROPE)
    target = redraw(Transformer(Config(**{**cfg, "n_kv_head": 1})), seed=1)
    draft = redraw(Transformer(Config(**{**cfg, "n_kv_head": 1, "n_layer": 1})), seed=2)
    x, V, N = torch.tensor([[1, 3, 2]]), 4, 600
    kw = dict(temperature=1.5, top_k=3)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V * V)
    for _ in range(N):
        out = speculative_generate(target, draft, x, 2, 2, generator=g, **kw)
        counts[out[0, 3] * V + out[0, 4]] += 1
    from model import sampling_probs
    with torch.no_grad():
        p1 = sampling_probs(target(x).logits[0, -1], **kw)                       # (V,)
        seqs = torch.cat((x.expand(V, -1), torch.arange(V)[:, None]), 1)        # (V, 4)
        p2 = sampling_probs(target(seqs).logits[:, -1], **kw)                    # (V, V)
    stat, dof = chi_square(counts, (p1[:, None] * p2).flatten())
    assert stat < chi2_limit(dof)


def test_speculative_refusals_are_one_line():
    t = model_of("rope_gqa")
    cases = [(model_of("deltanet"), t, torch.tensor([[1, 2]]), "rewind"),
             (t, model_of("rope_gqa", vocab_size=50), torch.tensor([[1, 2]]), "vocabulary"),
             (t, t, torch.tensor([[1, 2], [3, 4]]), "one sequence"),
             (model_of("learned"), t, torch.tensor([[1, 2]]), "2 + max_new_tokens=63 tokens "
              "exceed the context of 64 tokens")]             # no cropping with a verified chunk
    for target, draft, x, message in cases:
        with pytest.raises(ValueError) as e:
            speculative_generate(target, draft, x, 63 if "context" in message else 4)
        assert message in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# beam search against HF


def hf_beams(hf, x, n, num_beams, length_penalty, early_stopping, eos, **kw):
    return hf.generate(x, max_new_tokens=n, num_beams=num_beams, do_sample=False,
                       length_penalty=length_penalty, early_stopping=early_stopping,
                       eos_token_id=list(eos), pad_token_id=eos[0], forced_bos_token_id=None,
                       forced_eos_token_id=None, no_repeat_ngram_size=0, **kw)


# (num_beams, length_penalty, early_stopping): HF's defaults, each stopping rule, a negative and
# a zero penalty
SEARCHES = [(4, 1.0, False), (3, 2.0, True), (4, 0.5, "never"), (2, -1.0, False), (5, 0.0, True)]


@pytest.fixture(scope="module")
def seq2seqs(tmp_path_factory):
    built = {}
    for name in ("t5", "bart", "marian"):
        hf = make_seq2seq(*SEQ2SEQ_CASES[name])
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        built[name] = (hf, Transformer.from_pretrained(path))
    return built


@pytest.mark.parametrize("name", ["t5", "bart", "marian"])
def test_beam_search_equals_hf_encoder_decoder(seq2seqs, name):
    """A padded batch of two sources. The stop tokens are tokens the unconstrained search emits
    midway, so beams end at different steps and the finished-set rules all take part."""
    hf, ours = seq2seqs[name]
    src, mask = source_ids(2, 24, seed=3), padding_mask(2, 24)
    start = hf.config.decoder_start_token_id
    kw = dict(attention_mask=mask, decoder_start_token_id=start)
    free = hf_beams(hf, src, 15, 4, 1.0, False, [-1], **kw, past_key_values=hf_decoder_cache())
    lengths = set()
    for eos in ([free[0, 3], free[1, 5]], [free[0, 6], free[1, 8]], [free[0, 1]]):
        eos = [int(t) for t in eos]
        for nb, lp, es in SEARCHES:
            ref = hf_beams(hf, src, 15, nb, lp, es, eos, **kw, past_key_values=hf_decoder_cache())
            got = beam_search(ours, src, 15, nb, lp, es, stop_tokens=eos, attention_mask=mask)
            assert torch.equal(got, ref), (eos, nb, lp, es, got.tolist(), ref.tolist())
            lengths.add(ref.shape[1])
    assert len(lengths) >= 3, "every search ended alike: a weak check"


def test_beam_search_equals_hf_decoder():
    torch.manual_seed(0)
    from test_hf_decoder import CASES, make_hf
    hf = make_hf(*CASES["llama"])
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Transformer.from_pretrained(d).eval()
    x = torch.randint(0, 160, (2, 6), generator=torch.Generator().manual_seed(4))
    free = hf_beams(hf, x, 12, 4, 1.0, False, [-1], attention_mask=torch.ones_like(x))
    lengths = set()
    for eos in ([free[0, 10]], [free[1, 7], free[1, 11]]):     # tokens the free search emits
        eos = [int(t) for t in eos]
        for nb, lp, es in SEARCHES:
            ref = hf_beams(hf, x, 12, nb, lp, es, eos, attention_mask=torch.ones_like(x))
            got = beam_search(ours, x, 12, nb, lp, es, stop_tokens=eos)
            assert torch.equal(got, ref), (eos, nb, lp, es, got.tolist(), ref.tolist())
            lengths.add(ref.shape[1])
    assert len(lengths) >= 3, "every search ended alike: a weak check"


def test_beam_search_batch_rows_equal_single_prompts():
    m = model_of("rope_gqa")
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    got = beam_search(m, prompts, 10, 3)
    assert got == [beam_search(m, torch.tensor([p]), 10, 3)[0].tolist() for p in prompts]


# ----------------------------------------------------------------------------------------------
# batches of prompts: one left-padded batch, each row as it decodes alone


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16]]


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_rows_equal_each_prompt_alone(name):
    m = model_of(name)
    got = m.generate(PROMPTS, 14, temperature=0)
    alone = [m.generate(torch.tensor([p]), 14, temperature=0)[0].tolist() for p in PROMPTS]
    assert got == alone
    new = [t for p, row in zip(PROMPTS, got) for t in row[len(p):]]
    assert len(set(new)) >= 12, "repetitive continuations are a weak check"
    # logits: the padded batch through the cache, step by step, against each row alone
    from model import left_pad
    ids, keep = left_pad(PROMPTS, 6, torch.device("cpu"))
    T = ids.shape[1]
    new = torch.tensor([row[len(p):len(p) + 6] for p, row in zip(PROMPTS, got)])
    full = torch.cat((ids, new), 1)                                       # (3, T + 6)
    cache = m.setup_cache(3, T + 6)
    with torch.no_grad():
        steps = [m(full[:, :T], cache=cache, input_pos=torch.arange(T), attention_mask=keep)
                 .logits]
        steps += [m(full[:, t:t + 1], cache=cache, input_pos=torch.tensor([t]),
                    attention_mask=keep).logits for t in range(T, T + 6)]
        batch = torch.cat(steps, 1)
        for b, p in enumerate(PROMPTS):
            solo = m(full[b:b + 1, T - len(p):]).logits[0]
            assert (batch[b, T - len(p):] - solo).abs().max().item() <= 1e-4


def test_batch_with_stop_tokens_and_a_bounded_context():
    m = model_of("learned")
    first = m.generate([PROMPTS[1]], 10, temperature=0)[0]
    stop = first[2 + 4]
    got = m.generate(PROMPTS, 10, temperature=0, stop_tokens=(stop,))
    n = first[2:].index(stop) + 1
    assert got[1] == first[:2 + n]                                # up to and including its stop
    assert all(stop not in row[len(p):-1] for p, row in zip(PROMPTS, got))
    with pytest.raises(ValueError, match="within the position table"):
        m.generate(PROMPTS, 64, temperature=0)
    with pytest.raises(ValueError, match=r"9 \+ max_new_tokens=56 tokens exceed the context of 64"):
        beam_search(m, PROMPTS, 56)                          # beams reorder the cache: no cropping
    for bad in ([], [[]], [[1, 2], "ab"]):
        with pytest.raises(ValueError, match="list of prompts"):
            m.generate(bad, 3)


@pytest.mark.parametrize("name", ["rope_gqa", "window"])
def test_static_cache_reads_every_slot_and_equals_the_full_forward(name):
    """The compiled step's cache (static: all slots read, unwritten ones masked), run eagerly."""
    m = model_of(name)
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    cache = m.setup_cache(2, 20, static=True)
    assert all(isinstance(c, KVCache) and c.static for c in cache)
    with torch.no_grad():
        ref = m(x).logits
        steps = [m(x[:, :4], cache=cache, input_pos=torch.arange(4)).logits]
        steps += [m(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])).logits
                  for t in range(4, 20)]
    assert (torch.cat(steps, 1) - ref).abs().max().item() <= 3e-5


@pytest.mark.parametrize("name", ["rope_gqa", "learned", "window"])
def test_the_compiled_steps_path_gives_generates_tokens(name, monkeypatch):
    """generate(compile=True) with torch.compile swapped for a wrapper that runs the step eagerly
    while torch.compiler.is_compiling() answers True: the branches a compiled step takes (the
    cache continued without reading the position back, the range checks skipped, every slot of
    the static cache read) give plain generate's tokens, for one prompt and a padded batch; and
    the step reads no tensor value back to the host (which would split a compiled graph).
    (Compiling for real takes a minute on CPU; tests/bench/bench_decode.py does it.)"""
    compiling = {"now": False}

    def fake_compile(fn, **kw):
        def step(*args):
            compiling["now"] = True
            try:
                return fn(*args)
            finally:
                compiling["now"] = False
        return step

    def no_host_read(read):
        def guarded(t, *args):
            assert not compiling["now"], "the compiled step read a value back to the host"
            return read(t, *args)
        return guarded
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling["now"])
    for read in ("__int__", "__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, read, no_host_read(getattr(torch.Tensor, read)))
    m = model_of(name)
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(m.generate(x, 20, temperature=0, compile=True),
                       m.generate(x, 20, temperature=0))
    assert m.generate(PROMPTS, 12, temperature=0, compile=True) == m.generate(PROMPTS, 12,
                                                                                 temperature=0)
    with pytest.raises(ValueError, match="attention-only decoders"):
        model_of("deltanet").generate(x, 4, compile=True)


def test_ring_buffer_takes_chunks_it_has_room_for():
    """setup_cache(chunk=k): a window layer keeps k - 1 extra slots, so k-token chunks after the
    prefill (speculative verification) equal the full forward; a longer chunk is refused."""
    m = model_of("window")
    x = torch.randint(0, 97, (1, 23), generator=torch.Generator().manual_seed(3))
    cache = m.setup_cache(1, 23, chunk=4)
    assert cache[0].slots == 5 + 3
    bounds = [0, 6, 10, 13, 17, 18, 22, 23]
    with torch.no_grad():
        ref = m(x).logits
        got = torch.cat([m(x[:, a:b], cache=cache, input_pos=torch.arange(a, b)).logits
                         for a, b in zip(bounds, bounds[1:])], 1)
        assert (got - ref).abs().max().item() <= 3e-5
        with pytest.raises(ValueError, match="chunk=5"):
            m(x[:, :5], cache=cache, input_pos=torch.arange(23, 28))


# ----------------------------------------------------------------------------------------------
# generate.py's decoding options


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from test_generate import checkpoint
    d = tmp_path_factory.mktemp("dec")
    big = checkpoint(d / "big.pt", "char", steps=150, position="rope", norm="rmsnorm")
    small = checkpoint(d / "small.pt", "char", steps=150, position="rope", norm="rmsnorm",
                       n_layer=1)
    return d, big, small


def cli(capsys, *argv):
    rc = generate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_decoding_options_give_the_apis_text(ckpts, capsys):
    d, (model, tok), (small, _) = ckpts
    base = ("--checkpoint", d / "big.pt", "--max_new_tokens", 16)
    x = torch.tensor([tok.encode("the")])
    text = lambda ids: "the" + tok.decode(ids[0, 3:].tolist()) + "\n"
    greedy = model.generate(x, 16, temperature=0)
    rc, out, err = cli(capsys, *base, "--prompt", "the", "--temperature", 0, "--draft",
                       d / "small.pt", "--draft_tokens", 3)
    assert rc == 0 and out == text(greedy) and "drafted tokens accepted" in err
    rc, out, _ = cli(capsys, *base, "--prompt", "the", "--num_beams", 3, "--length_penalty", 2)
    assert rc == 0 and out == text(beam_search(model, x, 16, 3, 2.0))
    rc, out, _ = cli(capsys, *base, "--prompt", "the", "--temperature", 0, "--quantize", "int8")
    q = quantize(copy.deepcopy(model), "int8")
    assert rc == 0 and out == text(q.generate(x, 16, temperature=0))
    (d / "lines.txt").write_text("the lazy\n\ndog and\n")
    rc, out, err = cli(capsys, *base, "--prompt_file", d / "lines.txt", "--batch",
                       "--temperature", 0)
    rows = model.generate([tok.encode("the lazy"), tok.encode("dog and")], 16, temperature=0)
    assert rc == 0 and out.split(generate.SEPARATOR + "\n") == [
        "the lazy" + tok.decode(rows[0][8:]) + "\n", "dog and" + tok.decode(rows[1][7:]) + "\n"]
    assert "(2 prompts)" in err


@pytest.mark.parametrize("extra, message", [
    (("--prompt", "a", "--num_beams", 3, "--top_p", 0.9), "it does not sample: drop --top_p"),
    (("--prompt", "a", "--num_beams", 3, "--num_samples", 2), "deterministic"),
    (("--prompt", "a", "--num_beams", 3, "--draft", "x.pt"), "pick one"),
    (("--prompt", "a", "--batch"), "--batch reads one prompt a line"),
    (("--prompt", "a", "--draft", "missing.pt"), "does not exist"),
    (("--prompt", "a", "--quantize", "int4"), "invalid choice"),
    (("--prompt", "a", "--num_beams", 0), "--num_beams=0 must be at least 1"),
    (("--prompt", "a", "--compile", "--num_beams", 2), "--compile applies to plain sampling"),
])
def test_cli_decoding_conflicts_are_one_line(ckpts, capsys, extra, message):
    d = ckpts[0]
    rc, out, err = cli(capsys, "--checkpoint", d / "big.pt", *extra)
    assert rc == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_cli_draft_with_another_vocabulary_is_refused(ckpts, capsys, tmp_path):
    d, (model, _), _ = ckpts
    other = Transformer(Config(**{**dataclass_dict(model.config), "vocab_size": 300}))
    save_checkpoint(tmp_path / "other.pt", other)
    rc, _, err = cli(capsys, "--checkpoint", d / "big.pt", "--prompt", "a", "--draft",
                     tmp_path / "other.pt")
    assert rc == 2 and "vocabulary" in err and len(err.strip().splitlines()) == 1


def dataclass_dict(cfg):
    import dataclasses
    return dataclasses.asdict(cfg)
