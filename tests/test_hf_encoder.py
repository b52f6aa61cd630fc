"""Encoder-only and encoder-decoder import checked against HF transformers itself.

As tests/test_hf_decoder.py does for decoders: each family is built small and random with HF, its
weights re-drawn so that every feature moves the logits (norm weights away from 1, non-zero biases,
attention far from uniform, a non-zero final_logits_bias), saved with save_pretrained and loaded
with Transformer.from_pretrained. fp32 logits must agree to 1e-4 on every unpadded position, and for
the encoder-decoders greedy generation through our cache must give HF's tokens for a padded batch.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import Transformer  # noqa: E402

V = 120                      # vocab
# source and target lengths (past every exact relative bucket), new tokens
SRC, TGT, NEW = 24, 20, 15
PAD = 5                      # row 1 of every batch is padded on the right by this many tokens
TOL = 1e-4
ENC = dict(vocab_size=V, hidden_size=64, num_attention_heads=4, intermediate_size=96,
           max_position_embeddings=64, attn_implementation="eager")
SEQ2SEQ = dict(vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=3,
               encoder_attention_heads=8, decoder_attention_heads=4, encoder_ffn_dim=96,
               decoder_ffn_dim=80, max_position_embeddings=64, attn_implementation="eager")
DEBERTA = dict(ENC, num_hidden_layers=2, relative_attention=True, position_buckets=8,
               pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
               position_biased_input=False, type_vocab_size=0)
T5 = dict(vocab_size=V, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2,
          relative_attention_num_buckets=8, relative_attention_max_distance=16,
          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager")
ALBERT = dict(ENC, embedding_size=32, hidden_act="gelu_new")
BART_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)

# name -> (HF model class, HF config class, config kwargs)
CASES = {
    "bert": ("BertForPreTraining", "BertConfig", dict(ENC, num_hidden_layers=2, type_vocab_size=2)),
    "albert": ("AlbertForPreTraining", "AlbertConfig",  # E < H, one block shared by all 4 layers
               dict(ALBERT, num_hidden_layers=4, num_hidden_groups=1)),
    "albert_2_groups": ("AlbertForPreTraining", "AlbertConfig",  # layers 0-1: group 0, 2-3: 1
                        dict(ALBERT, num_hidden_layers=4, num_hidden_groups=2)),
    "bert_mlm_only": ("BertForMaskedLM", "BertConfig",
                      dict(ENC, num_hidden_layers=2, type_vocab_size=2)),
    "albert_mlm_only": ("AlbertForMaskedLM", "AlbertConfig",  # no pooler, no classifier
                        dict(ALBERT, num_hidden_layers=2)),
    "deberta": ("DebertaV2ForMaskedLM", "DebertaV2Config", DEBERTA),
    "deberta_new_head": ("DebertaV2ForMaskedLM", "DebertaV2Config", dict(DEBERTA, legacy=False)),
    "t5": ("T5ForConditionalGeneration", "T5Config",  # relu FF, tied head, scaled output
           dict(T5, feed_forward_proj="relu", num_decoder_layers=3)),
    "t5_v1_1": ("T5ForConditionalGeneration", "T5Config",  # gated-gelu (tanh), untied, unscaled
                dict(T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "bart": ("BartForConditionalGeneration", "BartConfig",
             dict(SEQ2SEQ, scale_embedding=False, **BART_IDS)),
    "bart_scaled": ("BartForConditionalGeneration", "BartConfig",
                    dict(SEQ2SEQ, scale_embedding=True, activation_function="gelu_new",
                         **BART_IDS)),
    "marian": ("MarianMTModel", "MarianConfig",
               dict(SEQ2SEQ, scale_embedding=True, activation_function="swish", pad_token_id=V - 1,
                    eos_token_id=0, decoder_start_token_id=V - 1)),
}
ENCODERS = ["bert", "bert_mlm_only", "albert", "albert_2_groups", "albert_mlm_only", "deberta",
            "deberta_new_head"]
SEQ2SEQS = ["t5", "t5_v1_1", "bart", "bart_scaled", "marian"]


def redraw(model):
    """Replace HF's init (unit norms, tiny matrices, zero biases) with weights every feature shows
    in: norm weights away from 1, biases and final_logits_bias non-zero, matrices large enough for
    peaked attention (larger ones make these nets chaotic: fp32 rounding then grows past the
    tolerance; T5, which does not scale q.k, gets half-size q and k). The FFN output matrices get
    zero-mean rows: a relu/gelu activation's positive mean would otherwise add one shared direction
    to every token, and a tied head would pick the same token everywhere. T5's decoder output norm
    is drawn large where the head scales the logits by d_model**-0.5. Frozen tables (Marian's
    sinusoids) stay as they are."""
    g = torch.Generator().manual_seed(1)
    randn = lambda p: torch.randn(p.shape, generator=g)  # noqa: E731
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name == "decoder.final_layer_norm.weight" and model.config.scale_decoder_outputs:
                p.copy_(4.0 + 0.2 * randn(p))
            elif p.dim() == 1 and name.endswith("weight"):        # LayerNorm / T5 RMSNorm weights
                p.copy_(1.0 + 0.2 * randn(p))
            elif p.dim() == 1:                                    # biases
                p.copy_(0.1 * randn(p))
            elif "relative_attention_bias" in name:  # T5: (buckets, heads), added to the scores
                p.copy_(randn(p))
            elif name.endswith((".q.weight", ".k.weight")):        # T5
                p.copy_(0.1 * randn(p))
            else:                                                 # matrices and embedding tables
                p.copy_(0.2 * randn(p))
                if name.endswith(("fc2.weight", "wo.weight")):    # BART / Marian, T5
                    p.sub_(p.mean(dim=1, keepdim=True))
        for name, b in model.named_buffers():
            if name == "final_logits_bias":                       # BART / Marian: (1, V)
                b.copy_(0.5 * randn(b))


def make_hf(model_cls, config_cls, kw):
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))
    # T5 v5 ties anyway; a separate lm_head in the file unties it
    if not kw.get("tie_word_embeddings", True):
        hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.clone())
    redraw(hf)
    return hf.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            hf = make_hf(*CASES[name])
            hf.save_pretrained(path)
            built[name] = (hf, Transformer.from_pretrained(path), path)
        return built[name]
    return get


def ids(B, T, seed, low=3):
    """Random tokens above the special ids (pad, bos, eos): padding only where the mask says."""
    return torch.randint(low, V - 1, (B, T), generator=torch.Generator().manual_seed(seed))


def padding_mask(B, T):
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - PAD:] = 0
    return mask


def max_diff(got, ref, mask):
    """Largest |got - ref| over the unpadded positions (mask (B, T), 1 = real token) of (B, T, V)
    logits."""
    return (got - ref).abs()[mask.bool()].max().item()


# ----------------------------------------------------------------------------------------------
# encoder-only: BERT (MLM + NSP), ALBERT (MLM + SOP), DeBERTa-v3 (MLM)


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_logits_match_hf(models, name):
    hf, ours, _ = models(name)
    x, mask = ids(2, SRC, seed=1), padding_mask(2, SRC)
    kw = dict(attention_mask=mask)
    if hf.config.type_vocab_size:
        kw["token_type_ids"] = (torch.arange(SRC) >= SRC // 2).long().expand(2, -1)   # two segments
    with torch.no_grad():
        ref, got = hf(x, **kw), ours(x, **kw)
    ref_logits = ref.prediction_logits if "prediction_logits" in ref else ref.logits
    assert ref_logits[mask.bool()].std() > 0.5, "logits this flat would hide bugs"
    assert max_diff(got.logits, ref_logits, mask) <= TOL
    ref_cls = ref.get("seq_relationship_logits", ref.get("sop_logits"))   # NSP (BERT), SOP (ALBERT)
    if ref_cls is None:
        assert got.cls_logits is None
    else:   # the pooler reads position 0, never padded
        assert ref_cls.std() > 0.1 and (got.cls_logits - ref_cls).abs().max().item() <= TOL


def test_token_types_and_padding_matter(models):
    """The match above means something only if HF's output moves with token types and padding."""
    hf, _, _ = models("bert")
    x, mask = ids(2, SRC, seed=1), padding_mask(2, SRC)
    with torch.no_grad():
        base = hf(x, attention_mask=mask).prediction_logits
        typed = hf(x, attention_mask=mask, token_type_ids=torch.ones_like(x)).prediction_logits
        unmasked = hf(x).prediction_logits
    assert (typed - base).abs().max() > 0.1
    real = slice(0, SRC - PAD)
    assert (unmasked[0] - base[0]).abs().max() < 1e-5
    assert (unmasked[1, real] - base[1, real]).abs().max() > 0.1


@pytest.mark.parametrize("name", CASES)
def test_parameter_count_matches_hf(models, name):
    """Same trainable parameters as HF, tied ones counted once: nothing missing, nothing unused
    (ALBERT: one block per group; T5: one relative bias per stack; Marian's sinusoids are not
    weights)."""
    hf, ours, _ = models(name)
    # final_logits_bias: HF's is a buffer, ours lm_head.bias
    extra = hf.final_logits_bias.numel() if hasattr(hf, "final_logits_bias") else 0
    trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert ours.get_num_params() == trainable + extra


def test_deberta_legacy_pos_att_type(models, tmp_path):
    """Hub configs of the v3 release spell pos_att_type as the string "p2c|c2p"."""
    hf, _, path = models("deberta")
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "pos_att_type": "p2c|c2p"}))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    x, mask = ids(2, SRC, seed=1), padding_mask(2, SRC)
    with torch.no_grad():
        got = Transformer.from_pretrained(tmp_path)(x, attention_mask=mask).logits
        assert max_diff(got, hf(x, attention_mask=mask).logits, mask) <= TOL


def test_deberta_uses_log_buckets():
    """SRC exceeds position_buckets / 2: the log-compressed buckets take part in the check above."""
    from model import deberta_buckets
    rel = torch.arange(-SRC + 1, SRC)
    idx = deberta_buckets(rel, DEBERTA["position_buckets"], DEBERTA["max_position_embeddings"])
    exact = rel.abs() <= DEBERTA["position_buckets"] // 2
    assert torch.equal(idx[exact], rel[exact] + DEBERTA["position_buckets"])
    assert len(set(idx[~exact].tolist())) >= 4 and len(set(idx.tolist())) < len(rel)


# ----------------------------------------------------------------------------------------------
# encoder-decoder: T5, BART, Marian


def seq2seq_batch(seed=2):
    src, mask = ids(2, SRC, seed=seed), padding_mask(2, SRC)
    tgt = ids(2, TGT, seed=seed + 1)
    return src, mask, tgt


def hf_decoder_cache():
    """HF 5.23 sizes its default cache by num_layers, which breaks T5 with num_decoder_layers !=
    num_layers; a DynamicCache built without the config grows to whatever the decoder has."""
    return transformers.EncoderDecoderCache(transformers.DynamicCache(),
                                            transformers.DynamicCache())


@pytest.mark.parametrize("name", SEQ2SEQS)
def test_seq2seq_logits_match_hf(models, name):
    """Teacher-forced logits over a padded source: every target position of both rows matches."""
    hf, ours, _ = models(name)
    src, mask, tgt = seq2seq_batch()
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        got = ours(src, decoder_input_ids=tgt, attention_mask=mask).logits
    assert ref.std() > 0.5, "logits this flat would hide bugs"
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("penalty", [1.0, 1.5])
@pytest.mark.parametrize("name", SEQ2SEQS)
def test_seq2seq_greedy_generation_matches_hf(models, name, penalty):
    """Greedy tokens through our cache (encoder run once, cross K/V cached) equal HF's generate.
    Random tied encoder-decoders often fall into one-token loops under plain greedy decoding, so it
    runs once more with a repetition penalty (CTRL's, the same in both): that output must vary."""
    hf, ours, _ = models(name)
    src, mask, _ = seq2seq_batch(seed=3)
    start = hf.config.decoder_start_token_id
    with torch.no_grad():
        ref = hf.generate(src, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                          do_sample=False, num_beams=1, eos_token_id=None, forced_bos_token_id=None,
                          forced_eos_token_id=None, repetition_penalty=penalty,
                          decoder_start_token_id=start, pad_token_id=hf.config.pad_token_id,
                          past_key_values=hf_decoder_cache())
    got = ours.generate(src, max_new_tokens=NEW, temperature=0, repetition_penalty=penalty,
                        attention_mask=mask)
    assert ref.shape == (2, 1 + NEW) and bool((ref[:, 0] == start).all())
    if penalty > 1:
        assert all(len(set(row[1:].tolist())) >= 8 for row in ref), "HF repeats: a weak check"
    assert torch.equal(got, ref), f"ours {got.tolist()}\nHF   {ref.tolist()}"


@pytest.mark.parametrize("name", SEQ2SEQS)
def test_seq2seq_cached_decoding_matches_full_forward(models, name):
    """Prefill a few target tokens, then one at a time through the cache: every step equals HF's
    logits."""
    hf, ours, _ = models(name)
    src, mask, tgt = seq2seq_batch()
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        memory = ours.encoder.hidden(src, attention_mask=mask)
        cache = ours.setup_cache(2, TGT)
        step = lambda t, pos: ours(None, t, attention_mask=mask, cache=cache, input_pos=pos,  # noqa: E731
                                   memory=memory).logits
        steps = [step(tgt[:, :4], torch.arange(4))]
        steps += [step(tgt[:, t:t + 1], torch.tensor([t])) for t in range(4, TGT)]
    assert (torch.cat(steps, dim=1) - ref).abs().max().item() <= TOL


def test_t5_legacy_config_keys(models, tmp_path):
    """Pre-v5 T5 v1.1 config.json: tie_word_embeddings false and no scale_decoder_outputs, which v5
    derives from it (no output scaling); the file's own lm_head unties the head."""
    hf, _, path = models("t5_v1_1")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["scale_decoder_outputs"]
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    ours = Transformer.from_pretrained(tmp_path)
    src, mask, tgt = seq2seq_batch()
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        got = ours(src, decoder_input_ids=tgt, attention_mask=mask).logits
        assert (got - ref).abs().max().item() <= TOL


def test_marian_sinusoids_are_hfs(models):
    """Marian's table: sines in the first half of the channels, cosines in the second, bitwise."""
    hf, ours, _ = models("marian")
    assert torch.equal(ours.encoder.wpe.sinusoids, hf.model.encoder.embed_positions.weight)
    assert torch.equal(ours.decoder.wpe.sinusoids, hf.model.decoder.embed_positions.weight)


def test_seq2seq_head_tying_follows_the_file(models):
    for name, tied in (("t5", True), ("t5_v1_1", False), ("bart", True), ("marian", True)):
        hf, ours, _ = models(name)
        assert ours.decoder.wte is ours.encoder.wte
        assert (ours.decoder.lm_head.weight is ours.encoder.wte.weight) == tied
        assert torch.equal(ours.decoder.lm_head.weight, hf.lm_head.weight)


# ----------------------------------------------------------------------------------------------
# options the import does not implement are refused in one line naming the option

REFUSED = {  # option -> (base case, HF config change)
    "is_decoder": ("bert", dict(is_decoder=True)),
    "inner_group_num": ("albert", dict(inner_group_num=2)),
    "position_biased_input": ("deberta", dict(position_biased_input=True)),
    "share_att_key": ("deberta", dict(share_att_key=False)),
    "pos_att_type": ("deberta", dict(pos_att_type=["c2p"])),
    "position_buckets": ("deberta", dict(position_buckets=-1)),
    "norm_rel_ebd": ("deberta", dict(norm_rel_ebd="none")),
    "conv_kernel_size": ("deberta", dict(conv_kernel_size=3)),
    "embedding_size": ("deberta", dict(embedding_size=32)),
    "type_vocab_size": ("deberta", dict(type_vocab_size=2)),
    "share_encoder_decoder_embeddings": ("marian", dict(share_encoder_decoder_embeddings=False,
                                                        decoder_vocab_size=V)),
}


@pytest.mark.parametrize("option", REFUSED)
def test_unsupported_option_is_refused(option, tmp_path):
    base, change = REFUSED[option]
    model_cls, config_cls, kw = CASES[base]
    cfg = getattr(transformers, config_cls)(**{**kw, **change})
    getattr(transformers, model_cls)(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(tmp_path)
    msg = str(e.value)
    assert option in msg and "\n" not in msg, msg


def test_deberta_enhanced_mask_decoder_matches_hf_layers(models):
    """DeBERTa's enhanced mask decoder (He et al. 2020, sec. 3.2): the last layer runs emd_steps
    more times over its own input H, the queries starting at H + absolute position embeddings and
    then each pass's output. HF's DebertaV2ForMaskedLM has no EMD (its z_steps path is unused), but
    its layer takes query_states apart from hidden_states for this: the reference is that layer,
    called twice by hand on HF's own H, then HF's MLM head."""
    import dataclasses
    hf, ours, _ = models("deberta")
    emd = Transformer(dataclasses.replace(ours.config, emd_steps=2)).eval()
    missing, unexpected = emd.load_state_dict(ours.state_dict(), strict=False)
    assert missing == ["emd_pos.weight"] and not unexpected
    P = 0.5 * torch.randn(emd.emd_pos.weight.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emd.emd_pos.weight.copy_(P)
    x, mask = ids(2, SRC, seed=1), padding_mask(2, SRC)
    enc = hf.deberta.encoder
    with torch.no_grad():
        H = hf.deberta(x, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        kw = dict(relative_pos=enc.get_rel_pos(H), rel_embeddings=enc.get_rel_embedding())
        q = H + P[:SRC]
        for _ in range(2):
            q = enc.layer[-1](H, enc.get_attention_mask(mask), query_states=q, **kw)[0]
        ref = hf.cls(q)
        got = emd(x, attention_mask=mask).logits
        plain = ours(x, attention_mask=mask).logits
    assert max_diff(got, ref, mask) <= TOL
    assert max_diff(plain, ref, mask) > 0.1                   # not the plain output
    with torch.no_grad():  # the positions matter: without them the decoder is another function
        emd.emd_pos.weight.zero_()
        assert max_diff(emd(x, attention_mask=mask).logits, ref, mask) > 0.1
        # the encoder's output itself (hidden(), what a classifier reads) stays the plain one
        assert (emd.hidden(x, attention_mask=mask) - ours.hidden(x, attention_mask=mask)
                ).abs()[mask.bool()].max() == 0
