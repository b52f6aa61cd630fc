"""Decoder-only import checked against HF transformers itself (the independent reference).

Each family is built small and random with HF, its weights re-drawn so that every feature moves
the logits (non-uniform attention, norm weights away from their init, random biases), saved with
save_pretrained and loaded with Transformer.from_pretrained. fp32 logits must agree to 1e-4 and
greedy decoding through our KV cache (ring buffers on sliding-window layers) must give HF's tokens.
"""
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from model import Transformer  # noqa: E402

V = 160                      # vocab
WINDOW = 6                   # sliding window: prompt + new tokens run well past it
PROMPT, NEW = 8, 20
TOL = 1e-4
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             rms_norm_eps=1e-6, max_position_embeddings=128, attn_implementation="eager")
GEMMA = dict(SMALL, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
             sliding_window=WINDOW)
# a short original context: the llama3 band edges matter
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# YaRN: a 512-token original context puts the ramp inside the head (channels 1..6 of 12 at head_dim
# 24); the attention factor comes from the factor (0.1 ln 4 + 1), or is given
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 512}
YARN_GIVEN = {**YARN, "factor": 8.0, "attention_factor": 0.8, "beta_fast": 16.0, "beta_slow": 2.0}
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}}
LAYERS = dict(num_hidden_layers=2, num_key_value_heads=2)

# name -> (HF model class, HF config class, config kwargs)
CASES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(vocab_size=V, n_embd=64, n_layer=3, n_head=4, n_inner=96, n_positions=64,
                  layer_norm_epsilon=1e-4, bos_token_id=0, eos_token_id=0,
                  attn_implementation="eager")),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(SMALL, **LAYERS, tie_word_embeddings=False)),
    "llama_llama3_tied": ("LlamaForCausalLM", "LlamaConfig",
                          dict(SMALL, num_hidden_layers=2, num_key_value_heads=1,
                               tie_word_embeddings=True, rope_parameters=LLAMA3)),
    "mistral": ("MistralForCausalLM", "MistralConfig",
                dict(SMALL, **LAYERS, head_dim=24, sliding_window=WINDOW,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    "llama_yarn": ("LlamaForCausalLM", "LlamaConfig",
                   dict(SMALL, **LAYERS, head_dim=24, tie_word_embeddings=False,
                        rope_parameters=YARN)),
    "qwen3_yarn": ("Qwen3ForCausalLM", "Qwen3Config",
                   dict(SMALL, **LAYERS, head_dim=24, tie_word_embeddings=False,
                        rope_parameters=YARN_GIVEN)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config",
              dict(SMALL, **LAYERS, head_dim=24, tie_word_embeddings=True)),
    "qwen3_sliding": ("Qwen3ForCausalLM", "Qwen3Config",  # layer 0 full, layer 1 sliding; untied
                      dict(SMALL, **LAYERS, head_dim=24, use_sliding_window=True,
                           sliding_window=WINDOW, max_window_layers=1)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config",  # layer_types default: local, global, local
               dict(GEMMA, num_hidden_layers=3, attn_logit_softcapping=5.0,
                    final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",  # default 5:1 pattern: layer 5 is global
               dict(GEMMA, num_hidden_layers=6)),
    "gemma3_linear": ("Gemma3ForCausalLM", "Gemma3TextConfig",
                      dict(GEMMA, num_hidden_layers=3, final_logit_softcapping=3.0,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           rope_parameters=GEMMA3_ROPE)),
}
TIED = {"gpt2", "llama_llama3_tied", "qwen3", "gemma2", "gemma3", "gemma3_linear"}


def redraw(model, zero_centred_norms):
    """Replace HF's init (unit norms, tiny matrices, zero biases) with weights every feature shows
    in. The embedding / output matrix is drawn small and the final norm large (about x4): a large
    tied embedding makes every token predict itself, and greedy decoding would just repeat the
    prompt's end."""
    g = torch.Generator().manual_seed(1)
    randn = lambda p: torch.randn(p.shape, generator=g)  # noqa: E731
    offset = 0.0 if zero_centred_norms else 1.0  # Gemma's (1 + w) norms are centred on 0
    vocab = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in vocab:
                p.copy_(0.03 * randn(p))
            elif name in ("model.norm.weight", "transformer.ln_f.weight"):
                p.copy_(offset + 3.0 + 0.1 * randn(p))
            elif p.dim() == 1 and name.endswith("weight") and ("norm" in name or "ln_" in name):
                p.copy_(offset + 0.1 * randn(p))
            elif p.dim() == 1:                                      # biases
                p.copy_(0.1 * randn(p))
            else:  # matrices: attention far from uniform
                p.copy_(0.15 * randn(p))


def make_hf(model_cls, config_cls, kw):
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))
    redraw(hf, zero_centred_norms=model_cls.startswith("Gemma"))
    return hf.eval()


def build(name, path):
    hf = make_hf(*CASES[name])
    hf.generation_config.eos_token_id = None                     # never stop early
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(path)
    ours = Transformer.from_pretrained(path)
    ours.eval()
    return hf, ours


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            built[name] = (*build(name, path), path)
        return built[name]
    return get


def ids(B, T, seed):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(ours, hf, T=20, seed=8):
    x = ids(2, T, seed)
    with torch.no_grad():
        return (ours(x).logits - hf(x).logits).abs().max().item()


@pytest.mark.parametrize("name", CASES)
def test_logits_match_hf(models, name):
    hf, ours, _ = models(name)
    x = ids(2, 20, seed=2)
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x).logits
    assert ref.std() > 0.3, "logits this flat would hide bugs"
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_matches_hf(models, name):
    hf, ours, _ = models(name)
    x = ids(2, PROMPT, seed=3)
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    got = ours.generate(x, max_new_tokens=NEW, temperature=0)
    assert ref.shape == (2, PROMPT + NEW)
    assert all(len(set(row[PROMPT:].tolist())) >= 4 for row in ref), "HF repeats: a weak check"
    assert torch.equal(got, ref), f"ours {got.tolist()}\nHF   {ref.tolist()}"


@pytest.mark.parametrize("name", CASES)
def test_cached_decoding_logits_match_hf(models, name):
    """Prefill, then one token at a time through the cache: every step's logits equal HF's full
    forward."""
    hf, ours, _ = models(name)
    x = ids(2, PROMPT + NEW, seed=4)
    with torch.no_grad():
        ref = hf(x).logits
        cache = ours.setup_cache(2, x.shape[1])
        steps = [ours(x[:, :PROMPT], cache=cache, input_pos=torch.arange(PROMPT)).logits]
        for t in range(PROMPT, x.shape[1]):
            steps.append(ours(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])).logits)
    assert (torch.cat(steps, dim=1) - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", CASES)
def test_head_tying_follows_the_file(models, name):
    """Tied families leave lm_head.weight out of the file and we tie it; an untied head is loaded
    as is."""
    hf, ours, path = models(name)
    keys = load_file(str(path / "model.safetensors")).keys()
    head = ours.lm_head.weight
    if name in TIED:
        assert not any(k.endswith("lm_head.weight") for k in keys)
        assert head is ours.wte.weight
    else:
        assert "lm_head.weight" in keys
        assert head is not ours.wte.weight
        assert torch.equal(head, hf.lm_head.weight)
        assert not torch.equal(head, hf.get_input_embeddings().weight)


def test_head_stored_equal_to_embedding_is_tied(models, tmp_path):
    """Some hub files store the tied head too: equal to the embedding, it stays tied."""
    hf, _, path = models("qwen3")
    sd = load_file(str(path / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.wte.weight
    assert max_logit_diff(ours, hf) <= TOL


def test_different_head_wins_over_tie_flag(models, tmp_path):
    """config says tie_word_embeddings, but the file holds another lm_head.weight: HF keeps both."""
    _, _, path = models("llama")
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.lm_head.weight is not ours.wte.weight
    assert max_logit_diff(ours, hf) <= TOL


def test_legacy_rope_config_keys(models, tmp_path):
    """Pre-v5 config.json: rope_theta and rope_scaling at the top level, no rope_parameters."""
    _, _, path = models("llama_llama3_tied")
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    ours = Transformer.from_pretrained(tmp_path)
    assert max_logit_diff(ours, hf) <= TOL


# HF options off the common path: from_pretrained must honour them, or refuse them naming the option
OPTIONS = {
    "attention_bias": ("llama", dict(attention_bias=True)),
    "mlp_bias": ("llama", dict(mlp_bias=True)),
    "scale_attn_by_inverse_layer_idx": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
    "scale_attn_weights": ("gpt2", dict(scale_attn_weights=False)),
    "use_bidirectional_attention": ("gemma3", dict(use_bidirectional_attention=True)),
    "truncate": ("llama_yarn", dict(rope_parameters={**YARN, "truncate": False})),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_option_is_honoured_or_refused(option, tmp_path):
    base, kw = OPTIONS[option]
    model_cls, config_cls, base_kw = CASES[base]
    hf = make_hf(model_cls, config_cls, {**base_kw, **kw})
    hf.save_pretrained(tmp_path)
    try:
        ours = Transformer.from_pretrained(tmp_path)
    except ValueError as e:
        assert option in str(e), f"refused without naming {option}: {e}"
        return
    diff = max_logit_diff(ours, hf)
    assert diff <= TOL, f"{option}={kw[option]} neither refused nor honoured: diff {diff:.3g}"


def test_dynamic_ntk_rope_full_forward(tmp_path):
    """Dynamic NTK RoPE raises the base once a call outgrows max_position_embeddings (16 here)."""
    kw = dict(SMALL, num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=16,
              rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})
    make_hf("LlamaForCausalLM", "LlamaConfig", kw).save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    # HF's rotary is stateful: loaded fresh, it grows, then resets under the limit
    for T in (24, 12):
        assert max_logit_diff(ours, hf, T) <= TOL


def test_yarn_attention_factor_from_mscale(tmp_path):
    """DeepSeek-style YaRN: no attention_factor, but mscale and mscale_all_dim, whose two
    0.1 * m * ln(factor) + 1 give the factor as their ratio."""
    rope = {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}
    hf = make_hf("LlamaForCausalLM", "LlamaConfig", dict(SMALL, **LAYERS, head_dim=24,
                                                         rope_parameters=rope))
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    want = (0.1 * math.log(4.0) + 1) / (0.05 * math.log(4.0) + 1)
    assert ours.config.rope_scaling == "yarn"
    assert ours.config.rope_attn_factor == pytest.approx(want, rel=1e-12)
    assert max_logit_diff(ours, hf) <= TOL


def test_unsupported_family_is_named(tmp_path):
    cfg = transformers.BloomConfig(vocab_size=V, hidden_size=16, n_layer=1, n_head=2)
    transformers.BloomForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "bloom" in msg and "\n" not in msg
    for family in ("gpt2", "llama", "mistral", "qwen3", "gemma2", "gemma3_text"):
        assert family in msg
