"""Position schemes and attention masks.

ALiBi (Press et al. 2021) against its paper's slopes and a separately written attention loop; the
mask function against an element-wise definition, including the shortcuts that return no mask;
attend()'s softcap path with a float mask; and a toy scheme plugged into POSITIONS from this file
(no other edit) that runs a forward, cached decoding and generation.
"""
import math

import pytest
import torch
import torch.nn as nn

import model
from model import Config, Position, Transformer, attend, attention_mask

BASE = dict(vocab_size=61, block_size=48, n_layer=2, n_head=4, d_model=32)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def redraw(m, seed=0):
    """Weights at unit gain (attention far from uniform), so a wrong bias moves the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(r / p.shape[-1] ** 0.5 * 2 if p.dim() >= 2 else 1 + 0.2 * r)
    return m.eval()


def cached_logits(m, x, prompt):
    """Prefill `prompt` tokens, then one token at a time through the cache."""
    cache = m.setup_cache(x.shape[0], x.shape[1])
    bounds = [0] + list(range(prompt, x.shape[1] + 1))
    with torch.no_grad():
        return torch.cat([m(x[:, a:b], cache=cache, input_pos=torch.arange(a, b)).logits
                          for a, b in zip(bounds, bounds[1:])], dim=1)


# ----------------------------------------------------------------------------------------------
# ALiBi


@pytest.mark.parametrize("n, expected", [
    (8, [2 ** -i for i in range(1, 9)]),                                # 2^(-8i/n), i = 1..n
    (4, [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]),
    (6, [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]),        # 4's, then 8's odd ones
    (12, [2 ** -i for i in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]),
])
def test_alibi_slopes_are_the_papers(n, expected):
    assert model.alibi_slopes(n) == pytest.approx(expected, rel=1e-12)


def naive_alibi_attention(layer, x, slopes, causal):
    """One attention layer written as loops over heads and queries: softmax over keys j of
    q_i·k_j·scale - m_h·(i - j) (causal, j <= i) or - m_h·|i - j| (bidirectional, every j)."""
    B, T, _ = x.shape
    nh, hs, g = layer.nh, layer.hs, layer.nh // layer.nkv
    q = layer.q_proj(x).view(B, T, nh, hs)
    k, v = (p(x).view(B, T, layer.nkv, hs) for p in (layer.k_proj, layer.v_proj))
    out = torch.zeros(B, T, nh, hs)
    for h in range(nh):
        for i in range(T):
            js = range(i + 1) if causal else range(T)
            s = torch.stack([(q[:, i, h] * k[:, j, h // g]).sum(-1) * hs ** -0.5
                             - slopes[h] * (i - j if causal else abs(i - j)) for j in js], -1)
            w = s.softmax(-1)                                                 # (B, keys)
            out[:, i, h] = sum(w[:, n, None] * v[:, j, h // g] for n, j in enumerate(js))
    return layer.o_proj(out.reshape(B, T, nh * hs))


@pytest.mark.parametrize("architecture, n_head, n_kv_head", [
    ("decoder_only", 4, 2), ("decoder_only", 6, None), ("encoder_only", 4, None)])
def test_alibi_attention_matches_naive_loop(architecture, n_head, n_kv_head):
    cfg = Config(**{**BASE, "n_head": n_head, "d_model": 36}, n_kv_head=n_kv_head,
                 position="alibi", architecture=architecture)
    m = redraw(Transformer(cfg))
    layer, x, pos = m.blocks[0].mixer, randn(2, 11, 36, seed=1), torch.arange(11)
    ctx = m.context("attn", pos, None, None, False)
    with torch.no_grad():
        got = layer(x, ctx)
        ref = naive_alibi_attention(layer, x, model.alibi_slopes(n_head),
                                    architecture == "decoder_only")
        plain = layer(x, m.context("attn", pos, None, None, False)._replace(bias=None))
    assert (got - ref).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-2                           # the bias matters


def test_alibi_model_has_no_position_weights_and_decodes_like_a_full_forward():
    m = redraw(Transformer(Config(**BASE, position="alibi")))
    assert not any("alibi" in k for k in m.state_dict())                      # slopes: a buffer
    x = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(x).logits
    assert (cached_logits(m, x, 7) - full).abs().max().item() <= 3e-5
    # no table: a prompt past block_size still runs (ALiBi extrapolates), unlike learned positions
    long = torch.randint(0, 61, (1, 60))
    assert m(long).logits.shape == (1, 60, 61)


# ----------------------------------------------------------------------------------------------
# The mask function and attend()


def naive_mask(qpos, kpos, causal, window, pad):
    """Element by element: key j is seen by query i unless it is later (causal), `window` or more
    away (behind in decoders, either side in encoders), or padding."""
    T, S = len(qpos), len(kpos)
    keep = torch.ones(pad.shape[0] if pad is not None else 1, 1, T, S, dtype=torch.bool)
    for i, qi in enumerate(qpos.tolist()):
        for j, kj in enumerate(kpos.tolist()):
            near = window is None or (qi - kj < window if causal else abs(qi - kj) < window)
            ok = (kj <= qi or not causal) and near
            keep[:, 0, i, j] = ok if pad is None else pad[:, j] & ok
    return keep


def expand(mask, causal, T, S):
    """attention_mask's answer as the full (B|1, 1, T, S) bool mask attend() applies."""
    if mask is None:
        full = torch.ones(T, S, dtype=torch.bool)
        return (full.tril() if causal else full)[None, None]
    return mask.reshape((-1, 1, T, S)) if mask.dim() == 2 else mask.expand(-1, -1, T, S)


PAD = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
MASKS = {  # name -> (qpos, kpos, causal, window, pad, whether the answer is None)
    "decoder_prefill": (torch.arange(8), None, True, None, None, True),
    "decoder_prefill_window": (torch.arange(8), None, True, 3, None, False),
    "prefill_within_window": (torch.arange(8), None, True, 8, None, True),
    "encoder": (torch.arange(8), None, False, None, None, True),
    "encoder_padded": (torch.arange(8), None, False, None, PAD, False),
    "encoder_window": (torch.arange(8), None, False, 3, None, False),
    "decode_one": (torch.tensor([9]), torch.arange(10), True, None, None, True),
    "decode_ring": (torch.tensor([9]), torch.tensor([8, 9, 6, 7]), True, 4, None, True),
    # a single query whose keys reach further back than the window: masked, no shortcut
    "decode_past_window": (torch.tensor([9]), torch.arange(10), True, 4, None, False),
    "decode_chunk": (torch.tensor([6, 7, 8]), torch.arange(9), True, None, None, False),
    "cross_padded": (torch.arange(3), torch.arange(8), False, None, PAD, False),
}


@pytest.mark.parametrize("name", MASKS)
def test_attention_mask_matches_the_definition(name):
    qpos, kpos, causal, window, pad, is_none = MASKS[name]
    kpos = qpos if kpos is None else kpos
    key_pad = pad[:, None, None, :] if pad is not None else None             # (B, 1, 1, S)
    mask, fused_causal = attention_mask(qpos, kpos, causal, window, key_pad)
    assert (mask is None) == is_none
    assert fused_causal == (is_none and causal and qpos is kpos and len(qpos) > 1)
    got = expand(mask, fused_causal, len(qpos), len(kpos))
    assert torch.equal(got.expand_as(naive_mask(qpos, kpos, causal, window, pad)),
                       naive_mask(qpos, kpos, causal, window, pad))


def test_attention_mask_with_a_bias_is_the_bias_with_minus_inf_where_masked():
    qpos = torch.arange(6)
    bias = randn(1, 4, 6, 6)
    mask, causal = attention_mask(qpos, qpos, True, 3, None, bias)
    keep = naive_mask(qpos, qpos, True, 3, None)
    assert not causal and mask.dtype == torch.float32
    assert torch.equal(mask[keep.expand_as(mask)], bias[keep.expand_as(bias)])
    assert (mask[~keep.expand_as(mask)] == float("-inf")).all()
    one, _ = attention_mask(torch.tensor([5]), qpos, True, None, None, bias[:, :, 5:])
    assert one is not None and torch.equal(one, bias[:, :, 5:])               # decoding: as is


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_softcap_attention_takes_bool_and_float_masks(kind):
    """cap*tanh(q·k·scale/cap), then the mask (bool: masked out; float: added), then softmax."""
    q, k, v = randn(2, 4, 5, 8, seed=1), randn(2, 2, 7, 8, seed=2), randn(2, 2, 7, 8, seed=3)
    keep = naive_mask(torch.arange(2, 7), torch.arange(7), True, 4, None)     # (1, 1, 5, 7)
    bias = randn(1, 4, 5, 7, seed=4)
    mask = keep if kind == "bool" else bias.masked_fill(~keep, float("-inf"))
    got = attend(q, k, v, mask, scale=0.4, softcap=2.0)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = 2.0 * torch.tanh(q @ kk.transpose(-1, -2) * 0.4 / 2.0)
    s = s + (bias if kind == "float" else 0)
    ref = s.masked_fill(~keep, float("-inf")).softmax(-1) @ vv
    assert (got - ref).abs().max().item() <= 1e-6


def test_relative_bias_with_softcap_runs_and_decodes(monkeypatch):
    """position relative_bias + attn_softcap: the softcap path adds the float bias (a TypeError
    before), and cached decoding equals the full forward."""
    m = redraw(Transformer(Config(**BASE, position="relative_bias", attn_softcap=1.5,
                                  rel_buckets=8, rel_max_distance=16)))
    x = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m(x).logits
        with monkeypatch.context() as mp:                                     # the bias matters
            mp.setattr(m.position, "score_bias", lambda qpos, kpos: None)
            assert (m(x).logits - full).abs().max().item() > 1e-2
    assert (cached_logits(m, x, 5) - full).abs().max().item() <= 3e-5


# ----------------------------------------------------------------------------------------------
# A new scheme is one class + one registry entry + its validation: a toy one, plugged in here


class Toy(Position):
    """All three hooks at once: a learned table, a rotary with its own frequencies, and a
    per-head bias -c_h * sqrt(|i - j|)."""
    key = "toy"

    def __init__(self, cfg, width):
        super().__init__(cfg, width)
        self.rows = nn.Parameter(torch.randn(cfg.block_size, width) * 0.5)
        self.c = nn.Parameter(torch.linspace(0.2, 1.0, cfg.n_head)[:, None, None])
        self.register_buffer("freq", 0.3 ** torch.arange(cfg.hs // 2).float(), persistent=False)

    @classmethod
    def check(cls, cfg):
        if cfg.hs % 2:
            raise ValueError(f"toy needs an even head size, got {cfg.hs}")

    def table(self, pos):
        return self.rows[pos]

    def rotary(self, pos, mixer):
        f = pos.float()[:, None] * self.freq
        f = torch.cat((f, f), -1)
        return f.cos(), f.sin()

    def score_bias(self, qpos, kpos):
        return -(self.c * (qpos[:, None] - kpos[None, :]).abs().float().sqrt())[None]


def test_a_new_scheme_plugs_in_through_the_registry_alone(monkeypatch):
    monkeypatch.setitem(model.POSITIONS, "toy", Toy)
    with pytest.raises(ValueError, match="toy needs an even head size"):
        Config(**BASE, position="toy", head_dim=7)
    cfg = Config(**BASE, position="toy", n_kv_head=2, layer_pattern=["local_attn", "attn"],
                 sliding_window=6)
    m = redraw(Transformer(cfg))
    assert "toy.rows" in m.state_dict() and "toy.c" in m.state_dict()
    x = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = m(x).logits
        for hook in ("table", "rotary", "score_bias"):        # every hook moves the logits
            with monkeypatch.context() as mp:
                mp.setattr(m.position, hook, lambda *a: None)
                assert (m(x).logits - full).abs().max().item() > 1e-2, hook
    assert (cached_logits(m, x, 6) - full).abs().max().item() <= 3e-5
    out = m.generate(x[:, :5], 10, temperature=0)
    seq = x[:, :5]
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat((seq, m(seq).logits[:, -1:].argmax(-1)), 1)
    assert torch.equal(out, seq)


def test_schemes_that_bias_scores_are_refused_in_block_recurrent_layers():
    for position in ("alibi", "relative_bias", "disentangled"):
        with pytest.raises(ValueError, match="block-recurrent layers"):
            Config(**BASE, position=position, block_width=4)
    assert math.isfinite(Config(**BASE, position="rope", block_width=4).rope_theta)
