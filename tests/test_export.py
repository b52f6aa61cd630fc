"""HF-format export (hf.save_pretrained, train.py --export=hf) checked against transformers itself.

- Round trip per family: every small random HF model the import tests build (tests/test_hf_*.py,
  test_moe.py, test_deltanet.py: their builders, imported) -> Transformer.from_pretrained ->
  save_pretrained -> transformers' Auto class: the same HF class, no missing or unexpected weight,
  fp32 logits within 1e-4 of the original's, and a re-import gives our weights back bit for bit.
- Our own configs that a HF family expresses (a Llama-style tiny.yaml trained from scratch, GPT-2,
  Qwen3-Next, T5, BERT shapes) export through the family the matching picks and load with equal
  logits; the tokenizer.json of a HF tokenizer is written beside them.
- A config that no family expresses (ALiBi, Universal Transformer, Block-Recurrent, the enhanced
  encoder-decoder, expert choice, ...) is a one-line ValueError naming the first field none has.
"""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
import test_hf_decoder as dec  # noqa: E402
import test_hf_encoder as enc  # noqa: E402
import test_moe as moe  # noqa: E402
from test_deltanet import ids_of, qwen3_next  # noqa: E402,F401  (qwen3_next: a fixture)
from test_tokenizers import byte_level  # noqa: E402

from data.tokenizers import from_json  # noqa: E402
from hf import effective, hf_config, save_pretrained  # noqa: E402
from model import Config, Transformer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4
AUTO = {"ForCausalLM": "AutoModelForCausalLM", "LMHeadModel": "AutoModelForCausalLM",
        "ForPreTraining": "AutoModelForPreTraining", "ForMaskedLM": "AutoModelForMaskedLM",
        "ForConditionalGeneration": "AutoModelForSeq2SeqLM", "MTModel": "AutoModelForSeq2SeqLM"}
# case -> its builder's module; every case of every import test, and Qwen3-Next's fixture
CASES = {**{name: dec for name in dec.CASES}, **{name: enc for name in enc.CASES},
         **{name: moe for name in moe.CASES}, "qwen3_next": None}


def auto_class(hf_class: str):
    return getattr(transformers, next(v for k, v in AUTO.items() if hf_class.endswith(k)))


def build_hf(name, built_qwen3_next):
    """The HF model of a case, as its own test module builds it (Qwen3-Next: its fixture's)."""
    module = CASES[name]
    if module is None:
        return built_qwen3_next[0]
    if module is moe:  # test_moe builds inside its fixture: its classes, config and redraw
        model_cls, config_cls, kw = moe.CASES[name]
        torch.manual_seed(0)
        hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))
        moe.redraw(hf)
        return hf.eval()
    return module.make_hf(*module.CASES[name])


def inputs(name, hf):
    """A batch for the case's kind: decoder ids; encoder ids with padding (and two token types);
    seq2seq a padded source and a target."""
    module = CASES[name]
    if module is enc:
        x, mask = enc.ids(2, enc.SRC, seed=1), enc.padding_mask(2, enc.SRC)
        if name in enc.SEQ2SEQS:
            return dict(input_ids=x, attention_mask=mask, decoder_input_ids=enc.ids(2, enc.TGT, 2))
        kw = dict(input_ids=x, attention_mask=mask)
        if hf.config.type_vocab_size:
            kw["token_type_ids"] = (torch.arange(enc.SRC) >= enc.SRC // 2).long().expand(2, -1)
        return kw
    x = ids_of(2, 40, seed=3) if module is None else module.ids(2, 20, seed=2)
    return dict(input_ids=x)


def outputs(model, kw):
    """(token logits, sentence logits or None) of a HF model; padded source rows left out."""
    with torch.no_grad():
        out = model(**kw)
    logits = out.prediction_logits if "prediction_logits" in out else out.logits
    if "decoder_input_ids" not in kw and "attention_mask" in kw:
        logits = logits[kw["attention_mask"].bool()]
    return logits, out.get("seq_relationship_logits", out.get("sop_logits"))


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory, qwen3_next):  # noqa: F811  (the imported fixture)
    done = {}

    def get(name):
        if name not in done:
            hf = build_hf(name, qwen3_next)
            src, out = tmp_path_factory.mktemp(f"{name}_hf"), tmp_path_factory.mktemp(name)
            hf.save_pretrained(src)
            ours = Transformer.from_pretrained(src)
            save_pretrained(ours, out)
            config = json.loads((out / "config.json").read_text())
            back, info = auto_class(config["architectures"][0]).from_pretrained(
                out, attn_implementation="eager", output_loading_info=True)
            done[name] = hf, ours, back.eval(), info, out
        return done[name]
    return get


@pytest.mark.parametrize("name", CASES)
def test_round_trip_loads_in_transformers_with_equal_logits(round_trips, name):
    hf, _, back, info, _ = round_trips(name)
    assert type(back) is type(hf)
    assert not any(info.values()), info    # missing, unexpected, mismatched weights
    kw = inputs(name, hf)
    (want, want_cls), (got, got_cls) = outputs(hf, kw), outputs(back, kw)
    assert want.std() > 0.3, "logits this flat would hide bugs"
    assert (got - want).abs().max().item() <= TOL
    assert (want_cls is None) == (got_cls is None)
    if want_cls is not None:      # BERT's NSP, ALBERT's SOP
        assert (got_cls - want_cls).abs().max().item() <= TOL


@pytest.mark.parametrize("name", CASES)
def test_round_trip_reimports_the_same_model(round_trips, name):
    """The exported directory imports to our config (every field that takes effect) and to the
    same weights, bit for bit: the export loses nothing."""
    hf, ours, _, _, out = round_trips(name)
    again = Transformer.from_pretrained(out)
    assert effective(again.config) == effective(ours.config)
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text())["model_type"] == hf.config.model_type


# ----------------------------------------------------------------------------------------------
# our own configs: the family is found by matching


def shrunk(path, **kw):
    return Config.from_yaml(ROOT / "configs" / path, vocab_size=128, block_size=64, **kw)


SMALL = dict(n_layer=2, n_head=4, d_model=64)
SCRATCH = {  # config -> (our Config, the HF family it must export as)
    "tiny.yaml": (lambda: Config.from_yaml(ROOT / "configs" / "tiny.yaml", vocab_size=400),
                  "llama"),
    "shakespeare_char.yaml": (lambda: shrunk("shakespeare_char.yaml"), "llama"),
    "gpt2_small.yaml": (lambda: shrunk("gpt2_small.yaml", **SMALL), "gpt2"),
    "qwen3_mini.yaml": (lambda: shrunk("qwen3_mini.yaml", n_layer=4, d_model=64, n_head=4,
                                       head_dim=16, dn_heads=2, dn_v_heads=4, dn_head_dim=8,
                                       dn_v_head_dim=8, n_expert=4, moe_d_ff=32,
                                       moe_shared_d_ff=32), "qwen3_next"),
    "t5_small.yaml": (lambda: shrunk("t5_small.yaml", **SMALL, head_dim=16, d_ff=96,
                                     head_input_scale=64 ** -0.5), "t5"),
    "bert_base.yaml": (lambda: shrunk("bert_base.yaml", **SMALL, d_ff=96), "bert"),
}


def perturbed(model, seed=0):
    """Our init (unit norms, zero biases, std 0.02) moved so that every weight shows in the
    logits; Gated DeltaNet's decay parameters keep their init, and final norms are made large
    (T5 scales the head's input by d_model**-0.5: the logits would be flat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.1 if p.dim() == 1 else 0.7 * p.shape[-1] ** -0.5   # logits of a few units
            if not name.endswith(("A_log", "dt_bias")):
                p.add_(std * torch.randn(p.shape, generator=g))
            if name.endswith("norm_f.weight"):
                p.mul_(4.0)
    return model.eval()


@pytest.mark.parametrize("name", SCRATCH)
def test_our_config_exports_as_its_family(name, tmp_path):
    make, family = SCRATCH[name]
    cfg = make()
    assert hf_config(cfg)[0] == family
    torch.manual_seed(0)
    ours = perturbed(Transformer(cfg))
    tok = from_json(byte_level("llama3").to_str())
    save_pretrained(ours, tmp_path, tokenizer=tok)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family
    assert (tmp_path / "tokenizer.json").read_text() == tok.meta["json"]
    back, info = auto_class(config["architectures"][0]).from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    kw = dict(decoder_input_ids=x[:, :12]) if cfg.architecture == "encoder_decoder" else {}
    with torch.no_grad():
        want = ours(x, **kw)
        got = back.eval()(input_ids=x, **kw)
    logits = got.prediction_logits if "prediction_logits" in got else got.logits
    assert want.logits.std() > 0.3, "logits this flat would hide bugs"
    assert (logits - want.logits).abs().max().item() <= TOL
    if cfg.cls_head:
        assert (got.seq_relationship_logits - want.cls_logits).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------
# refusals: one line, naming the field no family has

LLAMA = dict(vocab_size=128, n_layer=2, n_head=4, d_model=64, norm="rmsnorm", position="rope",
             ffn="glu", activation="silu", bias=False)
REFUSED = {  # what -> (our Config, the field the message names)
    "alibi": (lambda: Config(**{**LLAMA, "position": "alibi"}), "position='alibi'"),
    "universal_transformer": (lambda: Config(**LLAMA, layer_groups=1,
                                             depth_embedding="sinusoidal"),
                              "depth_embedding='sinusoidal'"),
    "act": (lambda: Config(**LLAMA, layer_groups=1, act=True), "act=True"),
    "block_recurrent": (lambda: Config(**LLAMA, block_width=8, recurrent_layers=(0,),
                                       n_states=4), "block_width=8"),
    "brt_enwik8.yaml": (lambda: Config.from_yaml(ROOT / "configs" / "brt_enwik8.yaml"),
                        "position='dynamic_bias'"),
    "enhanced_small.yaml": (lambda: Config.from_yaml(ROOT / "configs" / "enhanced_small.yaml"),
                            "encoder.position='rope'"),
    "expert_choice": (lambda: Config(**LLAMA, ffn_pattern=("moe",), moe_router="expert_choice"),
                      "moe_router='expert_choice'"),
    "layernorm_without_bias": (lambda: shrunk("bert_base.yaml", norm_bias=False),
                               "norm_bias=False"),
    # every field is in some family, the combination in none: the nearest family's difference
    "shared_blocks_in_a_decoder": (lambda: Config(vocab_size=128, n_layer=4, n_head=4,
                                                  d_model=64, layer_groups=2),
                                   "the nearest, gpt2, differs in layer_groups"),
}


@pytest.mark.parametrize("what", REFUSED)
def test_config_no_family_expresses_is_refused(what, tmp_path):
    make, field = REFUSED[what]
    with torch.device("meta"):  # the refusal comes before any weight is read
        model = Transformer(make())
    with pytest.raises(ValueError) as e:
        save_pretrained(model, tmp_path / "hf")
    msg = str(e.value)
    assert msg.startswith("no HF family expresses this config") and field in msg, msg
    assert "\n" not in msg
    assert not (tmp_path / "hf").exists()


def test_bad_directory_or_tokenizer_is_refused(tmp_path):
    model = Transformer(Config(**LLAMA))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="holds other weight files .*model-00001-of-00002"):
        save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="of kind 'byte' was not made from a HF tokenizer.json"):
        save_pretrained(model, tmp_path / "new", tokenizer=type("T", (), {"meta": {"kind":
                                                                                   "byte"}})())
    assert not (tmp_path / "new").exists()
