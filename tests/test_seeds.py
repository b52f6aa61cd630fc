"""The five seed documents this project grew from, example by example: each example runs as the
README's "Coming from ..." table says, or stops in one line naming our equivalent. Also the issue's
feature rows that belong to no one family file: the bigram baseline (n_layer 0) against counted
bigrams, generation past a learned position table against nanoGPT's cropping loop, mixed precision
in train.py and generate.py, and DeBERTa's enhanced mask decoder on a small MLM run.

  000 Universal Transformers   configs/ut_base.yaml, ut_act.yaml; its key names -> ours
  001 Enhanced Transformer     its train.py / inference.py command lines -> ours
  002 Modern Transformer       its Custom Config YAML verbatim; python model.py on its configs
  003 Transformers collection  configs/transformer_base.yaml, gpt_char.yaml, bigram.yaml
  004 Block-Recurrent          configs/brt_base.yaml; its (out, mems, states) calls as our cache
"""
import dataclasses
import math
import runpy
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import generate
import train
from model import Config, MoE, Transformer, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def params(name, **overrides):
    with torch.device("meta"):
        return Transformer.from_yaml(CONFIGS / f"{name}.yaml", **overrides).get_num_params()


def one_line_error(fn, *args):
    with pytest.raises(ValueError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """~20 KB of words from a small list: a char model learns its spellings within tens of steps."""
    g = torch.Generator().manual_seed(0)
    words = "the king and queen walked to a castle where knight kept his sword".split()
    ids = torch.randint(len(words), (4000,), generator=g).tolist()
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(words[i] for i in ids) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# 002 Modern Transformer: its Custom Config, verbatim

SEED_002_YAML = '''\
architecture: "decoder_only"   # "encoder_only" | "encoder_decoder"
vocab_size: 32000
weight_tying: true

decoder:
  d_model: 1024
  n_layers: 16
  n_heads: 8
  n_kv_heads: 2          # GQA: fewer KV heads = smaller cache
  d_ff: 4096

  # Attention: "softmax" | "linear" | "hybrid"
  attention_type: "hybrid"
  hybrid_ratio: 3        # 3 DeltaNet layers per 1 softmax layer

  # MoE: "token_choice" | "expert_choice"
  moe_routing: "token_choice"
  num_experts: 8
  top_k: 2
  num_shared_experts: 1
'''


@pytest.fixture
def seed_yaml(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text(SEED_002_YAML)
    return path


def test_modern_custom_config_builds_what_it_describes(seed_yaml):
    """Its keys are translated once (weight_tying, n_layers, n_heads, n_kv_heads, moe_routing,
    num_experts, top_k, num_shared_experts; the decoder: section of a decoder_only model lifted to
    the top; num_experts giving MoE layers), under the seed's block: pre-norm RMSNorm, RoPE, SwiGLU,
    no biases. train.py reads the same file into the same config."""
    cfg = Config.from_yaml(seed_yaml)
    assert cfg == Config(architecture="decoder_only", vocab_size=32000, tie_embeddings=True,
                         d_model=1024, n_layer=16, n_head=8, n_kv_head=2, d_ff=4096,
                         attention_type="hybrid", hybrid_ratio=3, ffn_pattern=("moe",),
                         moe_router="token_choice", n_expert=8, moe_top_k=2, moe_n_shared=1,
                         norm="rmsnorm", position="rope", ffn="glu", activation="silu",
                         bias=False)
    _, model_keys, _ = train.parse_config([str(seed_yaml)])
    assert Config.from_dict(model_keys) == cfg
    with torch.device("meta"):
        m = Transformer(cfg)
    assert m.layer_types == [("deltanet", "moe")] * 3 + [("attn", "moe")] + \
        [("deltanet", "moe")] * 3 + [("attn", "moe")] + [("deltanet", "moe")] * 3 + \
        [("attn", "moe")] + [("deltanet", "moe")] * 3 + [("attn", "moe")]
    moe = m.blocks[0].ffn
    assert isinstance(moe, MoE) and m.lm_head.weight is m.wte.weight
    # 8 routed SwiGLU experts and 1 ungated shared one, each 3 x 1024 x 4096, and the router
    assert sum(p.numel() for p in moe.parameters()) == 9 * 3 * 1024 * 4096 + 1024 * 8
    assert not hasattr(moe, "shared_gate")
    attn = m.blocks[3].mixer
    assert attn.nh == 8 and attn.nkv == 2 and attn.hs == 128


@pytest.mark.parametrize("name", ["custom", "gemma3_1b", "bert_1_7b", "llama3_2b", "qwen3_mini"])
def test_modern_config_runs_in_model_py(name, seed_yaml, monkeypatch, capsys):
    """`python model.py configs/X.yaml` (what its __main__ runs) for the seed's four configs and its
    custom one, counted on the meta device."""
    path = seed_yaml if name == "custom" else CONFIGS / f"{name}.yaml"
    monkeypatch.setattr(sys, "argv", ["model.py", str(path), "--meta"])
    runpy.run_path(str(ROOT / "model.py"), run_name="__main__")
    want = {"custom": "1871.22M", "gemma3_1b": "1301.88M", "bert_1_7b": "1718.12M",
            "llama3_2b": "1999.24M", "qwen3_mini": "116.38M"}[name]
    assert capsys.readouterr().out.startswith(f"{Config.from_yaml(path).architecture}: {want} "
                                              f"parameters")


def test_modern_logits_and_aux_loss():
    """The seed's `logits, aux_loss = model(input_ids)` is `out.logits, out.aux_loss` here: the
    output is a NamedTuple (logits, loss, aux_loss, cls_logits), aux_loss the MoE balance loss."""
    cfg = Config.from_dict(dict(vocab_size=64, weight_tying=True, n_layers=2, n_heads=2,
                                n_kv_heads=1, d_model=32, d_ff=48, num_experts=4, top_k=2,
                                num_shared_experts=2, block_size=16))
    out = Transformer(cfg)(torch.randint(0, 64, (1, 16)))
    logits, aux_loss = out.logits, out.aux_loss
    assert logits.shape == (1, 16, 64) and out.loss is None
    assert aux_loss.item() >= 2 * cfg.moe_aux_weight * 0.999   # E * sum f P >= 1 per layer
    assert out._fields == ("logits", "loss", "aux_loss", "cls_logits")


# ----------------------------------------------------------------------------------------------
# 000 Universal Transformers


def test_universal_decoder_configs():
    """UniversalDecoder(vocab_size=30000, d_model=512, num_heads=8, num_kv_heads=2, d_ff=2048,
    max_seq_len=1024, depth=6, dropout=0.1): one shared block run 6 times; ACT on top."""
    with torch.device("meta"):
        ut = Transformer.from_yaml(CONFIGS / "ut_base.yaml")
    c = ut.config
    assert (c.vocab_size, c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.block_size, c.n_layer,
            c.dropout) == (30000, 512, 8, 2, 2048, 1024, 6, 0.1)
    assert len(ut.blocks) == 1 and ut.block_of == [0] * 6 and c.depth_embedding == "sinusoidal"
    assert ut.get_num_params() == 18_114_048
    act = Config.from_yaml(CONFIGS / "ut_act.yaml")
    assert act.act and dataclasses.replace(act, act=False) == c
    assert params("ut_act") == 18_114_048 + 513                       # the halting unit


@pytest.mark.parametrize("key, ours", [
    ("num_heads", "n_head"), ("num_kv_heads", "n_kv_head"), ("max_seq_len", "block_size"),
    ("depth", "n_layer"),                                             # 000's UniversalDecoder
    ("num_tokens", "vocab_size"), ("dim", "d_model"), ("dim_head", "head_dim"),
    ("heads", "n_head"), ("num_state_vectors", "n_states"),            # 004's constructor
])
def test_foreign_keys_name_ours(key, ours):
    """Other projects' key names are refused (their meaning differs where it matters) with ours as
    the did-you-mean: num_heads -> n_head, not the nearest spelling (dn_heads)."""
    msg = one_line_error(Config.from_dict, {key: 8})
    assert f"did you mean {ours!r}" in msg and "dn_heads" not in msg
    msg = one_line_error(train.parse_config, [f"--{key}=8"])
    assert f"--{key}: use --{ours}" in msg


# ----------------------------------------------------------------------------------------------
# 001 Enhanced Transformer: its command lines


def test_enhanced_train_command_names_our_flags():
    """python train.py --data data/sample.txt --model_size small --batch_size 4 --epochs 10
    --device cuda --mixed_precision: first the '=' form, then each foreign flag with ours."""
    seed = ["--data", "data/sample.txt", "--model_size", "small", "--batch_size", "4",
            "--epochs", "10", "--device", "cuda", "--mixed_precision"]
    msg = one_line_error(train.parse_config, seed)
    assert msg.endswith("; write --data=data/sample.txt --model_size=small --batch_size=4 "
                        "--epochs=10 --device=cuda")
    msg = one_line_error(train.parse_config, ["--data=data/sample.txt", "--model_size=small",
                                              "--batch_size=4", "--epochs=10", "--device=cuda",
                                              "--mixed_precision"])
    assert msg.startswith("unknown config keys: --model_size: use a config file as the first "
                          "argument: configs/enhanced_small.yaml")
    assert "--epochs: use --max_iters" in msg and "--mixed_precision: use --dtype=bf16" in msg
    tc, keys, _ = train.parse_config([str(CONFIGS / "enhanced_small.yaml"), "--data=x.txt",
                                      "--batch_size=4", "--max_iters=10", "--dtype=bf16"])
    assert (tc.batch_size, tc.max_iters, tc.dtype, keys["d_model"]) == (4, 10, "bf16", 768)


def test_inference_max_length_names_max_new_tokens(capsys):
    rc = generate.main(["--checkpoint", "checkpoints/best_model.pt", "--prompt",
                        "The transformer architecture is", "--temperature", "0.7",
                        "--max_length", "100"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "unrecognized arguments: --max_length 100; --max_length is --max_new_tokens" in err


TINY = ["--n_layer=1", "--n_head=2", "--d_model=32", "--block_size=16", "--batch_size=4",
        "--norm=rmsnorm", "--position=rope", "--ffn=glu", "--activation=silu", "--bias=false",
        "--eval_iters=4", "--log_interval=10", "--sample_tokens=8", "--warmup_iters=5",
        "--lr=1e-2", "--min_lr=1e-3", "--max_iters=40", "--eval_interval=20"]


def run_train(out_dir, text, *args):
    return train.main([f"--data={text}", f"--out_dir={out_dir}", *TINY, *args])


@pytest.fixture(scope="module")
def dtype_runs(tmp_path_factory, text):
    """The same 40 steps in fp32, bf16 and fp16 (autocast on the CPU; fp16 with a GradScaler)."""
    runs = {}
    for dtype in ("fp32", "bf16", "fp16"):
        out = tmp_path_factory.mktemp(dtype)
        runs[dtype] = (run_train(out, text, f"--dtype={dtype}"), load_checkpoint(out / "ckpt.pt"))
    return runs


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_training_on_cpu(dtype_runs, dtype, capsys):
    """train.py --dtype=bf16/fp16: the weights stay fp32 (autocast computes in half precision),
    the loss falls as in fp32 without being fp32's, and fp16 carries its loss scale."""
    ref, _ = dtype_runs["fp32"]
    result, ckpt = dtype_runs[dtype]
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    assert ckpt["train_config"]["dtype"] == dtype
    assert result["val_loss"] < 2.0 and abs(result["val_loss"] - ref["val_loss"]) < 0.05
    assert result["val_loss"] != ref["val_loss"]
    scale = ckpt["scaler"].get("scale")
    assert (scale is not None and scale > 1) if dtype == "fp16" else not ckpt["scaler"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_generate_in_half_precision(dtype_runs, dtype, tmp_path, capsys):
    """generate.py --dtype: the text is what the model cast to that dtype produces (greedy), which
    here is also what fp32 produces for the first tokens."""
    _, ckpt = dtype_runs["fp32"]
    path = tmp_path / "ckpt.pt"
    path.write_bytes((Path(ckpt["train_config"]["out_dir"]) / "ckpt.pt").read_bytes())
    rc = generate.main(["--checkpoint", str(path), "--prompt", "the ", "--temperature", "0",
                        "--max_new_tokens", "24", "--dtype", dtype])
    out = capsys.readouterr().out
    from data.tokenizers import get_tokenizer
    tok = get_tokenizer(ckpt["tokenizer"])
    model = Transformer.from_checkpoint(ckpt).eval()
    prompt = torch.tensor([tok.encode("the ")])
    half = model.to(generate.DTYPES[dtype]).generate(prompt, 24, temperature=0)
    full = model.float().generate(prompt, 24, temperature=0)
    assert rc == 0 and out == tok.decode(half[0].tolist()) + "\n"
    assert torch.equal(half[0, :12], full[0, :12])


# ----------------------------------------------------------------------------------------------
# 003 Transformers collection: the original Transformer, the educational GPT and its bigram


def test_collection_configs():
    """Parameter counts, and what each config says it is."""
    assert params("transformer_base") == 63_082_496
    assert params("gpt_char", vocab_size=65) == 10_700_609
    assert params("bigram", vocab_size=65) == 65 * 128 + 128 * 65 + 65
    base = Config.from_yaml(CONFIGS / "transformer_base.yaml")
    assert (base.architecture, base.norm_placement, base.position, base.activation,
            base.embed_scale) == ("encoder_decoder", "post", "sinusoidal", "relu", 512 ** 0.5)
    gpt = Config.from_yaml(CONFIGS / "gpt_char.yaml")
    assert (gpt.block_size, gpt.d_model, gpt.n_head, gpt.n_layer, gpt.activation, gpt.dropout,
            gpt.position, gpt.norm_placement) == (8, 384, 6, 6, "relu", 0.2, "learned", "pre")


def bigram_model(vocab):
    return Transformer(Config.from_yaml(CONFIGS / "bigram.yaml", vocab_size=vocab))


def test_bigram_is_a_function_of_the_current_token():
    m = bigram_model(20).eval()
    assert len(m.blocks) == 0 and m.setup_cache(1, 8) == []
    x = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = m(x).logits
        alone = torch.cat([m(x[:, t:t + 1]).logits for t in range(8)], 1)
        assert (whole - alone).abs().max() < 1e-6
        assert (whole[0, 0] - m.lm_head(m.wte(x[0, 0]))).abs().max() < 1e-6
        assert m.generate(x[:, :2], 10, temperature=0).shape == (3, 12)


def test_bigram_learns_the_counted_bigrams(text):
    """Trained on every (token, next) pair of a text, its loss reaches the cross-entropy of the
    counted bigram model on that text, H(next | token), the lowest any bigram model can reach."""
    data = text.read_text()
    chars = sorted(set(data))
    ids = torch.tensor([chars.index(c) for c in data])
    pairs = Counter(zip(ids[:-1].tolist(), ids[1:].tolist()))
    firsts = Counter(ids[:-1].tolist())
    entropy = -sum(n * math.log(n / firsts[a]) for (a, _), n in pairs.items()) / (len(ids) - 1)
    torch.manual_seed(0)
    m = bigram_model(len(chars))
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(300):
        loss = m(ids[None, :-1], targets=ids[None, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert entropy < 1.5 and abs(loss.item() - entropy) < 0.01, (loss.item(), entropy)


def test_bigram_trains_in_train_py(tmp_path, text):
    result = train.main([str(CONFIGS / "bigram.yaml"), f"--data={text}", f"--out_dir={tmp_path}",
                         "--max_iters=60", "--eval_interval=30", "--eval_iters=4",
                         "--sample_tokens=20"])
    assert result["model"].config.n_layer == 0 and result["val_loss"] < 2.0
    assert len(result["sample"]) > 8                       # past the 8-token context


def nanogpt_generate(model, idx, n, block_size, generator=None):
    """The educational GPT's loop: crop to the last block_size tokens, full forward, then argmax,
    or sample from the softmax."""
    for _ in range(n):
        logits = model(idx[:, -block_size:]).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True) if generator is None else torch.multinomial(
            logits.softmax(-1), 1, generator=generator)
        idx = torch.cat((idx, nxt), 1)
    return idx


@pytest.mark.parametrize("overrides", [dict(), dict(layer_groups=1, depth_embedding="sinusoidal",
                                                    position="none")])
def test_generation_crops_past_a_learned_position_table(overrides):
    """A learned (or sinusoidal depth) position table ends at block_size: generation goes on past
    it, each new token re-encoding the last block_size tokens, as nanoGPT does; before that, the
    cache gives the same tokens. A prompt longer than the context is still refused."""
    cfg = Config.from_yaml(CONFIGS / "gpt_char.yaml", vocab_size=30, d_model=32, n_head=2,
                           n_layer=2, d_ff=64, dropout=0.0, init_std=0.2, **overrides)
    assert cfg.positions_bounded
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    prompt = torch.randint(0, 30, (2, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(m.generate(prompt, 20, temperature=0),
                           nanogpt_generate(m, prompt, 20, 8))
        seeded = lambda: torch.Generator().manual_seed(2)
        got = m.generate(prompt, 20, generator=seeded())
        assert torch.equal(got, nanogpt_generate(m, prompt, 20, 8, seeded()))
        assert len(set(got[:, 8:].flatten().tolist())) > 5     # varied tokens past the context
    msg = one_line_error(m.generate, torch.zeros(1, 9, dtype=torch.long), 1)
    assert "prompt of 9 tokens exceeds the context of 8 tokens" in msg


# ----------------------------------------------------------------------------------------------
# 004 Block-Recurrent Transformer


def test_block_recurrent_config():
    """BlockRecurrentTransformer(num_tokens=20000, dim=512, depth=6, dim_head=64, heads=8,
    max_seq_len=1024, block_width=512, num_state_vectors=512, recurrent_layers=(4,)): its layer 4,
    counted from 1, is our layer 3."""
    with torch.device("meta"):
        m = Transformer.from_yaml(CONFIGS / "brt_base.yaml")
    c = m.config
    assert m.mixer_types == ["block_attn"] * 3 + ["recurrent"] + ["block_attn"] * 2
    assert (c.vocab_size, c.d_model, c.n_layer, c.head_dim, c.n_head, c.n_kv_head, c.block_size,
            c.block_width, c.n_states) == (20000, 512, 6, 64, 8, 1, 1024, 512, 512)
    assert m.get_num_params() == 40_541_184


def test_block_recurrent_calls_carry_memories_and_states():
    """The seed's `out, mems, states = model(seq, xl_memories=mems, states=states)`, three times,
    is three calls through one cache (at positions that go on); together they equal one call over
    the three segments. The seed's config, scaled down."""
    cfg = Config.from_yaml(CONFIGS / "brt_base.yaml", vocab_size=50, d_model=32, n_head=2,
                           head_dim=16, d_ff=48, block_size=16, block_width=8, n_states=4,
                           init_std=0.1)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    seq = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(1))
    T = seq.shape[1]
    with torch.no_grad():
        cache = m.setup_cache(1, 3 * T)
        outs = [m(seq, cache=cache, input_pos=torch.arange(i * T, (i + 1) * T)).logits
                for i in range(3)]
        assert cache[3].states.shape == (1, 4, 32) and cache[0].k.shape[2] == 8
        whole = m(seq.repeat(1, 3)).logits
    assert (torch.cat(outs, 1) - whole).abs().max() < 1e-5
    assert (outs[1] - outs[0]).abs().max() > 1e-2             # the carried state changes things


# ----------------------------------------------------------------------------------------------
# DeBERTa's enhanced mask decoder trains (checked against HF's layers in test_hf_encoder.py)


def test_enhanced_mask_decoder_trains(tmp_path, text):
    """A small DeBERTa-style encoder with emd_steps=2 on the MLM objective: its loss falls well
    below the characters' entropy (what a model blind to the context reaches; the uniform guess
    is ln V higher still), and the absolute position table, read only by the decoder, learns."""
    deberta = ["--architecture=encoder_only", "--position=disentangled", "--rel_buckets=8",
               "--rel_max_distance=16", "--norm=layernorm", "--norm_placement=post",
               "--final_norm=false", "--embed_norm=true", "--head_transform=true",
               "--head_bias=true", "--emd_steps=2", "--n_layer=2", "--init_std=0.05"]
    result = run_train(tmp_path, text, *deberta, "--max_iters=200", "--eval_interval=100",
                       "--batch_size=16", "--eval_iters=10")
    model = result["model"]
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["objective"] == "mlm" and model.config.emd_steps == 2
    counts = Counter(text.read_text()).values()
    entropy = -sum(n / sum(counts) * math.log(n / sum(counts)) for n in counts)   # 2.69 nats
    assert result["val_loss"] < entropy - 0.5, (result["val_loss"], entropy)
    torch.manual_seed(train.TrainConfig.seed)
    init = Transformer(model.config).emd_pos.weight
    assert (model.emd_pos.weight.cpu() - init).abs().max() > 1e-3


def test_checkpoint_round_trip_keeps_new_fields(tmp_path):
    """The new Config fields travel in checkpoints like the old ones."""
    cfg = Config(vocab_size=40, block_size=16, n_layer=2, n_head=2, d_model=16, block_width=4,
                 recurrent_layers=(1,), enhanced_recurrence=True, state_dropout=0.1)
    save_checkpoint(tmp_path / "c.pt", Transformer(cfg))
    assert Transformer.from_checkpoint(load_checkpoint(tmp_path / "c.pt")).config == cfg
