"""A broken HF-format directory is one line that names the file (and the tensor) at fault.

Each case damages a copy of a small random HF model's directory (config.json, model.safetensors,
or the shards of a model.safetensors.index.json) and requires from_pretrained to raise a one-line
ValueError naming what is wrong, never a SafetensorError / StopIteration / size-mismatch
traceback. Also: HF's spellings of "no sliding window" import as no window.
"""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import Transformer  # noqa: E402

V = 96
LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_attention_heads=4,
             num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64,
             tie_word_embeddings=False, attn_implementation="eager")
GPT2 = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            attn_implementation="eager")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> a directory written by save_pretrained (the sharded one with a 20 kB shard limit)."""
    torch.manual_seed(0)
    dirs = {}
    for name, model, kw in [
        ("llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)), {}),
        ("sharded", transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)),
         dict(max_shard_size="20KB")),
        ("gpt2", transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)), {}),
        ("qwen3", transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**LLAMA, head_dim=8)), {}),
    ]:
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name], **kw)
    return dirs


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


def drop_key(path, key):
    cfg = json.loads((path / "config.json").read_text())
    del cfg[key]
    (path / "config.json").write_text(json.dumps(cfg))


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


def first_shard(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    return sorted(set(index.values()))[0]


# name -> (source directory, damage(dir), what the message must contain)
DAMAGE = {
    "invalid_json": ("llama", lambda d: (d / "config.json").write_text('{"model_type": "llama",'),
                     ["config.json", "not valid JSON"]),
    "config_lacks_a_key": ("llama", lambda d: drop_key(d, "hidden_size"),
                           ["config.json", "'hidden_size'"]),
    "bad_config_value": ("llama", lambda d: edit_config(d, num_attention_heads=0),
                         ["config.json", "n_head=0"]),
    "truncated_data": ("llama", lambda d: truncate(d / "model.safetensors", lambda n: n - 1000),
                       ["model.safetensors", "truncated or corrupt", "tensor 'model.",
                        "past the end"]),
    "truncated_header": ("llama", lambda d: truncate(d / "model.safetensors", lambda n: 50),
                         ["model.safetensors", "truncated or corrupt", "header"]),
    "missing_shard": ("sharded", lambda d: (d / first_shard(d)).unlink(),
                      ["model.safetensors.index.json", "model-00001-of-", "missing", "tensor '"]),
    "truncated_shard": ("sharded", lambda d: truncate(d / first_shard(d), lambda n: n // 2),
                        ["model-00001-of-", "truncated or corrupt", "tensor '"]),
    "shape_vs_config": ("llama", lambda d: edit_config(d, intermediate_size=40),
                        ["model.safetensors: model.layers.0.mlp.down_proj.weight does not fit",
                         "config.json", "(32, 48)", "(32, 40)"]),
    "reshaped_vs_config": ("gpt2", lambda d: edit_config(d, n_embd=16, n_head=2),
                           ["model.safetensors: ", "does not fit", "config.json"]),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_broken_directory_is_one_line_naming_the_file(saved, tmp_path, case):
    source, damage, expected = DAMAGE[case]
    path = tmp_path / case
    shutil.copytree(saved[source], path)
    Transformer.from_pretrained(path)                     # the undamaged copy loads
    damage(path)
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


@pytest.mark.parametrize("spelling", [None, -1, 0])
def test_no_window_spellings(saved, tmp_path, spelling):
    """Mistral with sliding_window null, -1 or 0 imports with no window (HF 5.23 builds no window
    mask for null, the reference here; -1 and 0 are older tools' way of writing the same)."""
    path = tmp_path / "mistral"
    shutil.copytree(saved["llama"], path)
    edit_config(path, model_type="mistral", architectures=["MistralForCausalLM"],
                sliding_window=None)
    hf = transformers.MistralForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    edit_config(path, sliding_window=spelling)
    ours = Transformer.from_pretrained(path)
    assert ours.config.sliding_window is None and set(ours.mixer_types) == {"attn"}
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max().item() <= 1e-4


def test_qwen3_use_sliding_window_false_means_no_window(saved, tmp_path):
    """A Qwen3 config.json may hold a window and use_sliding_window=false: HF ignores the window."""
    path = tmp_path / "qwen3"
    shutil.copytree(saved["qwen3"], path)
    edit_config(path, sliding_window=4, layer_types=None)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    assert hf.config.sliding_window is None and not hf.config.use_sliding_window
    ours = Transformer.from_pretrained(path)
    assert ours.config.sliding_window is None and set(ours.mixer_types) == {"attn"}
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max().item() <= 1e-4
