"""Recurrence in depth and in time (issue 6), each checked against a separately written naive form.

Universal Transformer (Dehghani et al. 2018): one shared block applied n_layer times equals a stack
of n_layer copies of it; depth embeddings equal a hand-written loop; ACT (Graves 2016) equals an
independent per-position halting reference; cached decoding equals the full forward. Block-Recurrent
Transformer (Hutchins et al. 2022): one call equals segment-by-segment processing with the carried
cache; states change only at block ends; gradients reach the gates; attention is block-local, and
only the states carry information further back; generation equals greedy full forwards. With
compressed memories (Rae et al. 2019, mean pooling) and the dynamic position bias, a block_attn
layer equals a per-query naive form, one call still equals segments, the compressed memory stays
bounded and reaches exactly its slots back, memory/state dropout act only in training (whole
memories and states, per row), and gradients reach the bias MLP. Enhanced recurrence (ERNIE-Doc)
equals a naive block-by-block loop, one call still equals segments, and it reaches past the stack.
"""
import pytest
import torch

from model import Config, StateGate, Transformer, sinusoidal_table

V = 48


def ut_config(**kw):
    """A small UT as the seed describes it: pre-norm RMSNorm, GQA, RoPE, one shared block."""
    base = dict(vocab_size=V, block_size=32, n_layer=4, n_head=4, n_kv_head=2, d_model=32,
                norm="rmsnorm", position="rope", ffn="glu", activation="silu", bias=False,
                layer_groups=1, init_std=0.1)
    return Config(**{**base, **kw})


def brt_config(**kw):
    base = dict(vocab_size=V, block_size=64, n_layer=3, n_head=4, n_kv_head=1, d_model=32,
                block_width=4, recurrent_layers=(1,), n_states=5, position="rope", init_std=0.1)
    return Config(**{**base, **kw})


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def ids_of(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def close(a, b, atol):
    return (a - b).abs().max().item() <= atol


# ----------------------------------------------------------------------------------------------
# Universal Transformer


def unrolled_state_dict(ut, n_layer):
    """The UT's weights for a plain stack: its single block copied into every layer."""
    sd = {}
    for k, v in ut.state_dict().items():
        if k.startswith("blocks.0."):
            for i in range(n_layer):
                sd[f"blocks.{i}." + k[len("blocks.0."):]] = v.clone()
        else:
            sd[k] = v
    return sd


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_ut_equals_unrolled_stack(position):
    T = 4
    ut = build(ut_config(n_layer=T, position=position))
    plain = build(ut_config(n_layer=T, position=position, layer_groups=None), seed=1)
    assert len(ut.blocks) == 1 and len(plain.blocks) == T and ut.block_of == [0] * T
    plain.load_state_dict(unrolled_state_dict(ut, T))                     # strict: same layout
    block = sum(p.numel() for p in ut.blocks[0].parameters())
    assert plain.get_num_params() - ut.get_num_params() == (T - 1) * block
    x = ids_of(2, 20)
    with torch.no_grad():
        a, b = ut(x), plain(x)
    assert close(a.logits, b.logits, 1e-6) and a.aux_loss.item() == 0.0
    # the copies really are separate layers: changing one of them changes the plain stack's output
    with torch.no_grad():
        plain.blocks[2].mixer.o_proj.weight.mul_(2.0)
        assert not close(plain(x).logits, a.logits, 1e-3)


def depth_reference(model, ids):
    """The UT forward written as a loop over one block, adding the depth signal before each step."""
    cfg, T = model.config, ids.shape[1]
    pos = torch.arange(T)
    x = model.embed(ids, pos)
    ctx = model.context("attn", pos, None, None, False)
    for i in range(cfg.n_layer):
        if cfg.depth_embedding == "learned":
            x = x + model.step_emb.weight[i]
        else:   # timing signal over the step plus one over the position, as in the UT paper
            x = x + sinusoidal_table(cfg.n_layer, cfg.d_model)[i]
            x = x + sinusoidal_table(cfg.block_size, cfg.d_model)[pos]
        x = model.blocks[0](x, ctx)
    return model.lm_head(model.norm_f(x))


@pytest.mark.parametrize("depth", ["learned", "sinusoidal"])
def test_ut_depth_embedding_matches_reference_loop(depth):
    m = build(ut_config(n_layer=5, depth_embedding=depth))
    if depth == "learned":
        with torch.no_grad():
            m.step_emb.weight.normal_(0, 0.5)
    x = ids_of(2, 17)
    with torch.no_grad():
        logits, ref = m(x).logits, depth_reference(m, x)
        assert close(logits, ref, 1e-6)
        # the signal matters: the same weights without it give other logits
        plain = Transformer(ut_config(n_layer=5)).eval()
        plain.load_state_dict(m.state_dict(), strict=False)
        assert not close(plain(x).logits, logits, 1e-2)


def act_reference(model, ids):
    """Graves' ACT as the UT uses it, written per position: at step n the halting unit reads the
    step's input, p_n = sigmoid(halt(x_n)); a position halts at the first n where sum_{m<=n} p_m > 1
    - eps, or at the last step; the steps before get weight p_m, the halting step the remainder R =
    1 - sum_{m<n} p_m. Returns logits of sum_n w_n * state_n, the weights (steps, B, T), N and R (B,
    T)."""
    cfg, (B, T) = model.config, ids.shape
    pos = torch.arange(T)
    x = model.embed(ids, pos)
    ctx = model.context("attn", pos, None, None, False)
    probs, states = [], []
    for n in range(cfg.n_layer):
        if cfg.depth_embedding == "learned":
            x = x + model.step_emb.weight[n]
        probs.append(torch.sigmoid(model.act.halt(x)).squeeze(-1))        # (B, T)
        x = model.blocks[model.block_of[n]](x, ctx)
        states.append(x)
    W, N, R = torch.zeros(cfg.n_layer, B, T), torch.zeros(B, T), torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            spent = torch.zeros(())  # float32, as the model sums
            for n in range(cfg.n_layer):
                p = probs[n][b, t]
                if n == cfg.n_layer - 1 or spent + p > cfg.act_threshold:
                    W[n, b, t] = R[b, t] = 1 - spent
                    N[b, t] = n + 1
                    break
                W[n, b, t] = p
                spent = spent + p
    out = sum(W[n, ..., None] * states[n] for n in range(cfg.n_layer))
    return model.lm_head(model.norm_f(out)), W, N, R


def act_model(n_layer=5, seed=0, **kw):
    """A UT with ACT whose halting unit is drawn so that positions halt at several steps."""
    m = build(ut_config(n_layer=n_layer, act=True, act_threshold=0.9, act_weight=0.05,
                        depth_embedding="learned", **kw), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.step_emb.weight.copy_(torch.randn(m.step_emb.weight.shape, generator=g) * 0.3)
        for _ in range(20):  # a few draws until the halting steps spread over 2..n_layer
            m.act.halt.weight.copy_(torch.randn(m.act.halt.weight.shape, generator=g) * 2.0)
            m.act.halt.bias.fill_(-1.0)
            rec = record_act(m)
            m(ids_of(3, 16))
            m.act._forward_hooks.clear()
            steps = rec[-1][1][2]
            spread = (steps == n_layer).any() and (steps < n_layer - 1).any()
            if len(steps.unique()) >= 3 and spread:
                return m
    raise AssertionError("no halting unit draw spreads the halting steps")


def record_act(model):
    """Collect what the model's ACT returns at each step: (weights, (total, remainder, steps))."""
    steps = []
    model.act.register_forward_hook(lambda mod, inp, out: steps.append(out))
    return steps


def test_act_matches_independent_reference():
    m = act_model()
    rec = record_act(m)
    x = ids_of(3, 16)
    with torch.no_grad():
        out = m(x)
        ref, W, N, R = act_reference(m, x)
    assert close(out.logits, ref, 1e-5)
    assert torch.allclose(W.sum(0), torch.ones(3, 16), atol=1e-6)       # halting weights sum to 1
    w_model = torch.stack([w for w, _ in rec])                             # (steps, B, T)
    assert close(w_model, W, 1e-6)
    assert torch.allclose(w_model.sum(0), torch.ones(3, 16), atol=1e-6)
    total, rem, steps = rec[-1][1]
    assert torch.equal(steps, N) and int(steps.max()) <= m.config.n_layer and (total == 1).all()
    # not vacuous
    assert len(set(N.flatten().tolist())) >= 3 and N.max() == m.config.n_layer and N.min() < 3
    # ponder cost: act_weight * mean(N + R)
    assert abs(out.aux_loss.item() - 0.05 * (N + R).mean().item()) < 1e-6
    # a position's weights after its halting step are exactly zero
    after = torch.arange(1, m.config.n_layer + 1)[:, None, None] > N
    assert (w_model[after] == 0).all() and after.any()


def test_act_halting_unit_gets_gradients():
    m = act_model()
    m.train()
    out = m(ids_of(2, 16), targets=ids_of(2, 16, seed=2))
    g = torch.autograd.grad(out.aux_loss, m.act.halt.weight, retain_graph=True)[0]
    assert g.abs().max() > 0  # the ponder cost trains halting
    (out.loss + out.aux_loss).backward()
    assert m.act.halt.weight.grad.abs().max() > 0 and m.step_emb.weight.grad.abs().max() > 0


def test_act_halted_positions_stop_changing():
    """More steps change nothing at positions that halted early: their output is already final."""
    short = act_model(n_layer=5)
    long_ = build(ut_config(n_layer=8, act=True, act_threshold=0.9, act_weight=0.05,
                            depth_embedding="learned"))
    sd = short.state_dict()
    sd["step_emb.weight"] = torch.cat((sd["step_emb.weight"], long_.step_emb.weight.detach()[5:]))
    long_.load_state_dict(sd)
    rec = record_act(short)
    x = ids_of(2, 16)
    with torch.no_grad():
        a, b = short.hidden(x), long_.hidden(x)
    early = rec[-1][1][2] < 5  # halted before the forced stop
    assert early.any() and (~early).any()
    assert close(a[early], b[early], 1e-6)
    assert not close(a[~early], b[~early], 1e-3)  # the forced halts did change


def test_act_disabled_equals_fixed_depth():
    fixed = build(ut_config(n_layer=5, depth_embedding="learned"))
    act = build(ut_config(n_layer=5, depth_embedding="learned", act=True, act_weight=0.05), seed=1)
    act.load_state_dict(fixed.state_dict(), strict=False)  # all but the halting unit
    x = ids_of(2, 16)
    with torch.no_grad():
        ref = depth_reference(fixed, x)
        assert close(fixed(x).logits, ref, 1e-6) and fixed(x).aux_loss.item() == 0.0
        act.act.halt.bias.fill_(-1e4)  # p = 0: nobody halts early, the last step takes weight 1
        out = act(x)
        assert close(out.logits, ref, 1e-6)
        assert abs(out.aux_loss.item() - 0.05 * (5 + 1)) < 1e-6           # N = 5, R = 1 everywhere


def test_act_sum_exactly_at_the_threshold_does_not_halt():
    """The UT's rule halts a position once its summed p *exceeds* the threshold. With the halting
    unit zeroed, p = 0.5 at every step; with threshold 0.5 step 1 lands exactly on it (no halt) and
    step 2 passes it, halting with the remainder R = 1 - 0.5. Hand-computed: every position mixes
    its first two states 0.5 / 0.5 and the ponder cost is act_weight * (N + R) = 0.1 * (2 + 0.5).
    Halting at >= would stop at step 1 with weight 1 and cost 0.1 * (1 + 1)."""
    m = build(ut_config(n_layer=4, act=True, act_threshold=0.5, act_weight=0.1))
    states = []
    m.blocks[0].register_forward_hook(lambda mod, inp, out: states.append(out))
    with torch.no_grad():
        m.act.halt.weight.zero_()
        m.act.halt.bias.zero_()
        out = m(ids_of(2, 9))
        want = m.lm_head(m.norm_f(0.5 * states[0] + 0.5 * states[1]))
    assert len(states) == 4 and not close(states[0], states[1], 1e-2)
    assert close(out.logits, want, 1e-6)
    assert out.aux_loss.item() == pytest.approx(0.1 * 2.5, abs=1e-7)


def cached_logits(model, ids, prefill):
    """Prefill `prefill` tokens, then one token at a time; the logits of every position."""
    B, T = ids.shape
    cache = model.setup_cache(B, T)
    out = [model(ids[:, :prefill], cache=cache, input_pos=torch.arange(prefill)).logits]
    for t in range(prefill, T):
        out.append(model(ids[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])).logits)
    return torch.cat(out, 1)


def greedy_full_forwards(model, prompt, n):
    seq = prompt
    for _ in range(n):
        seq = torch.cat((seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)), 1)
    return seq


@pytest.mark.parametrize("depth", ["learned", "sinusoidal"])
def test_ut_act_cached_decoding_equals_full_forward(depth):
    m = act_model(n_layer=5)
    if depth == "sinusoidal":
        m2 = build(ut_config(n_layer=5, act=True, act_threshold=0.9, depth_embedding="sinusoidal"))
        m2.load_state_dict(m.state_dict(), strict=False)
        m = m2
    x = ids_of(2, 20)
    with torch.no_grad():
        full = m(x).logits
        assert close(cached_logits(m, x, 7), full, 1e-5)
        prompt = x[:, :6]
        assert torch.equal(m.generate(prompt, 12, temperature=0),
                           greedy_full_forwards(m, prompt, 12))


# ----------------------------------------------------------------------------------------------
# Block-Recurrent Transformer


def segmented_logits(model, ids, cuts):
    """Feed ids in segments [cuts[i], cuts[i+1]) through one carried cache."""
    cache = model.setup_cache(ids.shape[0], 0)
    out = [model(ids[:, a:b], cache=cache, input_pos=torch.arange(a, b)).logits
           for a, b in zip(cuts, cuts[1:])]
    return torch.cat(out, 1), cache


CUTS = [0, 1, 3, 9, 10, 11, 12, 19, 20, 23]   # lengths 1, 2, 6, 1, 1, 1, 7, 1, 3; block_width 4


def segments_equal_one_call(m, x):
    """x's logits in one call, after checking that the CUTS segments and token-by-token calls
    through a carried cache give them too (to 1e-5)."""
    full = m(x).logits
    seg, _ = segmented_logits(m, x, CUTS)
    assert close(seg, full, 1e-5)
    one_by_one, _ = segmented_logits(m, x, list(range(CUTS[-1] + 1)))
    assert close(one_by_one, full, 1e-5)
    return full


@pytest.mark.parametrize("gate", ["fixed", "lstm"])
@pytest.mark.parametrize("position, recurrent", [("rope", (1,)), ("learned", (1,)),
                                                 ("rope", (0, 2)), ("none", (2,))])
def test_brt_segments_equal_one_call(gate, position, recurrent):
    m = build(brt_config(state_gate=gate, position=position, recurrent_layers=recurrent))
    x = ids_of(2, CUTS[-1])
    with torch.no_grad():
        full = segments_equal_one_call(m, x)
        # not vacuous: the same segments without the carry give other logits
        cut = [m(x[:, a:b], input_pos=torch.arange(a, b)).logits for a, b in zip(CUTS, CUTS[1:])]
        assert not close(torch.cat(cut, 1), full, 1e-2)


def test_brt_cache_stays_bounded():
    m = build(brt_config())
    x = ids_of(1, 30)
    with torch.no_grad():
        _, cache = segmented_logits(m, x, list(range(31)))
    # after position 29 (block 7, 2 of its tokens seen): previous block + those 2 tokens
    for c in cache:
        assert c.k.shape[2] == 4 + 2 and c.pos.tolist() == list(range(24, 30))
    assert cache[1].block_k.shape[2] == 2 and cache[1].block_pos.tolist() == [28, 29]


@pytest.mark.parametrize("gate", ["fixed", "lstm"])
def test_brt_states_change_only_at_block_ends(gate):
    m = build(brt_config(state_gate=gate, recurrent_layers=(0, 2)))
    w = m.config.block_width
    x = ids_of(2, 15)
    cache = m.setup_cache(2, 0)
    before = {i: m.blocks[i].mixer.init_states.detach().expand(2, -1, -1).clone() for i in (0, 2)}
    with torch.no_grad():
        for t in range(15):
            m(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t]))
            for i in (0, 2):
                now = cache[i].states.clone()
                assert torch.equal(now, before[i]) == (t % w != w - 1), (i, t)
                before[i] = now
    assert cache[1].states is None  # a block_attn layer holds none


@pytest.mark.parametrize("gate", ["fixed", "lstm"])
def test_brt_gradients_reach_gates_and_states(gate):
    m = build(brt_config(state_gate=gate))
    m.train()
    x = ids_of(2, 14)                                                      # 3.5 blocks
    out = m(x, targets=ids_of(2, 14, seed=2))
    out.loss.backward()
    layer = m.blocks[1].mixer
    names = ["init_states", "gate_1.z.weight", "gate_1.i_bias", "gate_1.f_bias",
             "gate_2.z.weight", "gate_2.i_bias", "gate_2.f_bias", "q_state.weight", "o_self.weight",
             "o_tokens.weight", "o_read.weight", "state_ffn.up.weight"]
    if gate == "lstm":
        names += ["gate_1.i.weight", "gate_1.f.weight", "gate_2.i.weight", "gate_2.f.weight"]
    params = dict(layer.named_parameters())
    for n in names:
        assert params[n].grad is not None and params[n].grad.abs().max() > 0, n


@pytest.mark.parametrize("gate", ["fixed", "lstm"])
def test_state_gate_is_the_papers_formula(gate):
    """Hutchins et al. 2022's gates written out, with distinct input and forget biases (swapping
    them, or the two gates, changes the result). fixed: c' = sigmoid(b_f) c + sigmoid(b_i) z, z =
    W_z h + b_z; lstm: c' = sigmoid(W_f h + b_f) c + sigmoid(W_i h + b_i) tanh(W_z h + b_z)."""
    cfg = brt_config(state_gate=gate)
    C = cfg.d_model
    torch.manual_seed(0)
    g = StateGate(cfg)
    c, h = torch.randn(2, 5, C), torch.randn(2, 5, C)
    lin = lambda layer: h @ layer.weight.T + layer.bias  # noqa: E731
    with torch.no_grad():
        g.i_bias.copy_(torch.linspace(-2.0, -0.5, C))
        g.f_bias.copy_(torch.linspace(0.5, 3.0, C))
        if gate == "fixed":
            want = torch.sigmoid(g.f_bias) * c + torch.sigmoid(g.i_bias) * lin(g.z)
        else:
            want = (torch.sigmoid(lin(g.f) + g.f_bias) * c
                    + torch.sigmoid(lin(g.i) + g.i_bias) * torch.tanh(lin(g.z)))
        assert close(g(c, h), want, 1e-6)


def test_brt_truncated_backprop_between_segments():
    """Without detach, the second segment's loss reaches the first segment's state update; after
    BlockMemory.detach() it does not (truncated backprop)."""
    m = build(brt_config())
    m.train()
    x = ids_of(1, 12)
    layer = m.blocks[1].mixer
    for detach in (False, True):
        m.zero_grad()
        cache = m.setup_cache(1, 0)
        m(x[:, :8], cache=cache, input_pos=torch.arange(8))                 # two whole blocks
        if detach:
            for c in cache:
                c.detach()
        m(x[:, 8:], cache=cache, input_pos=torch.arange(8, 12)).logits.pow(2).mean().backward()
        g = layer.gate_1.z.weight.grad
        reached = g is not None and g.abs().max() > 0
        assert reached != detach, detach


def dependence(model, ids, j):
    """How much the last position's logits move when token j changes."""
    other = ids.clone()
    other[:, j] = (other[:, j] + 1) % V
    with torch.no_grad():
        return (model(other).logits[:, -1] - model(ids).logits[:, -1]).abs().max().item()


@pytest.mark.parametrize("n_layer", [1, 2])
def test_brt_attention_is_block_local_and_states_reach_further(n_layer):
    """Each block_attn layer sees its own block and the previous one, so a stack of L of them sees L
    blocks back (as Transformer-XL); a token L+1 or more blocks back changes nothing. With a
    recurrent layer the states carry it."""
    w, T = 4, 24  # the last token is in block 5
    local = build(brt_config(n_layer=n_layer, recurrent_layers=()))
    assert set(local.mixer_types) == {"block_attn"}
    x = ids_of(2, T)
    last_block = (T - 1) // w
    for back in range(1, 6):
        j = (last_block - back) * w + 1
        moved = dependence(local, x, j)
        assert (moved > 1e-4) if back <= n_layer else (moved == 0.0), (back, moved)
    rec = build(brt_config(n_layer=n_layer, recurrent_layers=(n_layer - 1,)))
    for back in range(1, 6):
        assert dependence(rec, x, (last_block - back) * w + 1) > 1e-4, back


@pytest.mark.parametrize("gate", ["fixed", "lstm"])
def test_brt_generate_equals_greedy_full_forwards(gate):
    m = build(brt_config(state_gate=gate))
    prompt = ids_of(2, 5)
    with torch.no_grad():
        out = m.generate(prompt, 17, temperature=0)  # positions 5..21: 4 block ends
        assert torch.equal(out, greedy_full_forwards(m, prompt, 17))


def test_brt_layer_types():
    cfg = brt_config(n_layer=4, recurrent_layers=(1, 3))
    m = Transformer(cfg)
    assert m.mixer_types == ["block_attn", "recurrent", "block_attn", "recurrent"]
    with pytest.raises(ValueError, match="recurrent_layers"):
        brt_config(recurrent_layers=(3,))
    with pytest.raises(ValueError, match="recurrent_layers"):
        brt_config(block_width=0)


# ----------------------------------------------------------------------------------------------
# Block-Recurrent Transformer: compressed memories, dynamic position bias, memory dropout, MQA


def brt_model(seed=0, **kw):
    """brt_config with the dynamic position bias drawn large enough to shape attention."""
    m = build(brt_config(**kw), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".pos_bias." in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return m


def naive_block_attention(model, layer, x):
    """A block_attn layer written per query: its keys are its own block up to itself, the whole
    previous block and, with compression, the mean key/value of each group of c tokens among the
    compress_slots*c tokens before the previous block; the dynamic bias is the MLP at log(1 + query
    - key position)."""
    cfg, (B, T, _) = model.config, x.shape
    w, c, nh, hs = cfg.block_width, cfg.compress_factor, cfg.n_head, cfg.hs
    heads = lambda t: t.view(B, T, -1, hs).transpose(1, 2)               # noqa: E731
    g = nh // cfg.kv_heads  # query heads per K/V head
    q = heads(layer.q_proj(x))                                             # (B, nh, T, hs)
    k, v = (heads(p(x)).repeat_interleave(g, 1) for p in (layer.k_proj, layer.v_proj))
    if cfg.position == "rope":
        cos, sin = model.position.rotary(torch.arange(T), "block_attn")
        rot = lambda t: t * cos + torch.cat((-t[..., hs // 2:], t[..., :hs // 2]), -1) * sin  # noqa: E731
        q, k = rot(q), rot(k)
    out = torch.zeros(B, nh, T, hs)
    for t in range(T):
        prev = (t // w - 1) * w  # the previous block's start
        at = list(range(max(prev, 0), t + 1))
        keys, vals = [k[:, :, j] for j in at], [v[:, :, j] for j in at]
        for s in range(max(prev - cfg.compress_slots * c, 0), prev, c or 1) if c else ():
            keys.append(k[:, :, s:s + c].mean(2))
            vals.append(v[:, :, s:s + c].mean(2))
            at.append(s + (c - 1) / 2)
        K, Vv = torch.stack(keys, 2), torch.stack(vals, 2)                 # (B, nh, n, hs)
        s = (q[:, :, t, None] @ K.transpose(-1, -2))[:, :, 0] * hs ** -0.5     # (B, nh, n)
        if cfg.position == "dynamic_bias":
            dist = torch.log1p(t - torch.tensor(at, dtype=torch.float32))[:, None]
            s = s + layer.pos_bias.mlp(dist).T
        out[:, :, t] = (s.softmax(-1)[..., None] * Vv).sum(2)
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, nh * hs))


@pytest.mark.parametrize("position, compress, n_kv_head", [
    ("dynamic_bias", 2, 1), ("rope", 4, 1), ("dynamic_bias", 0, 2), ("dynamic_bias", 4, None)])
def test_block_attention_matches_naive_reference(position, compress, n_kv_head):
    m = brt_model(position=position, compress_factor=compress, compress_slots=3,
                  n_kv_head=n_kv_head)
    layer = m.blocks[0].mixer
    assert layer.k_proj.out_features == m.config.kv_heads * m.config.hs  # MQA: one K/V head
    x = torch.randn(2, 23, m.config.d_model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ctx = m.context("block_attn", torch.arange(23), None, None, False)
        assert close(layer(x, ctx), naive_block_attention(m, layer, x), 1e-5)


@pytest.mark.parametrize("position, compress, gate, n_kv_head", [("dynamic_bias", 2, "fixed", 1),
                                                                 ("rope", 4, "lstm", 1),
                                                                 ("dynamic_bias", 4, "lstm", 2)])
def test_brt_segments_equal_one_call_compressed(position, compress, gate, n_kv_head):
    m = brt_model(position=position, compress_factor=compress, compress_slots=2, state_gate=gate,
                  n_kv_head=n_kv_head, recurrent_layers=(0, 2))
    x = ids_of(2, CUTS[-1])
    with torch.no_grad():
        full = segments_equal_one_call(m, x)
        plain = brt_model(position=position, state_gate=gate, n_kv_head=n_kv_head,
                          recurrent_layers=(0, 2))
        plain.load_state_dict(m.state_dict())  # compression has no weights
        # blocks 0-1 have nothing compressed
        assert close(plain(x).logits[:, :8], full[:, :8], 1e-6)
        # later ones read compressed slots
        assert not close(plain(x).logits[:, 8:], full[:, 8:], 1e-3)


def test_brt_compressed_memory_stays_bounded_and_reaches_back():
    """width 4, c 2, 3 slots: a query reads its block, the previous one and 6 tokens before that,
    no further."""
    m = brt_model(n_layer=1, recurrent_layers=(), compress_factor=2, compress_slots=3,
                  position="dynamic_bias")
    x = ids_of(1, 30)
    with torch.no_grad():
        _, cache = segmented_logits(m, x, list(range(31)))
    # after position 29 (block 7): XL keys 24..29; slots of the 6 tokens before, (18, 19), (20, 21),
    # (22, 23)
    assert cache[0].pos.tolist() == list(range(24, 30)) and cache[0].cpos.tolist() == [18, 20, 22]
    assert cache[0].ck.shape[2] == cache[0].cv.shape[2] == 3
    seen = [j for j in range(29) if dependence(m, x, j) > 1e-5]
    # 29 is in block 7: block 6 (24..27) + slots back to 18
    assert seen == list(range(18, 29)), seen


def test_brt_memory_and_state_dropout_act_only_in_training():
    torch.manual_seed(0)
    kw = dict(position="dynamic_bias", compress_factor=2, recurrent_layers=())
    m = brt_model(memory_dropout=1 - 1e-7, **kw)  # hides every block's memory
    x = ids_of(2, 16)
    with torch.no_grad():
        ref = brt_model(**kw)
        ref.load_state_dict(m.state_dict())
        assert close(m(x).logits, ref(x).logits, 0.0)  # eval: no dropout at all
        m.train()
        blockwise = torch.cat([ref(x[:, a:a + 4], input_pos=torch.arange(a, a + 4)).logits
                               for a in range(0, 16, 4)], 1)
        assert close(m(x).logits, blockwise, 1e-5)  # training: each block alone
        assert not close(blockwise, ref(x).logits, 1e-3)
    s = brt_model(state_dropout=0.5, position="dynamic_bias")
    with torch.no_grad():
        s_ref = brt_model(position="dynamic_bias")
        s_ref.load_state_dict(s.state_dict())
        assert close(s(x).logits, s_ref(x).logits, 0.0)
        s.train()
        a, b = s(x).logits, s(x).logits
        assert close(a[:, :4], s_ref(x).logits[:, :4], 1e-6)  # block 0 reads the initial states
        assert not close(a[:, 4:], b[:, 4:], 1e-3)  # later blocks: the dropped update


def test_brt_gradients_reach_position_bias_and_compressed_tokens():
    m = brt_model(n_layer=1, recurrent_layers=(), compress_factor=2, compress_slots=3,
                  position="dynamic_bias")
    m.train()
    emb = m.wte(ids_of(1, 24)).detach().requires_grad_()                   # (1, 24, C)
    h = emb
    ctx = m.context("block_attn", torch.arange(24), None, None, False)
    h = m.blocks[0](h, ctx)
    h[:, -1].pow(2).sum().backward()  # the last token of block 5
    reach = emb.grad[0].abs().amax(-1)
    assert (reach[10:16] > 0).all() and (reach[:10] == 0).all()  # slots (10..15), then nothing
    for name, p in m.blocks[0].mixer.pos_bias.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_brt_generate_equals_greedy_full_forwards_compressed():
    m = brt_model(state_gate="lstm", position="dynamic_bias", compress_factor=2, compress_slots=2)
    prompt = ids_of(2, 5)
    with torch.no_grad():  # positions 5..17: slots from 8 on
        assert torch.equal(m.generate(prompt, 13, temperature=0),
                           greedy_full_forwards(m, prompt, 13))


def test_brt_new_options_are_wired_and_validated():
    gates = build(brt_config(state_forget_bias=3.0)).blocks[1].mixer
    assert (gates.gate_1.f_bias == 3.0).all() and (gates.gate_2.f_bias == 3.0).all()
    with pytest.raises(ValueError, match="compress_factor"):
        brt_config(compress_factor=3)  # does not divide block_width 4
    with pytest.raises(ValueError, match="compress_slots"):
        brt_config(compress_factor=2, compress_slots=0)
    with pytest.raises(ValueError, match="dynamic_bias"):
        Config(position="dynamic_bias")
    with pytest.raises(ValueError, match="memory_dropout"):
        brt_config(memory_dropout=1.0)


# ----------------------------------------------------------------------------------------------
# Block-Recurrent Transformer: enhanced recurrence (ERNIE-Doc), whole-state dropout


def naive_enhanced(model, ids):
    """Block by block, layer by layer, nothing cached: layer i of block b attends causally to its
    own block and to the whole previous block as the layer above (i+1; the top layer: itself) saw
    it, that is, that layer's keys and values of its input there. Pre-norm blocks, RoPE."""
    cfg, (B, T) = model.config, ids.shape
    w, L, hs = cfg.block_width, cfg.n_layer, cfg.hs
    g = cfg.n_head // cfg.kv_heads
    heads = lambda t: t.view(B, t.shape[1], -1, hs).transpose(1, 2)          # noqa: E731
    rot = lambda t, p: t * model.position.rotary(p, "block_attn")[0] + torch.cat(  # noqa: E731
        (-t[..., hs // 2:], t[..., :hs // 2]), -1) * model.position.rotary(p, "block_attn")[1]
    kv = lambda blk, h, p: [rot(heads(blk.mixer.k_proj(blk.norm_1(h))), p).repeat_interleave(g, 1),
                            heads(blk.mixer.v_proj(blk.norm_1(h))).repeat_interleave(g, 1)]
    inputs, out = {}, []                  # inputs[(i, b)]: layer i's input over block b
    for b in range(T // w):
        p = torch.arange(b * w, (b + 1) * w)
        h = model.wte(ids[:, b * w:(b + 1) * w])
        for i, blk in enumerate(model.blocks):
            inputs[i, b] = h
            a = blk.mixer
            q = rot(heads(a.q_proj(blk.norm_1(h))), p)
            k, v = kv(blk, h, p)
            mask = torch.ones(w, w).tril().bool()
            if b:
                above = min(i + 1, L - 1)
                mk, mv = kv(model.blocks[above], inputs[above, b - 1], p - w)
                k, v = torch.cat((mk, k), 2), torch.cat((mv, v), 2)
                mask = torch.cat((torch.ones(w, w).bool(), mask), 1)
            s = (q @ k.transpose(-1, -2) * hs ** -0.5).masked_fill(~mask, float("-inf"))
            y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, w, -1)
            h = h + a.o_proj(y)
            h = h + blk.ffn(blk.norm_2(h))
        out.append(model.lm_head(model.norm_f(h)))
    return torch.cat(out, 1)


def test_enhanced_recurrence_matches_naive_reference():
    m = build(brt_config(recurrent_layers=(), enhanced_recurrence=True))
    x = ids_of(2, 20)
    with torch.no_grad():
        got, want = m(x).logits, naive_enhanced(m, x)
        plain = build(brt_config(recurrent_layers=()))
        plain.load_state_dict(m.state_dict())
        assert close(got, want, 1e-5)
        assert close(plain(x).logits[:, :4], got[:, :4], 1e-6)     # block 0 has no memory
        assert not close(plain(x).logits[:, 4:], got[:, 4:], 1e-2)  # later ones: another memory


@pytest.mark.parametrize("recurrent, compress", [((), 0), ((1,), 0), ((0, 2), 2)])
def test_enhanced_recurrence_segments_equal_one_call(recurrent, compress):
    """One call runs its blocks in turn through a cache, so any cut into segments, and decoding,
    give the same logits."""
    m = brt_model(recurrent_layers=recurrent, compress_factor=compress, compress_slots=2,
                  position="dynamic_bias" if compress else "rope", enhanced_recurrence=True)
    x = ids_of(2, CUTS[-1])
    with torch.no_grad():
        segments_equal_one_call(m, x)
        prompt = x[:, :5]
        assert torch.equal(m.generate(prompt, 15, temperature=0),
                           greedy_full_forwards(m, prompt, 15))


def test_enhanced_recurrence_reaches_past_the_stack():
    """Block attention alone sees n_layer blocks back (test above); handing memories down the stack
    makes the recurrence unbounded: a token 5 blocks back moves the last logits of a 2-layer stack
    without any state vectors."""
    m = build(brt_config(n_layer=2, recurrent_layers=(), enhanced_recurrence=True))
    x = ids_of(2, 24)
    for back in range(1, 6):
        assert dependence(m, x, (5 - back) * 4 + 1) > 1e-4, back
    for key in ("enhanced_recurrence", "memory_dropout", "state_dropout"):
        with pytest.raises(ValueError, match=r"enhanced_recurrence, .* \(block_width > 0\)"):
            Config(**{key: 0.5 if key.endswith("dropout") else True})


def test_state_dropout_resets_whole_states_per_row():
    """state_dropout, in training, has a row's block read (and update from) the initial states
    instead of the carried ones, each row drawn apart; in eval it does nothing. Block 1 of each row
    is then either the carried or the reset computation, both seen among 32 rows."""
    m = build(brt_config(state_dropout=0.5))
    x = ids_of(32, 8)                                             # two blocks of 4
    with torch.no_grad():
        carried = m(x).logits
        cache = m.setup_cache(32, 0)
        m(x[:, :4], cache=cache, input_pos=torch.arange(4))
        cache[1].states = None                                    # the reset: initial states
        reset = m(x[:, 4:], cache=cache, input_pos=torch.arange(4, 8)).logits
        m.train()
        torch.manual_seed(3)
        got = m(x).logits
    assert close(got[:, :4], carried[:, :4], 1e-6)                # block 0 reads the initial ones
    is_carried = (got[:, 4:] - carried[:, 4:]).abs().amax((1, 2)) < 1e-5
    is_reset = (got[:, 4:] - reset).abs().amax((1, 2)) < 1e-5
    assert (is_carried ^ is_reset).all() and 4 < int(is_reset.sum()) < 28


def test_memory_dropout_hides_whole_memories_per_row():
    """memory_dropout, in training, hides a block's whole memory (the previous block) from some
    rows: block 1 of each row is either the plain computation or block 1 alone, both seen."""
    m = build(brt_config(recurrent_layers=(), memory_dropout=0.5))
    x = ids_of(32, 8)
    with torch.no_grad():
        seen = m(x).logits[:, 4:]
        alone = m(x[:, 4:], input_pos=torch.arange(4, 8)).logits      # no memory at all
        m.train()
        torch.manual_seed(4)
        got = m(x).logits[:, 4:]
    is_seen = (got - seen).abs().amax((1, 2)) < 1e-5
    is_alone = (got - alone).abs().amax((1, 2)) < 1e-5
    assert (is_seen ^ is_alone).all() and 4 < int(is_alone.sum()) < 28
