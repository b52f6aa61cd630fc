"""Every bad input to model.py ends in one clear line (issue 10, model side).

Config: every numeric field has a rule (LIMITS), and a value that cannot work is refused naming
the field; YAML syntax errors name file, line and column. The forward API refuses inputs of the
wrong dtype or shape, naming the argument; generate refuses ids outside the vocabulary.
load_checkpoint names a directory as one. And model.py runs alone when copied into an empty
directory, importing only the standard library and torch at module level.
"""
import ast
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch

import model
from model import Config, Transformer, check_ids, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BASE = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, d_model=32)
BAD = {">= 1": [0, -3], ">= 0": [-1], "> 0": [0, -1.5], "in (0, 1]": [0, 1.5],
       "in [0, 1)": [1, -0.1]}
UNBOUNDED = {"state_forget_bias"}   # any real value is a valid initial forget-gate bias


def one_line_error(fn, *parts):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("rule, field", [(r, f) for r, (_, fields) in model.LIMITS.items()
                                         for f in fields.split()])
def test_each_field_outside_its_rule_is_refused(rule, field):
    for value in BAD[rule]:
        one_line_error(lambda v=value: Config(**{**BASE, field: v}), f"{field}=", f"must be {rule}")


def test_every_numeric_field_has_a_rule():
    """A new size or rate added to Config without a rule fails here: the class of bug is closed."""
    covered = {f for _, fields in model.LIMITS.values() for f in fields.split()}
    numeric = {f.name for f in dataclasses.fields(Config)
               if {int, float} & set(get_args(f.type) or (f.type,))}
    assert numeric - covered - UNBOUNDED == set()
    assert covered <= numeric


@pytest.mark.parametrize("kw, message", [
    (dict(sliding_window=-1, layer_pattern=["local_attn"]), "sliding_window=-1 must be >= 1"),
    (dict(decoder_start_token_id=64), "decoder_start_token_id=64 must be below vocab_size=64"),
    (dict(layer_groups=3), "layer_groups=3 must be between 1 and n_layer=2"),
    (dict(position="rope", rope_scaling="llama3", rope_low_freq_factor=4.0),
     "rope_high_freq_factor=4.0 must exceed rope_low_freq_factor=4.0"),
    (dict(position="relative_bias", rel_buckets=8, rel_max_distance=4),
     "rel_max_distance=4 above the 4 exact buckets"),
    (dict(position="disentangled", n_kv_head=2), "disentangled attention needs n_kv_head = n_head"),
    (dict(position="alibi", block_width=4), "block-recurrent layers"),
    (dict(block_width=8, compress_factor=3), "compress_factor=3 must divide"),
    (dict(recurrent_layers=[5], block_width=4), "recurrent_layers=[5] must be layer indices"),
])
def test_fields_that_must_agree(kw, message):
    one_line_error(lambda: Config(**{**BASE, **kw}), message)


@pytest.mark.parametrize("text, parts", [
    ("n_layer: 2\n\tn_head: 4\n", ["at line 2, column 1", "'\\t'"]),           # a tab
    ("n_layer: 2\n  n_head: 4\n", ["at line 2, column 9", "mapping values"]),   # a bad indent
    ("n_layer: [2, 3\n", ["at line 2, column 1"]),                              # unclosed list
    ("- n_layer: 2\n", ["must be a mapping of config keys", "not a list"]),
    ("just some words\n", ["must be a mapping of config keys", "not a str"]),
])
def test_yaml_errors_are_one_line_with_file_line_and_column(tmp_path, text, parts):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    one_line_error(lambda: Config.from_yaml(path), str(path), *parts)


def test_empty_yaml_is_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert Config.from_yaml(tmp_path / "empty.yaml", **BASE) == Config(**BASE)


# ----------------------------------------------------------------------------------------------
# The forward API and generate


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"decoder": Transformer(Config(**BASE)),
            "encoder": Transformer(Config(**BASE, architecture="encoder_only", type_vocab_size=2)),
            "enc_dec": Transformer(Config(**BASE, architecture="encoder_decoder"))}


IDS = torch.randint(0, 64, (2, 8))
FORWARD = {  # name -> (model, call, what the message must hold)
    "float_ids": ("decoder", lambda m: m(IDS.float()),
                  ["input_ids must be a tensor of integer token ids", "torch.float32"]),
    "list_ids": ("decoder", lambda m: m(IDS.tolist()), ["input_ids must be a tensor", "list"]),
    "one_dim": ("decoder", lambda m: m(IDS[0]), ["input_ids must be (batch, time)", "(8,)",
                                                 "input_ids[None]"]),
    "targets_shape": ("decoder", lambda m: m(IDS, targets=IDS[:, :5]),
                      ["targets must have the shape of input_ids (2, 8)", "(2, 5)"]),
    "targets_float": ("decoder", lambda m: m(IDS, targets=IDS.float()),
                      ["targets must hold integers", "torch.float32"]),
    "mask_shape": ("encoder", lambda m: m(IDS, attention_mask=torch.ones(2, 9)),
                   ["attention_mask must have the shape of input_ids", "(2, 9)"]),
    "token_types_shape": ("encoder", lambda m: m(IDS, token_type_ids=torch.zeros(8).long()),
                          ["token_type_ids must have the shape of input_ids", "(8,)"]),
    "token_types_float": ("encoder", lambda m: m(IDS, token_type_ids=torch.zeros(2, 8)),
                          ["token_type_ids must hold integers"]),
    "decoder_ids_float": ("enc_dec", lambda m: m(IDS, IDS.float()),
                          ["decoder_input_ids must be a tensor of integer token ids"]),
    "source_mask_shape": ("enc_dec", lambda m: m(IDS, IDS, attention_mask=torch.ones(2, 3)),
                          ["attention_mask must have the shape of input_ids"]),
    "enc_dec_targets": ("enc_dec", lambda m: m(IDS, IDS[:, :4], targets=IDS),
                        ["targets must have the shape of decoder_input_ids (2, 4)"]),
    "generate_out_of_vocab": ("decoder", lambda m: m.generate(IDS + 60, 3),
                              ["input_ids holds token id", "outside the model's vocabulary "
                               "[0, 64)"]),
    "generate_negative": ("enc_dec", lambda m: m.generate(IDS - 70, 3),
                          ["input_ids holds token id -", "[0, 64)"]),
    "generate_float": ("decoder", lambda m: m.generate(IDS.float(), 3),
                       ["input_ids must be a tensor of integer token ids"]),
}


@pytest.mark.parametrize("case", FORWARD)
def test_bad_inputs_are_one_line_naming_the_argument(models, case):
    name, call, parts = FORWARD[case]
    one_line_error(lambda: call(models[name]), *parts)


def test_check_ids_for_data():
    check_ids(torch.tensor([0, 5, 63]), 64, "train.bin")
    one_line_error(lambda: check_ids(torch.tensor([3, 64, 2]), 64, "train.bin"),
                   "train.bin holds token id 64", "[0, 64)")


def test_checkpoint_path_that_is_a_directory(tmp_path):
    one_line_error(lambda: load_checkpoint(tmp_path), "is a directory", "ckpt.pt")


# ----------------------------------------------------------------------------------------------
# model.py stands alone


def test_model_py_imports_only_the_standard_library_and_torch():
    tree = ast.parse((ROOT / "model.py").read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
           for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top - set(sys.stdlib_module_names) == {"torch"}


def test_model_py_runs_alone_in_an_empty_directory(tmp_path):
    shutil.copy(ROOT / "model.py", tmp_path / "model.py")
    (tmp_path / "small.yaml").write_text("n_layer: 2\nn_head: 2\nd_model: 32\nvocab_size: 50\n"
                                         "block_size: 16\nposition: alibi\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ""}
    run = lambda *args: subprocess.run([sys.executable, "model.py", *args], cwd=tmp_path,
                                       capture_output=True, text=True, env=env, timeout=120)
    out = run("small.yaml")
    assert out.returncode == 0, out.stderr
    assert "decoder_only:" in out.stdout and "logits (1, 16, 50)" in out.stdout
    out = run("missing.yaml")
    assert out.returncode == 1 and out.stderr.startswith("error: ")
    assert "Traceback" not in out.stderr
