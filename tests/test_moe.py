"""Mixture of experts, each part checked against something written independently of model.py:

- HF MixtralForCausalLM and Qwen3MoeForCausalLM (sparse step, mlp_only_layers, norm_topk_prob off
  and on) through from_pretrained: fp32 logits, greedy decoding through our cache, and the aux
  balance loss;
- token choice against a naive per-token loop, expert choice against a naive per-expert loop, on
  both dispatch paths (grouped matmul and the loop over experts);
- the balance and router z-losses against hand computations; expert choice's non-causality and the
  refusal to decode it from a cache;
- MoE every k layers, gradients under checkpointing and into the router, bf16 autocast on CPU;
- several ungated shared experts (DeepSeekMoE, the Modern Transformer seed's num_shared_experts)
  against HF DeepseekV2Moe and, split back into separate experts, the naive loop; MoE keys on a
  model without MoE layers are an error.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model import Config, MoE, Transformer, expert_linear

transformers = pytest.importorskip("transformers")
load_balancing_loss_func = transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func

V, PROMPT, NEW, TOL = 97, 8, 20, 1e-4
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128,
             tie_word_embeddings=False, attn_implementation="eager")
QWEN3_MOE = dict(SMALL, num_hidden_layers=6, head_dim=24, num_experts=6, num_experts_per_tok=2,
                 moe_intermediate_size=48, decoder_sparse_step=2,
                 mlp_only_layers=[3])  # MoE at layers 1 and 5
CASES = {  # name -> (HF model class, HF config class, config kwargs)
    "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                dict(SMALL, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(QWEN3_MOE, norm_topk_prob=False)),
    "qwen3_moe_norm_topk": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                            dict(QWEN3_MOE, norm_topk_prob=True)),
}


# ----------------------------------------------------------------------------------------------
# 1. HF references


def redraw(model):
    """Weights every feature shows in: norms away from 1, matrices large enough for non-uniform
    attention, a router large enough that its top-k is far from a coin toss, a small vocabulary
    matrix and a large final norm (so that greedy decoding does not just repeat the prompt)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                p.copy_(0.03 * r)
            elif name == "model.norm.weight":
                p.copy_(4.0 + 0.1 * r)
            elif p.dim() == 1:                                            # the other norms
                p.copy_(1.0 + 0.1 * r)
            elif name.endswith("mlp.gate.weight"):                        # the router
                p.copy_(0.4 * r)
            else:                                                         # attention and experts
                p.copy_(0.15 * r)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            model_cls, config_cls, kw = CASES[name]
            torch.manual_seed(0)
            hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))
            redraw(hf)
            hf.eval()
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path)
            built[name] = hf, Transformer.from_pretrained(path)
        return built[name]
    return get


def ids(B, T, seed):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_layouts_follow_the_hf_configs(models):
    _, mixtral = models("mixtral")
    _, qwen = models("qwen3_moe")
    assert [f for _, f in mixtral.layer_types] == ["moe", "moe"]
    assert [f for _, f in qwen.layer_types] == ["dense", "moe", "dense", "dense", "dense", "moe"]
    assert not qwen.config.moe_renorm and models("qwen3_moe_norm_topk")[1].config.moe_renorm
    assert qwen.blocks[1].ffn.up.shape == (6, 48, 64)
    assert qwen.blocks[1].ffn.down.shape == (6, 64, 48)


@pytest.mark.parametrize("name", CASES)
def test_logits_match_hf(models, name):
    hf, ours = models(name)
    x = ids(2, 20, seed=2)
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x).logits
    assert ref.std() > 0.3, "logits this flat would hide bugs"
    assert (got - ref).abs().max().item() <= TOL


def test_routing_is_far_from_uniform(models):
    """A weak router would let a wrong top-k or weighting pass unnoticed: the chosen experts must
    carry clearly more weight than the rest."""
    hf, _ = models("mixtral")
    with torch.no_grad():
        logits = hf(ids(2, 20, seed=2), output_router_logits=True).router_logits
    for layer in logits:
        top = F.softmax(layer, -1).topk(2, -1).values.sum(-1)
        assert top.mean() > 0.8, top.mean()


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_matches_hf(models, name):
    hf, ours = models(name)
    x = ids(2, PROMPT, seed=3)
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    got = ours.generate(x, max_new_tokens=NEW, temperature=0)
    assert all(len(set(row[PROMPT:].tolist())) >= 4 for row in ref), "HF repeats: a weak check"
    assert torch.equal(got, ref), f"ours {got.tolist()}\nHF   {ref.tolist()}"


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_aux_loss_matches_hf(models, name):
    """HF's aux_loss pools every MoE layer's router logits into one E * sum_e f_e * P_e; imported
    models use that definition (moe_pool_balance). Our default (Switch's) is one such term per
    layer, summed: checked here against HF's own function applied to each layer alone."""
    hf, ours = models(name)
    x = ids(2, 20, seed=5)
    with torch.no_grad():
        out = hf(x, output_router_logits=True)
        got = ours(x).aux_loss
        per_layer = Transformer(dataclasses.replace(ours.config, moe_pool_balance=False))
        per_layer.load_state_dict(ours.state_dict())
        got_per_layer = per_layer.eval()(x).aux_loss
    E, k, coef = ours.config.n_expert, ours.config.moe_top_k, hf.config.router_aux_loss_coef
    assert ours.config.moe_pool_balance and ours.config.moe_aux_weight == coef
    assert len(out.router_logits) == 2
    torch.testing.assert_close(got, coef * out.aux_loss, rtol=1e-5, atol=0)
    want_per_layer = sum(load_balancing_loss_func((layer,), E, k) for layer in out.router_logits)
    torch.testing.assert_close(got_per_layer, coef * want_per_layer, rtol=1e-5, atol=0)
    assert abs(got_per_layer - 2 * got) > 0.02 * got  # the two definitions do differ here


# ----------------------------------------------------------------------------------------------
# 2. One MoE layer against naive loops


def moe_config(**kw):
    base = dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, d_model=32, ffn="glu",
                activation="silu", bias=False, ffn_pattern=["moe"], n_expert=6, moe_top_k=2,
                moe_d_ff=24, init_std=0.3, norm="rmsnorm", position="rope")
    return Config(**{**base, **kw})


def make_moe(cfg, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    moe = MoE(cfg).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():           # biases away from 0 so that they matter
            if p.dim() <= 2 and not p.any():
                p.normal_(0, 0.3)
    return moe


def naive_expert(moe, e, x):
    """Expert e on one token x (C,), from its rows of the stacked weights."""
    b = lambda t: 0 if t is None else t[e]  # noqa: E731
    up = moe.up[e] @ x + b(moe.up_bias)
    h = moe.act(moe.gate[e] @ x + b(moe.gate_bias)) * up if moe.gate is not None else moe.act(up)
    return moe.down[e] @ h + b(moe.down_bias)


def naive_shared(moe, x):
    s = moe.shared_expert
    return torch.sigmoid(moe.shared_gate.weight @ x) * (s.down(s.act(s.gate(x)) * s.up(x)))


def naive_ungated_shared(moe, x):
    """moe_n_shared separate experts of the expert width, summed: expert j is its own slice of the
    fused FFN's hidden units (the fused output bias counted once)."""
    s, F = moe.shared_expert, moe.up.shape[1]
    lin = lambda layer, r: layer.weight[r] @ x + (0 if layer.bias is None else layer.bias[r])  # noqa: E731
    out = 0 if s.down.bias is None else s.down.bias
    for j in range(moe.cfg.moe_n_shared):
        r = slice(j * F, (j + 1) * F)
        h = s.act(lin(s.gate, r)) * lin(s.up, r) if hasattr(s, "gate") else s.act(lin(s.up, r))
        out = out + s.down.weight[:, r] @ h
    return out


def naive_token_choice(moe, x):
    """For each token: softmax over experts, top-k, optional renormalisation, weighted sum of the
    chosen experts' outputs, plus the sigmoid-gated shared expert or the ungated ones."""
    cfg, out = moe.cfg, torch.zeros_like(x)
    for t in range(len(x)):
        p = torch.softmax(moe.router.weight @ x[t], -1)
        w, idx = p.topk(cfg.moe_top_k)
        if cfg.moe_renorm:
            w = w / w.sum()
        for wj, e in zip(w, idx.tolist()):
            out[t] += wj * naive_expert(moe, e, x[t])
        if cfg.moe_shared_d_ff:
            out[t] += naive_shared(moe, x[t])
        if cfg.moe_n_shared:
            out[t] += naive_ungated_shared(moe, x[t])
    return out


def naive_expert_choice(moe, x):
    """Each expert takes the capacity tokens it gives the highest probability; a token's output is
    the sum of probability * expert output over the experts that took it."""
    cfg, N = moe.cfg, len(x)
    p = torch.softmax(x @ moe.router.weight.T, -1)                       # (N, E)
    cap = min(N, max(1, int(cfg.moe_capacity * N * cfg.moe_top_k / cfg.n_expert)))
    out = torch.zeros_like(x)
    for e in range(cfg.n_expert):
        for t in p[:, e].topk(cap).indices.tolist():
            out[t] += p[t, e] * naive_expert(moe, e, x[t])
    return out


VARIANTS = {  # MoE layer options -> config fields
    "glu_renorm": dict(),
    "glu_no_renorm_shared": dict(moe_renorm=False, moe_shared_d_ff=20),
    "mlp_gelu_biases": dict(ffn="mlp", activation="gelu", bias=True),
    "top3_shared_biases": dict(moe_top_k=3, moe_shared_d_ff=20, bias=True),
    "glu_2_ungated_shared": dict(moe_n_shared=2),
    "mlp_3_ungated_shared_biases": dict(ffn="mlp", activation="gelu", bias=True, moe_n_shared=3),
}
DTYPES = {"grouped_mm": torch.float32, "loop_over_experts": torch.float64}   # fp64 takes the loop


@pytest.mark.parametrize("path", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_token_choice_equals_naive_loop(variant, path):
    moe = make_moe(moe_config(**VARIANTS[variant]), DTYPES[path])
    x = torch.randn(2, 13, 32, dtype=DTYPES[path])
    with torch.no_grad():
        got = moe(x)
        want = naive_token_choice(moe, x.view(-1, 32)).view(2, 13, 32)
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", DTYPES)
@pytest.mark.parametrize("capacity", [1.0, 0.5, 2.0])
def test_expert_choice_equals_naive_loop(capacity, path):
    cfg = moe_config(moe_router="expert_choice", moe_capacity=capacity, bias=True)
    moe = make_moe(cfg, DTYPES[path])
    x = torch.randn(2, 11, 32, dtype=DTYPES[path])
    with torch.no_grad():
        got = moe(x)
        want = naive_expert_choice(moe, x.view(-1, 32)).view(2, 11, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    if capacity == 0.5:  # low capacity leaves tokens unrouted
        assert (want == 0).all(-1).any()


def test_grouped_matmul_equals_loop_over_experts():
    """expert_linear's two paths (F.grouped_mm; a loop) on the same rows, empty experts included."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 4])
    x, w = torch.randn(13, 16, generator=g), torch.randn(6, 24, 16, generator=g)
    b = torch.randn(6, 24, generator=g)
    rows = list(enumerate(zip([0, 3, 3, 8, 9, 9], counts.tolist())))   # (expert, (start, n))
    want = torch.cat([x[s:s + n] @ w[e].T + b[e] for e, (s, n) in rows])
    for dtype in (torch.float32, torch.float64):  # fp32: grouped; fp64: the loop
        got = expert_linear(x.to(dtype), w.to(dtype), b.to(dtype), counts)
        torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-5)
    got = expert_linear(x[:, :10], w[..., :10], None, counts)            # 40-byte rows: the loop
    torch.testing.assert_close(got, torch.cat([x[s:s + n, :10] @ w[e, :, :10].T
                                               for e, (s, n) in rows]))


def test_expert_choice_is_not_causal():
    """Changing the last token changes earlier tokens' outputs under expert choice (it competes with
    them for capacity), never under token choice."""
    x = torch.randn(1, 16, 32)
    later = x.clone()
    later[0, -1] = 10 * torch.randn(32)
    for router, causal in (("expert_choice", False), ("token_choice", True)):
        moe = make_moe(moe_config(moe_router=router))
        with torch.no_grad():
            diff = (moe(x) - moe(later))[0, :-1].abs().max().item()
        assert (diff == 0) if causal else diff > 1e-3, (router, diff)


def test_expert_choice_refuses_cached_decoding():
    m = Transformer(moe_config(moe_router="expert_choice"))
    for call in (lambda: m.generate(ids(1, 4, 0), 3), lambda: m.setup_cache(1, 8)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "expert_choice" in msg and "token_choice" in msg and "\n" not in msg
    # training path runs
    full = Transformer(moe_config(moe_router="expert_choice")).eval()(ids(2, 10, 0)).logits
    assert torch.isfinite(full).all()


# ----------------------------------------------------------------------------------------------
# 3. Auxiliary losses


def test_balance_and_z_loss_equal_hand_computation():
    """balance = E * sum_e (slots of e / N) * mean_t p_te; z = mean_t (log sum_e exp l_te)^2
    (ST-MoE), in fp64."""
    cfg = moe_config(moe_aux_weight=0.3, moe_z_weight=0.07, moe_top_k=2)
    moe = make_moe(cfg)
    x = torch.randn(3, 7, 32)
    moe(x)
    logits = (x.view(-1, 32) @ moe.router.weight.T).double()             # (N, E)
    N, E = logits.shape
    p = logits.exp() / logits.exp().sum(-1, keepdim=True)
    chosen = p.topk(2, -1).indices
    f = torch.tensor([(chosen == e).sum().item() / N for e in range(E)], dtype=torch.float64)
    balance = E * sum(f[e] * p[:, e].mean() for e in range(E))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / N
    assert f.max() > 1.5 * f.min() or f.min() == 0  # routing not perfectly balanced
    assert abs(moe.aux_loss.item() - (0.3 * balance.item() + 0.07 * z)) < 1e-5


def test_moe_every_k_layers_and_aux_loss_in_the_output():
    """ffn_pattern [dense, moe] puts MoE in every second layer; the output's aux_loss is the sum of
    those layers' losses and its gradient reaches each router."""
    m = Transformer(moe_config(n_layer=4, ffn_pattern=["dense", "moe"], moe_z_weight=0.01))
    assert [type(b.ffn).__name__ for b in m.blocks] == ["GLU", "MoE", "GLU", "MoE"]
    out = m(ids(2, 12, 1))
    moes = [m.blocks[1].ffn, m.blocks[3].ffn]
    assert out.aux_loss.item() > 0.01 * 2  # balance is >= 1 per layer (k=2: >= 2)
    torch.testing.assert_close(out.aux_loss, moes[0].aux_loss + moes[1].aux_loss)
    grads = torch.autograd.grad(out.aux_loss, [f.router.weight for f in moes])
    assert all(g.abs().max() > 0 for g in grads)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = ids(2, 16, 2)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = moe_config(n_layer=3, moe_shared_d_ff=16, moe_z_weight=0.01, grad_checkpoint=ckpt)
        m = Transformer(cfg).train()
        out = m(x[:, :-1], targets=x[:, 1:])
        (out.loss + out.aux_loss).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=0, atol=1e-6, msg=n)
    assert grads[0]["blocks.0.ffn.router.weight"].abs().max() > 0
    assert grads[0]["blocks.0.ffn.down"].abs().max() > 0


def test_bf16_autocast_on_cpu_runs_close_to_fp32():
    torch.manual_seed(0)
    m = Transformer(moe_config(n_layer=2, moe_shared_d_ff=16, init_std=0.1)).train()
    x = ids(2, 16, 3)
    ref, ref_logits = m(x[:, :-1], targets=x[:, 1:]), m(x[:, :-1]).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, logits = m(x[:, :-1], targets=x[:, 1:]), m(x[:, :-1]).logits
        (out.loss + out.aux_loss).backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    err = (logits.float() - ref_logits).abs()
    assert err.mean() < 0.02 * ref_logits.std() and abs(out.loss.item() - ref.loss.item()) < 0.01
    assert abs(out.aux_loss.item() - ref.aux_loss.item()) < 0.01 * ref.aux_loss.item()


def test_moe_model_learns():
    """A short run on a fixed batch: the loss falls well below chance."""
    torch.manual_seed(0)
    m = Transformer(moe_config(n_layer=2, init_std=0.02)).train()
    data = ids(4, 33, 4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(30):
        out = m(data[:, :-1], targets=data[:, 1:])
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()
        opt.step()
    assert out.loss.item() < 0.5 * math.log(V)


def test_ungated_shared_experts_match_hf_deepseek_v2():
    """n_shared_experts ungated experts of the expert width (DeepSeekMoE, arXiv:2401.06066) as HF
    DeepseekV2Moe computes them (greedy top-k of the softmax, not renormalised, scaling 1), our
    weights copied in: gate_up_proj stacks each expert's [gate; up]."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    hf_cfg = transformers.DeepseekV2Config(hidden_size=32, moe_intermediate_size=24,
                                           n_routed_experts=6, num_experts_per_tok=2,
                                           n_shared_experts=3, topk_method="greedy",
                                           routed_scaling_factor=1.0, hidden_act="silu")
    hf = DeepseekV2Moe(hf_cfg).eval()
    moe = make_moe(moe_config(moe_renorm=False, moe_n_shared=3))
    assert moe.shared_expert.up.out_features == 3 * 24 and not hasattr(moe, "shared_gate")
    with torch.no_grad():
        hf.gate.weight.copy_(moe.router.weight)
        hf.experts.gate_up_proj.copy_(torch.cat((moe.gate, moe.up), dim=1))   # (E, 2F, C)
        hf.experts.down_proj.copy_(moe.down)
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            getattr(hf.shared_experts, theirs).weight.copy_(getattr(moe.shared_expert, ours).weight)
        x = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(1))
        want, got = hf(x), moe(x)
        shared = moe.shared_expert(x)
    assert shared.abs().max() > 0.3                                # the shared part matters
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("keys", [dict(n_expert=4), dict(moe_top_k=1), dict(moe_n_shared=2),
                                  dict(moe_router="expert_choice"), dict(moe_aux_weight=0.1)])
def test_moe_keys_without_moe_layers_are_an_error(keys):
    """Setting an MoE key on a dense model would silently build a dense one: refused, naming the
    key and ffn_pattern."""
    with pytest.raises(ValueError) as e:
        Config(**keys)
    msg = str(e.value)
    key = next(iter(keys))
    assert msg.startswith(f"{key}=") and "ffn_pattern=['dense'] has none" in msg and "\n" not in msg
    assert Config(**keys, ffn_pattern=["dense", "moe"]).n_expert == keys.get("n_expert", 8)


def test_gated_and_ungated_shared_experts_are_one_choice():
    with pytest.raises(ValueError, match="set one"):
        moe_config(moe_shared_d_ff=16, moe_n_shared=1)


def test_qwen3_moe_with_every_layer_dense_imports_as_a_dense_model(tmp_path):
    kw = dict(QWEN3_MOE, num_hidden_layers=2, mlp_only_layers=[0, 1])
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**kw))
    redraw(hf)
    hf.eval().save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    assert [f for _, f in ours.layer_types] == ["dense", "dense"]
    x = ids(2, 12, 3)
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max().item() <= TOL
