"""Gated DeltaNet (Yang et al. 2024, arXiv:2412.06464) and hybrid layouts (issue 5), each checked
against something written independently of model.py:

- the two forms of the gated delta rule (chunked for training/prefill, recurrent for decoding)
  against a naive token-by-token loop written here, from a nonzero initial state, for several chunk
  sizes and lengths that are not multiples of the chunk; and their gradients against each other;
- cached decoding through DeltaNetState against the full forward, for all-linear and hybrid models;
- HF Qwen3NextForCausalLM (hybrid 3:1 DeltaNet + gated attention + MoE) through from_pretrained;
- the layer layout, config errors, gradient flow and a short training run;
- the configs/qwen3_mini.yaml parameter count, against the arithmetic written out below.
"""
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import (
    Config,
    Context,
    DeltaNetState,
    GatedDeltaNet,
    Transformer,
    delta_rule_chunked,
    delta_rule_recurrent,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
V = 97


# ----------------------------------------------------------------------------------------------
# 1. The gated delta rule itself


def naive_delta_rule(q, k, v, g, beta, S0):
    """One (batch, head) at a time, one token at a time, in float64:
        S <- exp(g_t) S;   S <- S + k_t (beta_t (v_t - S^T k_t))^T;   o_t = S^T q_t"""
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    S_end = torch.zeros(S0.shape, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = S0[b, h].double()                                         # (dk, dv)
            for t in range(T):
                qt, kt, vt = q[b, h, t].double(), k[b, h, t].double(), v[b, h, t].double()
                S = torch.exp(g[b, h, t].double()) * S
                S = S + torch.outer(kt, beta[b, h, t].double() * (vt - S.T @ kt))
                out[b, h, t] = S.T @ qt
            S_end[b, h] = S
    return out, S_end


def delta_inputs(B, H, T, dk, dv, seed=0, strong=False):
    """Inputs as the layer makes them: L2-normed q (scaled by dk^-0.5) and k, beta in (0, 1), g < 0;
    `strong` adds decays of up to e^-20 per step, steps with no decay and beta = 1."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, dk, generator=gen), dim=-1) * dk ** -0.5
    k = F.normalize(torch.randn(B, H, T, dk, generator=gen), dim=-1)
    v = torch.randn(B, H, T, dv, generator=gen)
    g = -torch.rand(B, H, T, generator=gen) * (20.0 if strong else 0.5)
    beta = torch.rand(B, H, T, generator=gen)
    if strong:
        g[..., ::5], beta[..., ::3] = 0.0, 1.0
    S0 = torch.randn(B, H, dk, dv, generator=gen)
    return q, k, v, g, beta, S0


@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("T", [1, 7, 37, 100])
def test_chunked_equals_recurrent_equals_naive(T, strong):
    q, k, v, g, beta, S0 = delta_inputs(2, 3, T, 8, 12, seed=T, strong=strong)
    o_ref, S_ref = naive_delta_rule(q, k, v, g, beta, S0)
    S0_copy = S0.clone()
    o_rec, S_rec = delta_rule_recurrent(q, k, v, g, beta, S0)
    torch.testing.assert_close(o_rec.double(), o_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(S_rec.double(), S_ref, rtol=0, atol=1e-5)
    for chunk in (1, 4, 16, 64):
        o_chk, S_chk = delta_rule_chunked(q, k, v, g, beta, S0, chunk)
        assert o_chk.shape == (2, 3, T, 12) and S_chk.shape == (2, 3, 8, 12)
        torch.testing.assert_close(o_chk.double(), o_ref, rtol=0, atol=1e-5, msg=f"chunk {chunk}")
        torch.testing.assert_close(S_chk.double(), S_ref, rtol=0, atol=1e-5, msg=f"chunk {chunk}")
    assert torch.equal(S0, S0_copy)  # the caller's state is not touched


def test_chunked_gradients_equal_recurrent_gradients():
    """Training runs backward through the chunked form (triangular solves); it must give the
    recurrence's gradients for every input, the initial state included."""
    inputs = delta_inputs(1, 2, 21, 4, 6, seed=3)
    grads = []
    for form in (lambda *a: delta_rule_recurrent(*a), lambda *a: delta_rule_chunked(*a, 8)):
        xs = [x.clone().requires_grad_() for x in inputs]
        o, S = form(*xs)
        (o.square().sum() + S.sin().sum()).backward()
        grads.append([x.grad for x in xs])
    for name, a, b in zip(("q", "k", "v", "g", "beta", "S0"), *grads):
        assert a.abs().max() > 0, name
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------
# 2. The layer in a model: cached decoding (DeltaNetState) equals the full forward


def dn_config(**kw):
    """A small Qwen3-Next-like model: GQA with output gate, partial RoPE, QK-norm, 2 key heads / 4
    value heads with dk != dv, and a short chunk so that prefills cross chunk boundaries."""
    base = dict(vocab_size=V, block_size=128, n_layer=4, n_head=4, n_kv_head=2, d_model=32,
                norm="rmsnorm", norm_unit_offset=True, position="rope", rope_fraction=0.5,
                qk_norm=True, attn_gate=True, ffn="glu", activation="silu", bias=False,
                tie_embeddings=False, attention_type="linear", dn_heads=2, dn_v_heads=4,
                dn_head_dim=8, dn_v_head_dim=6, dn_chunk=8, init_std=0.1)
    return Config(**{**base, **kw})


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def ids_of(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention_type", ["linear", "hybrid"])
def test_cached_decoding_equals_full_forward(attention_type):
    m = build(dn_config(attention_type=attention_type))
    assert "deltanet" in m.mixer_types
    ids = ids_of(2, 40)
    with torch.no_grad():
        full = m(ids).logits                                              # (2, 40, V)
        assert full.std() > 0.3  # logits large enough to mean something
        cache = m.setup_cache(2, 40)
        # prefill 11 tokens (crosses a chunk of 8), then a 6-token chunk onto the cache, then one at
        # a time
        steps = [m(ids[:, :11], cache=cache, input_pos=torch.arange(11)).logits,
                 m(ids[:, 11:17], cache=cache, input_pos=torch.arange(11, 17)).logits]
        for t in range(17, 40):
            steps.append(m(ids[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])).logits)
    err = (torch.cat(steps, 1) - full).abs()
    # Where a head's DeltaNet output is near zero, the gated RMSNorm over its dv channels (eps 1e-5)
    # scales fp32 rounding up by as much as eps^-1/2 ~ 300: typical entries agree to ~1e-6, the
    # worst to
    # a few 1e-5 (the same floor as full forwards of different lengths), while a wrong cache is off
    # by ~1e-1.
    assert err.max().item() <= 1e-4 and err.mean().item() <= 2e-6, (err.max(), err.mean())


def test_layer_one_token_at_a_time_equals_chunked():
    """GatedDeltaNet alone: the conv window and S carried in DeltaNetState reproduce the chunked
    forward."""
    cfg = dn_config(dn_chunk=16)
    torch.manual_seed(0)
    layer = GatedDeltaNet(cfg).eval()
    x = torch.randn(2, 37, cfg.d_model)
    ctx = lambda pos: Context(pos=pos, kpos=pos, causal=True, decoding=int(pos[0]) > 0)  # noqa: E731
    with torch.no_grad():
        full = layer(x, ctx(torch.arange(37)))
        state = DeltaNetState(2, cfg)
        assert state.S.dtype == torch.float32 and state.S.shape == (2, 4, 8, 6)  # (B, nv, dk, dv)
        assert state.conv.shape == (2, 2 * 2 * 8 + 4 * 6, cfg.dn_conv - 1)  # (B, Cq+Ck+Cv, K-1)
        steps = [layer(x[:, t:t + 1], ctx(torch.tensor([t])), state) for t in range(37)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention_type", ["linear", "hybrid"])
def test_generate_equals_greedy_full_forwards(attention_type):
    m = build(dn_config(attention_type=attention_type))
    prompt = ids_of(2, 5, seed=4)
    out = m.generate(prompt, 20, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat((seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, seq)
    assert len(set(out[0, 5:].tolist())) > 2  # not a degenerate constant output


# ----------------------------------------------------------------------------------------------
# 3. HF Qwen3-Next reference


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    hc = transformers.Qwen3NextConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        full_attention_interval=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        max_position_embeddings=256, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.Qwen3NextForCausalLM(hc)
    # moderate scales (HF_NOTES: default-scale weights make long decay products fragile)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                continue  # keep HF's decay initialisation
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("linear_attn.norm.weight")
                    else 0.1 * torch.randn_like(p))
    hf.eval()
    path = tmp_path_factory.mktemp("qwen3_next")
    hf.save_pretrained(path)
    return hf, Transformer.from_pretrained(path)


def test_qwen3_next_logits_match_hf(qwen3_next):
    hf, ours = qwen3_next
    assert ours.mixer_types == ["deltanet", "deltanet", "deltanet", "attn"]
    cfg = ours.config
    assert cfg.attn_gate and cfg.norm_unit_offset and cfg.rope_fraction == 0.25
    assert cfg.moe_shared_d_ff == 48
    ids = ids_of(2, 80, seed=5)  # crosses HF's 64-token chunk
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids).logits
    assert want.abs().max() > 1.0
    assert (got - want).abs().max().item() <= 1e-4


def test_qwen3_next_greedy_matches_hf_full_forwards(qwen3_next):
    """Our cached generate (DeltaNet state + KV cache) against a greedy loop of HF full forwards;
    the sequence grows past 64 tokens, so HF's side switches to two chunks on the way. (HF's own
    generate is not the reference: its cached path is a different computation of the same model.)"""
    hf, ours = qwen3_next
    prompt = ids_of(1, 50, seed=6)
    out = ours.generate(prompt, 20, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat((seq, hf(seq).logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, seq)


def test_qwen3_next_left_padding_matches_hf(qwen3_next):
    """HF zeroes padded hidden states before a DeltaNet layer's projections, so left padding adds
    nothing to the conv window or the state: the padded row's tokens get the logits of the same
    tokens unpadded."""
    hf, ours = qwen3_next
    ids = ids_of(2, 24, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0                                                       # row 0 left-padded by 5
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
        unmasked = ours(ids).logits
        alone = ours(ids[:1, 5:]).logits  # row 0 without its padding
    keep = mask.bool()
    assert (got - want)[keep].abs().max().item() <= 1e-4
    # the padding would leak without the mask
    assert (unmasked - want)[keep].abs().max().item() > 1e-2
    assert (got[0, 5:] - alone[0]).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------------------------
# 4. Layout and config errors


def test_hybrid_and_linear_layouts():
    with torch.device("meta"):
        hybrid = Transformer(dn_config(attention_type="hybrid", hybrid_ratio=3, n_layer=8))
        linear = Transformer(dn_config(attention_type="linear", n_layer=5))
        softmax = Transformer(dn_config(attention_type="softmax",
                                        layer_pattern=["deltanet", "attn"]))
        one_to_one = Transformer(dn_config(attention_type="hybrid", hybrid_ratio=1, n_layer=4))
    assert hybrid.mixer_types == (["deltanet"] * 3 + ["attn"]) * 2
    assert linear.mixer_types == ["deltanet"] * 5
    assert softmax.mixer_types == ["deltanet", "attn"] * 2  # an explicit per-layer pattern
    assert one_to_one.mixer_types == ["deltanet", "attn"] * 2
    cache = build(dn_config(attention_type="hybrid", n_layer=4)).setup_cache(1, 8)
    assert [type(c).__name__ for c in cache] == ["DeltaNetState"] * 3 + ["KVCache"]


@pytest.mark.parametrize("kw, message", [
    (dict(attention_type="mamba"),
     "attention_type='mamba' is not one of ['hybrid', 'linear', 'softmax']"),
    (dict(attention_type="hybird"), "did you mean 'hybrid'"),
    (dict(dn_heads=4, dn_v_heads=6), "dn_v_heads=6 must be a multiple of dn_heads=4"),
])
def test_bad_deltanet_config_is_one_line_error(kw, message):
    with pytest.raises(ValueError) as e:
        dn_config(**kw)
    assert message in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# 5. Training


def test_gradients_reach_every_deltanet_parameter():
    m = build(dn_config(attention_type="hybrid")).train()
    ids = ids_of(2, 20)
    m(ids[:, :-1], targets=ids[:, 1:].contiguous()).loss.backward()
    for i, block in enumerate(m.blocks[:3]):
        dn = block.mixer
        for name in ("A_log", "dt_bias", "conv.weight", "in_proj.weight", "norm.weight",
                     "out_proj.weight"):
            grad = dn.get_parameter(name).grad
            assert grad is not None and torch.isfinite(grad).all(), f"layer {i} {name}"
            assert grad.abs().max() > 0, f"layer {i} {name}"


def bigram_loss(data):
    """The lowest cross-entropy of a predictor seeing only the current token: H(next | current)."""
    pairs = Counter(zip(data[:, :-1].flatten().tolist(), data[:, 1:].flatten().tolist()))
    firsts, n = Counter(data[:, :-1].flatten().tolist()), data[:, 1:].numel()
    return -sum(c / n * math.log(c / firsts[a]) for (a, b), c in pairs.items())


def test_linear_attention_model_learns_a_repeating_sequence():
    """A period-12 sequence over three tokens: the current token alone leaves ~0.95 nats, so going
    well below that needs context, which in an all-DeltaNet model (no attention, no positions) only
    the conv and the delta-rule state carry."""
    torch.manual_seed(0)
    cfg = dn_config(n_layer=2, d_model=64, dn_heads=2, dn_v_heads=2, dn_head_dim=16,
                    dn_v_head_dim=16, dn_chunk=16, init_std=0.02)
    m = Transformer(cfg).train()
    pattern = torch.tensor([3, 5, 3, 7, 5, 5, 7, 3, 7, 5, 3, 3])
    # 4 rows at different phases
    data = torch.stack([pattern.repeat(6)[i:i + 65] for i in range(4)])
    floor = bigram_loss(data)
    assert floor > 0.9
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = m(data[:, :-1], targets=data[:, 1:].contiguous()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(V)) < 0.5                                 # starts at chance
    assert sum(losses[-3:]) / 3 < 0.3 * floor, losses


# ----------------------------------------------------------------------------------------------
# 6. configs/qwen3_mini.yaml


def qwen3_mini_param_count():
    """configs/qwen3_mini.yaml counted by hand."""
    C, V_, L, F_moe, F_shared, E = 512, 50304, 8, 512, 512, 8
    nh, nkv, hs = 8, 2, 64
    nk, nv, dk, dv, K = 4, 8, 64, 64, 4
    embed, head, final_norm = V_ * C, V_ * C, C                          # untied head
    # q|gate, k, v, o; q_norm, k_norm
    attn = C * nh * hs * 2 + 2 * C * nkv * hs + nh * hs * C + 2 * hs
    deltanet = (C * (2 * nk * dk + 2 * nv * dv + 2 * nv)  # in_proj: q, k, v, z, b, a
                + (2 * nk * dk + nv * dv) * K  # depthwise conv over q, k, v
                + 2 * nv + dv  # A_log, dt_bias, gated norm
                + nv * dv * C)                                            # out_proj
    moe = C * E + E * 3 * C * F_moe + 3 * C * F_shared + C  # router, experts, shared + its gate
    block_norms = 2 * C
    n_attn = L // 4
    layers = L * (moe + block_norms) + n_attn * attn + (L - n_attn) * deltanet
    return embed + head + final_norm + layers


def test_qwen3_mini_config():
    cfg = Config.from_yaml(CONFIGS / "qwen3_mini.yaml")
    with torch.device("meta"):
        m = Transformer(cfg)
    assert m.mixer_types == (["deltanet"] * 3 + ["attn"]) * 2
    assert [f for _, f in m.layer_types] == ["moe"] * 8
    n, expected = m.get_num_params(), qwen3_mini_param_count()
    assert abs(n - expected) <= 0.01 * expected, (n, expected)
    assert abs(n - 116.38e6) <= 0.01 * 116.38e6  # the figure quoted in the YAML
