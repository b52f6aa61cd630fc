"""KV-cached decoding checked against full forwards, and the sampling ladder checked on hand-made
inputs.

Cache: for every attention kind, position scheme and norm placement, a prompt is prefilled through
the cache, then (where the cache allows it) a multi-token chunk, then one token at a time; every
step's logits must equal one full forward over the whole sequence (fp32, within 3e-5).
Sliding-window layers keep a ring buffer of `window` slots, so prompt + new tokens run well past the
window.
Sampling: each filter of LOGIT_FILTERS on distributions whose answer is known, their fixed order,
temperature, seeded generators, per-row stop tokens and the streaming callback (a mock step function
drives sample_loop, so the token sequence is chosen by the test).
"""
import pytest
import torch
import torch.nn.functional as F

from model import (
    LOGIT_FILTERS,
    Config,
    Transformer,
    apply_repetition_penalty,
    min_p_filter,
    sample,
    sample_loop,
    top_k_filter,
    top_p_filter,
)

V = 97
WINDOW = 5
TOL = 3e-5                   # fp32: peaked attention (q, k at 4x gain) amplifies rounding to ~1e-5
BASE = dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, d_model=32)
ROPE = dict(position="rope", norm="rmsnorm")

# name -> (config overrides, prompt length, tokens in one chunk after the prefill; 0 = none)
CASES = {
    "mha": (dict(), 6, 4),  # the defaults: pre-norm, learned positions
    "gqa": (dict(n_kv_head=2), 6, 4),
    "mqa": (dict(n_kv_head=1), 6, 4),
    "window": (dict(layer_pattern=["local_attn"], sliding_window=WINDOW), 3, 0),
    # chunk ends inside the ring
    "window_chunk": (dict(layer_pattern=["local_attn"], sliding_window=WINDOW), 2, 2),
    "window_long_prompt": (dict(layer_pattern=["local_attn"], sliding_window=WINDOW, n_kv_head=2),
                           13, 0),
    "softcap": (dict(attn_softcap=1.5, n_kv_head=2), 6, 4),
    "qk_norm": (dict(ROPE, qk_norm=True, n_kv_head=2), 6, 4),
    "attn_gate": (dict(ROPE, attn_gate=True), 6, 4),
    "learned_offset": (dict(position="learned", pos_offset=2), 6, 4),     # BART's ids start at 2
    "sinusoidal": (dict(position="sinusoidal"), 6, 4),
    "rope": (dict(ROPE), 6, 4),
    "rope_partial": (dict(ROPE, rope_fraction=0.5), 6, 4),
    "rope_linear": (dict(ROPE, rope_scaling="linear", rope_factor=4.0), 6, 4),
    "rope_llama3": (dict(ROPE, rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=16),
                    6, 4),
    "no_positions": (dict(position="none"), 6, 4),
    "alibi": (dict(position="alibi", n_kv_head=2), 6, 4),
    "alibi_window": (dict(position="alibi", layer_pattern=["local_attn", "attn"],
                          sliding_window=WINDOW), 3, 0),
    "relative_bias_softcap": (dict(position="relative_bias", attn_softcap=1.5, rel_buckets=8,
                                   rel_max_distance=16), 6, 4),
    "post_norm": (dict(norm_placement="post"), 6, 4),
    "sandwich_norm": (dict(norm_placement="sandwich", norm="rmsnorm", norm_unit_offset=True), 6, 4),
    "gemma3_like": (dict(ROPE, n_layer=6, layer_pattern=["local_attn"] * 5 + ["attn"],
                         sliding_window=WINDOW, rope_theta=1e6, rope_local_theta=10.0, qk_norm=True,
                         norm_unit_offset=True, norm_placement="sandwich", n_kv_head=2,
                         attn_softcap=2.0, final_softcap=3.0), 7, 0),
}


def redraw(model, seed=0):
    """Weights every feature shows in: matrices at unit gain (attention far from uniform), norms and
    biases away from their init. The default init (std 0.02) makes attention nearly uniform, and a
    cache that served the wrong keys would hardly move the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                gain = 4.0 if "q_proj" in name or "k_proj" in name else 1.0
                p.copy_(r / p.shape[-1] ** 0.5 * gain)
            elif "norm" in name and name.endswith("weight"):
                centre = 0.0 if getattr(model.config, "norm_unit_offset", False) else 1.0
                p.copy_(centre + 0.3 * r)
            else:
                p.copy_(0.1 * r)
    return model.eval()


def tokens(B, T, seed):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def cached_logits(model, x, prompt, chunk, source=(), **kw):
    """Logits of x (B, N) computed through the cache: a prefill, an optional chunk, then single
    tokens. An encoder-decoder decodes x as its target after source=(src,), with memory= and
    attention_mask= in kw."""
    cache = model.setup_cache(x.shape[0], x.shape[1])
    singles = list(range(prompt + chunk + 1, x.shape[1] + 1))
    bounds = [0, prompt] + ([prompt + chunk] if chunk else []) + singles
    step = lambda a, b: model(*source, x[:, a:b], cache=cache, input_pos=torch.arange(a, b), **kw)
    with torch.no_grad():
        return torch.cat([step(a, b).logits for a, b in zip(bounds, bounds[1:])], dim=1)


@pytest.mark.parametrize("name", CASES)
def test_cached_decoding_equals_full_forward(name):
    kw, prompt, chunk = CASES[name]
    model = redraw(Transformer(Config(**{**BASE, **kw})))
    x = tokens(2, 24, seed=1)
    with torch.no_grad():
        ref = model(x).logits
    assert ref.std() > 0.5, "logits this flat would hide bugs"
    assert (cached_logits(model, x, prompt, chunk) - ref).abs().max().item() <= TOL


def test_window_cache_is_a_ring_buffer():
    """A sliding-window layer holds `window` slots however long the generation; a global one all."""
    model = Transformer(Config(**{**BASE, **CASES["gemma3_like"][0]}))
    cache = model.setup_cache(1, 40)
    assert [c.k.shape[2] for c in cache] == [WINDOW] * 5 + [40]


def test_window_chunk_that_wraps_the_ring_is_refused():
    """A chunk after the prefill that would overwrite slots its own first queries still read."""
    model = Transformer(Config(**BASE, layer_pattern=["local_attn"], sliding_window=WINDOW))
    cache = model.setup_cache(1, 20)
    model(tokens(1, 3, 0), cache=cache, input_pos=torch.arange(3))
    with pytest.raises(ValueError, match="decode one token at a time") as e:
        model(tokens(1, 4, 0), cache=cache, input_pos=torch.arange(3, 7))
    assert "\n" not in str(e.value)


def test_generate_greedy_equals_argmax_of_full_forwards():
    model = redraw(Transformer(Config(**BASE, **CASES["gqa"][0])))
    seq = tokens(2, 5, seed=2)
    got = model.generate(seq, 15, temperature=0)
    with torch.no_grad():
        for _ in range(15):
            seq = torch.cat((seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert len(set(seq[0, 5:].tolist())) >= 4, "a sequence that repeats one token is a weak check"
    assert torch.equal(got, seq)


# ----------------------------------------------------------------------------------------------
# Encoder-decoder: cross-attention K/V computed once, the decoder's self-attention cached

ENC_DEC = {
    "t5_like": dict(position="relative_bias", norm="rmsnorm", bias=False, attn_scale=1.0, ffn="glu",
                    activation="relu", head_input_scale=32 ** -0.5, rel_buckets=8,
                    rel_max_distance=16, decoder=dict(n_layer=3)),
    "bart_like": dict(position="learned", pos_offset=2, embed_norm=True, norm_placement="post",
                      final_norm=False, head_bias=True, tie_embeddings=False,
                      encoder=dict(n_layer=1)),
}


@pytest.mark.parametrize("name", ENC_DEC)
def test_encoder_decoder_cache(name):
    model = redraw(Transformer(Config(**BASE, architecture="encoder_decoder",
                                      decoder_start_token_id=3, **ENC_DEC[name])))
    src, mask = tokens(2, 9, seed=3), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0                                               # row 1 is padded: 6 real tokens
    tgt = tokens(2, 16, seed=4)
    with torch.no_grad():
        ref = model(src, tgt, attention_mask=mask).logits
        memory = model.encoder.hidden(src, attention_mask=mask)
    got = cached_logits(model, tgt, 4, 3, source=(src,), memory=memory, attention_mask=mask)
    assert (got - ref).abs().max().item() <= TOL

    out = model.generate(src, 12, temperature=0, attention_mask=mask)
    seq = torch.full((2, 1), 3)
    with torch.no_grad():
        for _ in range(12):
            nxt = model(src, seq, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), dim=1)
    assert len(set(seq[0, 1:].tolist())) >= 4, "a sequence that repeats one token is a weak check"
    assert torch.equal(out, seq)
    alone = model.generate(src[1:, :6], 12, temperature=0)        # padding changes nothing
    assert torch.equal(alone, out[1:])


# ----------------------------------------------------------------------------------------------
# Sampling filters on distributions whose answer is known

def kept(logits):
    return set(torch.isfinite(logits).nonzero()[:, -1].tolist())


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for k in (1, 5, 49):
        out = top_k_filter(logits, k)
        for row, o in zip(logits, out):
            assert kept(o) == set(row.topk(k).indices.tolist())
            # kept logits unchanged
            assert torch.equal(o[torch.isfinite(o)], row[torch.isfinite(o)])
    assert kept(top_k_filter(logits[0], 80)) == set(range(50))                 # k > V keeps all


@pytest.mark.parametrize("probs, p, expected", [
    ([0.5, 0.3, 0.15, 0.05], 0.01, {0}),
    ([0.5, 0.3, 0.15, 0.05], 0.6, {0, 1}),
    ([0.5, 0.3, 0.15, 0.05], 0.81, {0, 1, 2}),
    ([0.05, 0.15, 0.5, 0.3], 0.81, {1, 2, 3}),  # order of the vocabulary does not matter
    ([0.5, 0.3, 0.15, 0.05], 0.96, {0, 1, 2, 3}),
    ([0.4, 0.2, 0.2, 0.2], 0.7, 3),                            # ties: token 0 and any 2 of the rest
    ([0.25, 0.25, 0.25, 0.25], 0.3, 2),
    ([1 - 3e-9, 1e-9, 1e-9, 1e-9], 1.0, {0, 1, 2, 3}),  # p = 1 keeps every token, however unlikely
    ([1 - 3e-9, 1e-9, 1e-9, 1e-9], 0.999, {0}),
])
def test_top_p_keeps_smallest_set_with_mass_p(probs, p, expected):
    logits = torch.tensor(probs, dtype=torch.float64).log().float()
    out = kept(top_p_filter(logits, p))
    assert out == expected if isinstance(expected, set) else len(out) == expected
    assert sum(probs[i] for i in out) >= p - 1e-9
    left_out = [probs[i] for i in range(4) if i not in out]
    assert min(probs[i] for i in out) >= max(left_out, default=0)


def test_top_p_per_row():
    logits = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]).log()
    out = top_p_filter(logits, 0.7)
    assert kept(out[0]) == {0, 1} and kept(out[1]) == {1, 2}


@pytest.mark.parametrize("min_p, expected", [(0.5, {0, 1}), (0.25, {0, 1, 2}),
                                             (0.05, {0, 1, 2, 3}), (1.0, {0})])
def test_min_p_keeps_tokens_above_a_share_of_the_max(min_p, expected):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log() + 7.0    # a shift changes no probability
    assert kept(min_p_filter(logits, min_p)) == expected


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[0, 1, 1], [3, 3, 3]])                   # repeats count once
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.25]]))
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def draws(logits, n=4000, seed=0, **kw):
    """n samples from one row of logits (a batch of n identical rows) -> the set of tokens drawn."""
    g = torch.Generator().manual_seed(seed)
    return set(sample(logits.expand(n, -1), generator=g, **kw).tolist())


def test_filters_compose_in_the_documented_order():
    """temperature, then top_k, top_p, min_p (LOGIT_FILTERS' order); each later filter sees the
    renormalised survivors of the earlier ones. Each case would draw other tokens in another
    order."""
    assert list(LOGIT_FILTERS) == ["top_k", "top_p", "min_p"]
    logits = torch.tensor([0.3, 0.26, 0.24, 0.2]).log()
    assert draws(logits, top_p=0.6) == {0, 1, 2}                     # .3 + .26 < .6
    # top_k 3 first: (.375, .325, .3), so top_p .6 keeps 2; top_p first would keep 3
    assert draws(logits, top_k=3, top_p=0.6) == {0, 1}
    # top_p .6 first keeps 3, min_p .75 (p >= .225) keeps them; min_p first, then top_p: 2
    assert draws(logits, top_p=0.6, min_p=0.75) == {0, 1, 2}
    # temperature first: at 0.1 the top token holds 73% of the mass, so top_p .7 keeps it alone
    assert draws(logits, temperature=0.1, top_p=0.7) == {0}
    assert draws(logits, temperature=1.0, top_p=0.7) == {0, 1, 2}


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, 0.0, g, top_k=3, top_p=0.5), logits.argmax(-1))
    # no randomness drawn
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())


def test_seeded_generator_reproduces():
    model = redraw(Transformer(Config(**BASE)))
    x = tokens(2, 4, seed=5)
    run = lambda seed: model.generate(x, 20, temperature=1.0, top_k=50,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


# ----------------------------------------------------------------------------------------------
# The loop: stop tokens, max_new_tokens, streaming (a mock step whose next token the test chooses)

class Script:
    """step(ids, pos) for sample_loop: row b's next token is plan[b][number of calls so far]."""

    def __init__(self, plan):
        self.plan, self.calls = torch.tensor(plan), []

    def __call__(self, ids, pos):
        self.calls.append(pos.tolist())
        return F.one_hot(self.plan[:, len(self.calls) - 1], V).float() * 10


def test_per_row_stop_tokens_and_callback():
    STOP = 7
    # row 0 stops at step 2, row 1 at 4
    script = Script([[1, STOP, 2, 2, 2, 2], [3, 4, 5, 9, 2, 2]])
    streamed = []
    out = sample_loop(script, torch.tensor([[11, 12], [13, 14]]), 6, 0.0, None, 1.0, (STOP, 9),
                      lambda t: streamed.append(t.tolist()))
    # a finished row repeats its stop
    assert out.tolist() == [[11, 12, 1, STOP, STOP, STOP], [13, 14, 3, 4, 5, 9]]
    assert streamed == [[1, 3], [STOP, 4], [STOP, 5], [STOP, 9]]
    assert script.calls == [[0, 1], [2], [3], [4]]  # ends when every row stopped


def test_max_new_tokens_is_respected():
    script = Script([[1, 2, 3, 4, 5, 6, 7, 8]])
    out = sample_loop(script, torch.tensor([[0]]), 5, 0.0, None, 1.0, (), None)
    assert out.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert script.calls == [[0], [1], [2], [3], [4]]  # no step for a token never sampled
    model = redraw(Transformer(Config(**BASE)))
    assert model.generate(tokens(3, 4, 0), 9, top_p=0.9).shape == (3, 13)


def test_repetition_penalty_in_the_loop():
    """The penalty sees the prompt and every sampled token: greedy, a huge penalty, no repeats."""
    model = redraw(Transformer(Config(**BASE)))
    out = model.generate(tokens(1, 3, 6), 30, temperature=0, repetition_penalty=1e6)
    assert len(set(out[0].tolist())) == 33


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-0.1), "temperature=-0.1 must be >= 0"),
    (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5 must be in (0, 1]"),
    (dict(top_k=-1), "top_k=-1 must be >= 0"),
    (dict(min_p=1.5), "min_p=1.5 must be in [0, 1]"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0 must be > 0"),
])
def test_bad_sampling_args_are_one_line_errors(kw, message):
    model = Transformer(Config(**BASE))
    with pytest.raises(ValueError) as e:
        model.generate(tokens(1, 3, 0), 4, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)
