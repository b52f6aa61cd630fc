"""Config validation, parameter counts, checkpoints and training-time features of model.py."""
import math
from pathlib import Path

import pytest
import torch

from model import Config, DropPath, Transformer, from_checkpoint, load_checkpoint, save_checkpoint

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tiny(**kw):
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, d_model=32)
    return Config(**{**base, **kw})


@pytest.mark.parametrize("kw, message", [
    (dict(d_modle=64), "did you mean 'd_model'"),
    (dict(d_model=30, n_head=4), "d_model=30 must be divisible by n_head=4"),
    (dict(n_head=4, n_kv_head=3), "n_head=4 must be divisible by n_kv_head=3"),
    (dict(position="rope", head_dim=7), "even number of rotated channels"),
    (dict(norm="rmsnrom"), "did you mean 'rmsnorm'"),
    (dict(ffn="swiglu"), "ffn='swiglu' is not one of"),
    (dict(layer_pattern=["local_attn"]), "sliding_window is not set"),
    (dict(n_layer="two"), "n_layer='two' must be int"),
    (dict(dropout=1.5), "dropout=1.5 must be in [0, 1)"),
])
def test_bad_config_is_one_line_error(kw, message):
    with pytest.raises(ValueError) as e:
        Config.from_dict({**dict(vocab_size=64, n_layer=2, n_head=4, d_model=32), **kw})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_yaml_overrides_and_coercion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("n_layer: 2\nn_head: 2\nd_model: 16\nnorm_eps: 1\nlayer_pattern: [attn]\n")
    cfg = Config.from_yaml(p, n_layer=3)
    assert cfg.n_layer == 3 and cfg.norm_eps == 1.0 and isinstance(cfg.norm_eps, float)
    assert cfg.layer_pattern == ("attn",)


@pytest.mark.parametrize("name, expected, tol", [
    ("gpt2_small", 124_439_808, 0), ("gpt2_medium", 354_823_168, 0), ("gpt2_large", 774_030_080, 0),
    ("gemma3_1b", 1.29e9, 0.02), ("llama_small", 1.0e8, 0.02)])
def test_param_counts(name, expected, tol):
    with torch.device("meta"):
        n = Transformer.from_yaml(CONFIGS / f"{name}.yaml").get_num_params()
    assert abs(n - expected) <= tol * expected


def test_gemma3_layout():
    cfg = Config.from_yaml(CONFIGS / "gemma3_1b.yaml")
    with torch.device("meta"):
        m = Transformer(cfg)
    assert m.mixer_types.count("attn") == 4
    assert m.mixer_types[5] == "attn" and m.mixer_types[0] == "local_attn"


def test_checkpoint_roundtrip_and_atomic(tmp_path):
    torch.manual_seed(0)
    m = Transformer(tiny(position="rope", norm="rmsnorm", ffn="glu", activation="silu"))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, m, iter_num=7)
    assert not list(tmp_path.glob("*.tmp"))
    ck = load_checkpoint(path)
    assert ck["iter_num"] == 7
    m2 = from_checkpoint(ck)
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(m(ids).logits, m2(ids).logits, rtol=0, atol=0)


def test_corrupt_and_truncated_checkpoints(tmp_path):
    m = Transformer(tiny())
    good = tmp_path / "good.pt"
    save_checkpoint(good, m)
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    for name in ("trunc.pt", "junk.pt"):
        with pytest.raises(ValueError, match="truncated or corrupt"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an anyformer checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_checkpoint_of_other_config_is_refused(tmp_path):
    ck = {"model": Transformer(tiny()).state_dict(), "config": {**tiny().__dict__, "n_layer": 3}}
    with pytest.raises(ValueError, match="do not match"):
        from_checkpoint(ck)


def test_grad_checkpoint_gives_same_gradients():
    torch.manual_seed(0)
    cfg = tiny(position="rope", norm="rmsnorm", ffn="glu", activation="silu", bias=False)
    a = Transformer(cfg)
    b = Transformer(Config(**{**cfg.__dict__, "grad_checkpoint": True}))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 64, (2, 16))
    for m in (a, b):
        m(ids, targets=ids).loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_initial_loss_is_log_vocab_and_targets_ignore():
    torch.manual_seed(0)
    m = Transformer(tiny(vocab_size=256))
    ids = torch.randint(0, 256, (4, 32))
    targets = torch.randint(0, 256, (4, 32))
    out = m(ids, targets=targets)
    assert abs(out.loss.item() - math.log(256)) < 0.1 and out.aux_loss.item() == 0
    t = targets.clone()
    t[:, :16] = -1  # ignored positions
    logits = m(ids).logits       # a training call with targets fuses the head: logits None
    full = torch.nn.functional.cross_entropy(logits[:, 16:].reshape(-1, 256),
                                             targets[:, 16:].reshape(-1))
    torch.testing.assert_close(m(ids, targets=t).loss, full)


def test_scaled_residual_init_and_tying():
    m = Transformer(tiny(n_layer=8, d_model=256, n_head=4))
    std = m.blocks[0].mixer.o_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert m.lm_head.weight is m.wte.weight
    untied = Transformer(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight


def test_drop_path_and_dropout_only_in_training():
    torch.manual_seed(0)
    m = Transformer(tiny(drop_path=0.5, dropout=0.1))
    ids = torch.randint(0, 64, (8, 16))
    m.eval()
    torch.testing.assert_close(m(ids).logits, m(ids).logits)
    m.train()
    assert not torch.allclose(m(ids).logits, m(ids).logits)


def test_drop_path_drops_whole_samples_and_rescales():
    """Training: each sample's branch is kept whole, scaled by 1/(1-p), or dropped; mean kept."""
    p = 0.3
    torch.manual_seed(0)
    x = torch.rand(20000, 3, 4) + 0.5
    y = DropPath(p).train()(x)
    ratio = y / x                                                   # (N, T, C)
    dropped, kept = ratio.abs() < 1e-7, (ratio - 1 / (1 - p)).abs() < 1e-6
    assert (dropped | kept).all()
    assert (dropped.all((1, 2)) | kept.all((1, 2))).all()          # a whole sample at a time
    assert abs(kept.all((1, 2)).float().mean().item() - (1 - p)) < 0.015   # 4.6 sigma
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.02
    assert torch.equal(DropPath(p).eval()(x), x)


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "none"])
def test_positions_are_causal(position):
    """Changing a later token never changes earlier logits, for every position scheme."""
    torch.manual_seed(0)
    m = Transformer(tiny(position=position)).eval()
    ids = torch.randint(0, 64, (1, 12))
    ids2 = ids.clone()
    ids2[0, 8] = (ids[0, 8] + 1) % 64
    a, b = m(ids).logits, m(ids2).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_learned_positions_beyond_block_size():
    m = Transformer(tiny(block_size=8))
    with pytest.raises(ValueError, match="beyond block_size=8"):
        m(torch.zeros(1, 9, dtype=torch.long))
