"""Encoder-decoder and encoder-only configs: parameter counts of the named models, and the Enhanced
Transformer (RMSNorm, RoPE in both stacks, pre-LN, GELU, no biases) checked against itself: cached
generation equals greedy full forwards, source padding changes nothing else, a toy task trains."""
import math
from pathlib import Path

import pytest
import torch

from model import Config, Transformer, from_checkpoint, load_checkpoint, save_checkpoint

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# name -> (expected parameters, relative tolerance). Exact counts are HF's for the same model
# (BART: plus its final_logits_bias, a buffer in HF); the seeds' budgets are approximate.
COUNTS = {
    "bert_base": (110_106_428, 0), "albert_base": (11_813_810, 0),
    "deberta_v3_small": (142_024_548, 0), "t5_small": (60_506_624, 0),
    "bart_base": (139_420_416 + 50_265, 0), "enhanced_small": (125e6, 0.02),
    "enhanced_medium": (350e6, 0.02), "enhanced_large": (750e6, 0.02),
    "bert_1_7b": (1.7e9, 0.02), "llama3_2b": (2.0e9, 0.02),
}


@pytest.mark.parametrize("name", COUNTS)
def test_param_counts(name):
    expected, tol = COUNTS[name]
    with torch.device("meta"):
        n = Transformer.from_yaml(CONFIGS / f"{name}.yaml").get_num_params()
    assert abs(n - expected) <= tol * expected, f"{name}: {n:,} parameters"


def test_non_embedding_count():
    """BART-base without its token table (encoder, decoder and head share it) and two position
    tables."""
    with torch.device("meta"):
        m = Transformer.from_yaml(CONFIGS / "bart_base.yaml")
    assert m.get_num_params(non_embedding=True) == m.get_num_params() - 50265 * 768 - 2 * 1026 * 768


def test_enhanced_layout():
    """Both stacks: RMSNorm, pre-LN, RoPE in self-attention only, GELU MLP, no bias anywhere; one
    embedding."""
    cfg = Config.from_yaml(CONFIGS / "enhanced_small.yaml")
    with torch.device("meta"):
        m = Transformer(cfg)
    assert len(m.encoder.blocks) == len(m.decoder.blocks) == 6
    assert m.decoder.wte is m.encoder.wte and m.decoder.lm_head.weight is m.encoder.wte.weight
    assert not any(name.endswith("bias") for name, _ in m.named_parameters())
    assert "rope" in dict(m.encoder.named_children()) and "rope" in dict(m.decoder.named_children())
    assert all(b.mixer.q_proj.in_features == 768 and b.ffn.up.out_features == 3072
               for b in m.decoder.blocks)


# ----------------------------------------------------------------------------------------------
# a tiny Enhanced Transformer

# decoder start token; the source opens with BOS (RoPE alone gives no absolute position)
V, START, BOS = 32, 0, 1


def enhanced(**kw):
    """enhanced_small.yaml at toy size; init_std 0.1: weights large enough for logits not flat."""
    torch.manual_seed(0)
    small = dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, d_model=64, d_ff=128,
                 init_std=0.1, encoder=dict(n_layer=3))
    return Transformer.from_yaml(CONFIGS / "enhanced_small.yaml", **{**small, **kw}).eval()


def source(B=2, S=10, pad=3, seed=0):
    """BOS + random tokens; row 1 is padded on the right by `pad` (mask 0) with junk tokens."""
    src = torch.randint(BOS + 1, V, (B, S), generator=torch.Generator().manual_seed(seed))
    src[:, 0] = BOS
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - pad:] = 0
    return src, mask


@pytest.fixture(scope="module")
def trained():
    """A tiny one trained for 80 steps to reverse its source; returns the model and loss curve."""
    m = enhanced(n_layer=2, encoder=None, init_std=0.02).train()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(80):
        body = torch.randint(BOS + 1, V, (32, 6), generator=g)
        src = torch.cat((torch.full((32, 1), BOS), body), dim=1)
        tgt = body.flip(1)
        # the target shifted right
        dec_in = torch.cat((torch.full((32, 1), START), tgt[:, :-1]), dim=1)
        loss = m(src, decoder_input_ids=dec_in, targets=tgt).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return m.eval(), losses


def test_reverse_task_trains(trained):
    """Loss falls from chance (ln 30: tokens are uniform over 30 ids) to well below what any model
    that ignores the source could reach (also ln 30): the decoder reads the encoder through
    cross-attention."""
    _, losses = trained
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    curve = f"loss {first:.2f} -> {last:.2f}"
    assert abs(first - math.log(V - 2)) < 0.3 and last < math.log(V - 2) - 0.6, curve


def test_cached_generation_equals_greedy_full_forwards(trained):
    """model.generate (encoder once, decoder K/V and cross K/V cached) = argmax of a full forward
    per step, over a batch with a padded source row."""
    m, _ = trained
    src, mask = source(S=7, pad=2)
    got = m.generate(src, max_new_tokens=12, temperature=0, attention_mask=mask)
    seq = torch.full((2, 1), START)
    with torch.no_grad():
        for _ in range(12):
            logits = m(src, decoder_input_ids=seq, attention_mask=mask).logits[:, -1]
            seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
    assert all(len(set(row.tolist())) >= 4 for row in seq), f"repeats itself: a weak check {seq}"
    assert torch.equal(got, seq)


def test_cached_decoding_logits_equal_full_forward():
    m = enhanced()
    src, mask = source()
    tgt = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(src, decoder_input_ids=tgt, attention_mask=mask).logits
        memory = m.encoder.hidden(src, attention_mask=mask)
        cache = m.setup_cache(2, 12)
        step = lambda a, b: m(None, tgt[:, a:b], attention_mask=mask, cache=cache,
                              input_pos=torch.arange(a, b), memory=memory).logits
        steps = [step(0, 3)] + [step(t, t + 1) for t in range(3, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_source_padding_changes_nothing_else():
    """Row 1 padded to the batch length gives the logits it gets alone, unpadded; row 0 is
    unaffected by it; and the padded positions' tokens do not matter."""
    m = enhanced()
    src, mask = source(pad=4)
    tgt = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batch = m(src, decoder_input_ids=tgt, attention_mask=mask).logits
        alone = [m(src[i:i + 1, :int(mask[i].sum())], decoder_input_ids=tgt[i:i + 1]).logits
                 for i in range(2)]
        junk = src.clone()
        junk[1, -4:] = (junk[1, -4:] + 7) % V
        rejunked = m(junk, decoder_input_ids=tgt, attention_mask=mask).logits
    for i in range(2):
        torch.testing.assert_close(batch[i:i + 1], alone[i], atol=1e-5, rtol=0)
    torch.testing.assert_close(rejunked, batch, atol=1e-6, rtol=0)
    unmasked = m(src, decoder_input_ids=tgt).logits[1]
    assert (unmasked - batch[1]).abs().max() > 1e-2, "padding mask had no effect"


def test_checkpoint_roundtrip(tmp_path):
    m = enhanced()
    save_checkpoint(tmp_path / "ckpt.pt", m)
    m2 = from_checkpoint(load_checkpoint(tmp_path / "ckpt.pt")).eval()
    src, mask = source()
    tgt = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        logits = [x(src, decoder_input_ids=tgt, attention_mask=mask).logits for x in (m2, m)]
        torch.testing.assert_close(*logits, atol=0, rtol=0)
    assert m2.decoder.wte is m2.encoder.wte


# ----------------------------------------------------------------------------------------------
# errors: one line, naming the problem and the fix


def test_generation_length_limit():
    """RoPE decoders may run past block_size (the cache is sized by the call); learned positions
    may not."""
    src, mask = source()
    kw = dict(max_new_tokens=12, temperature=0, attention_mask=mask)
    assert enhanced(block_size=8).generate(src, **kw).shape == (2, 13)
    with pytest.raises(ValueError, match=r"1 \+ max_new_tokens=12 tokens exceed the context of 8"):
        enhanced(block_size=8, position="learned").generate(src, **kw)


def test_missing_decoder_input_ids():
    m = enhanced()
    with pytest.raises(ValueError, match="needs decoder_input_ids"):
        m(torch.ones(1, 4, dtype=torch.long))


@pytest.mark.parametrize("kw, message", [
    (dict(encoder=dict(n_layr=2)), "encoder section key='n_layr' is not"),
    (dict(encoder=dict(n_layr=2)), "did you mean 'n_layer'"),
    (dict(decoder=dict(norm="rmsnrom")), "decoder stack: norm='rmsnrom'"),
    (dict(decoder=dict(norm="rmsnrom")), "did you mean 'rmsnorm'"),
    (dict(encoder=dict(n_head=5)), "encoder stack: d_model=64 must be divisible by n_head=5"),
    (dict(decoder=dict(n_layer="two")), "decoder stack: config key n_layer='two' must be int"),
    (dict(decoder=dict(d_model=32)), "decoder section key 'd_model' cannot be set per stack"),
    (dict(encoder=dict(architecture="decoder_only")),
     "encoder section key 'architecture' cannot be set per stack"),
    (dict(architecture="decoder_only", decoder=dict(n_layer=2)), "this config is decoder_only"),
])
def test_bad_sections_are_one_line_errors(kw, message):
    base = dict(architecture="encoder_decoder", vocab_size=V, n_layer=2, n_head=4, d_model=64)
    with pytest.raises(ValueError) as e:
        Config.from_dict({**base, **kw})
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_yaml_sections(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("architecture: encoder_decoder\nvocab_size: 32\nn_layer: 2\nn_head: 4\n"
                 "d_model: 64\nencoder:\n  n_layer: 3\n  activation: relu\ndecoder:\n  d_ff: 96\n")
    with torch.device("meta"):
        m = Transformer.from_yaml(p)
    assert len(m.encoder.blocks) == 3 and len(m.decoder.blocks) == 2
    assert m.encoder.config.activation == "relu" and m.decoder.config.activation == "gelu"
    assert m.decoder.blocks[0].ffn.up.out_features == 96
    assert m.encoder.blocks[0].ffn.up.out_features == 256
