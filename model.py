"""anyformer: every transformer variant in one readable PyTorch file.

Read top to bottom in the order data flows:
  1. Config           a frozen dataclass loaded from YAML, each field checked (LIMITS)
  2. Building blocks  norms; positions; attention with its KV cache and masks; block-recurrent
                      attention; Gated DeltaNet; feed-forward; mixture of experts
  3. Block and stack  one residual Block (the per-layer layout is data: layer_types); ACT
  4. Model and heads  Transformer: embeddings -> blocks -> final norm -> heads; EncoderDecoder
  5. Inference        sampling filters and the generation loop
  6. Checkpoints      ours (save / load); HF-format directories are hf.py's

Index: every variant is a Config value; this is where each one lives.
  attention         Attention (MHA/GQA/MQA, QK-norm, softcap, output gate), attend
  masks, windows    attention_mask (causal, sliding window, padding, bias), next to KVCache (a ring
                    buffer for local_attn layers); Attention.window; Transformer.context
  positions         POSITIONS: learned LearnedPosition, sinusoidal SinusoidalPosition, rope RoPE
                    (ROPE_SCALINGS: linear, dynamic, llama3, yarn), relative_bias RelativeBias (T5),
                    disentangled Disentangled (DeBERTa), alibi ALiBi, none Position, dynamic_bias
                    DynamicPositionBias (inside block-recurrent layers)
  norms             NORMS (layernorm, rmsnorm: RMSNorm, Gemma's 1 + w); pre/post/sandwich: Block
  feed-forward      FFNS: mlp MLP, glu GLU (SwiGLU, GeGLU); ACTIVATIONS
  mixture of experts  MoE; ROUTERS: token_choice, expert_choice; expert_linear, balance_loss
  linear attention  GatedDeltaNet, delta_rule_chunked, delta_rule_recurrent, DeltaNetState
  layouts, hybrids  layer_types (layer_pattern, attention_type, hybrid_ratio, ffn_pattern); MIXERS
  encoder-only      BERT, ALBERT, DeBERTa: Transformer (token types wtt, embed_dim, layer_groups
                    sharing, head_transform, cls_head; emd_steps: Transformer.mask_decoder)
  encoder-decoder   EncoderDecoder, stack_config, CrossAttention, CrossKV
  Universal Tr.     layer_groups 1 + depth_embedding (Transformer.depth_signal) + ACT
  Block-Recurrent   BlockAttention (XL memory, compression), RecurrentAttention, StateGate,
                    BlockMemory; Transformer.enhanced_recurrence
  heads             Transformer.lm_logits (LinearCrossEntropy: the LM head fused with its loss),
                    Transformer.classify (cls_head, n_classes: NSP, SOP, classification)
  stochastic depth  DropPath
  memory            grad_checkpoint (Block.residual: per residual branch), LinearCrossEntropy
  decoding          Transformer.setup_cache, generate (crops past a position table; a list of
                    prompts: left_pad; compiled: sampling_step), sample_loop, sample,
                    LOGIT_FILTERS; int8, speculative decoding and beam search: decoding.py
  input checks      LIMITS, Config.check_layout, read_yaml, check_key (FOREIGN_KEYS), check_inputs,
                    check_ids, check_sampling; other projects' schema: from_seed_schema

Shape legend: B batch, T time (new tokens), C d_model, nh query heads, nkv kv heads,
hs head size, S keys (cache slots), V vocab, F feed-forward width, E experts.
"""
import dataclasses
import difflib
import math
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Union, get_args, get_origin

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------
# 1. Config


@dataclass(frozen=True)
class Config:
    """Every architectural choice. Unknown keys and bad values raise a one-line ValueError."""

    architecture: str = "decoder_only"  # a key of ARCHITECTURES
    encoder: dict | None = None       # encoder_decoder: the encoder stack's own fields (n_layer..)
    decoder: dict | None = None       # encoder_decoder: the decoder stack's own fields
    cross_attention: bool = False     # blocks attend to an encoder output (an enc-dec's decoder)
    decoder_start_token_id: int = 0   # first decoder input of an encoder-decoder
    # sizes
    vocab_size: int = 50304
    block_size: int = 1024            # longest sequence the model is meant to see
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None      # None -> n_head (MHA); 1 -> MQA; otherwise GQA
    d_model: int = 768
    head_dim: int | None = None       # None -> d_model // n_head (Qwen3/Gemma set it freely)
    d_ff: int | None = None           # None -> 4*d_model (mlp), 8/3*d_model rounded to 64 (glu)
    # norms
    norm: str = "layernorm"           # a key of NORMS
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False    # RMSNorm scales by (1 + w), w starting at 0 (Gemma)
    norm_bias: bool = True            # LayerNorm has a bias
    norm_placement: str = "pre"       # pre | post (original Transformer, BERT) | sandwich (Gemma)
    final_norm: bool = True           # a norm after the last block
    # positions
    position: str = "learned"         # a key of POSITIONS
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # base of sliding-window layers (Gemma 3), unscaled
    rope_scaling: str = "none"        # a key of ROPE_SCALINGS; global layers only
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0      # llama3 scaling band edges
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192      # context the RoPE was trained at (llama3, dynamic, yarn)
    rope_beta_fast: float = 32.0      # yarn: channels turning this often in it keep their frequency
    rope_beta_slow: float = 1.0       # yarn: channels turning less often than this are interpolated
    rope_attn_factor: float | None = None  # cos, sin times this; None: yarn 0.1 ln(factor)+1, or 1
    rope_fraction: float = 1.0        # rotate only this fraction of each head (partial RoPE)
    pos_offset: int = 0               # learned position ids start here (BART: 2)
    rel_buckets: int = 32             # relative_bias: buckets (T5); disentangled: the span
    rel_max_distance: int = 128       # farther distances share the last bucket / log range end
    # attention
    layer_pattern: tuple = ("attn",)  # keys of MIXERS tiled over the layers (5 local_attn + attn)
    attention_type: str = "softmax"   # softmax: layer_pattern | linear: deltanet | hybrid
    hybrid_ratio: int = 3             # hybrid: this many deltanet layers per attn (Qwen3-Next: 3)
    sliding_window: int | None = None  # keys a local_attn query sees, itself included
    qk_norm: bool = False             # normalise q and k per head before RoPE (Qwen3, Gemma 3)
    attn_scale: float | None = None   # None -> head_dim**-0.5 (Gemma: query_pre_attn_scalar)
    attn_softcap: float | None = None  # scores -> cap*tanh(scores/cap) (Gemma 2)
    attn_gate: bool = False           # output gate sigmoid(x W_g) on the heads (Qwen3-Next)
    bias: bool = True                 # biases on attention and feed-forward projections
    ffn_bias: bool | None = None      # feed-forward biases, when not as `bias`
    # Gated DeltaNet (linear attention) layers
    dn_heads: int = 4                 # key heads (dk each)
    dn_v_heads: int | None = None     # value heads, a multiple of dn_heads; None -> dn_heads
    dn_head_dim: int = 64             # dk
    dn_v_head_dim: int | None = None  # dv; None -> dn_head_dim
    dn_conv: int = 4                  # causal depthwise conv kernel over q, k, v
    dn_chunk: int = 64                # chunk length of the parallel form (training, prefill)
    # feed-forward
    ffn: str = "mlp"                  # a key of FFNS
    activation: str = "gelu"          # a key of ACTIVATIONS
    # mixture of experts (experts are FFNs of the `ffn` kind)
    ffn_pattern: tuple = ("dense",)   # dense | moe tiled over the layers ([dense, moe]: every 2nd)
    n_expert: int = 8                 # (any MoE key without a moe layer in ffn_pattern: an error)
    moe_top_k: int = 2                # experts per token (token choice; expert choice: the mean)
    moe_d_ff: int | None = None       # expert width; None -> the dense FFN width
    moe_router: str = "token_choice"  # a key of ROUTERS
    moe_renorm: bool = True           # top-k weights renormalised to sum to 1 (Mixtral)
    moe_capacity: float = 1.0         # expert choice: each expert takes capacity * N * top_k / E
    moe_shared_d_ff: int | None = None  # width of an always-on shared expert, sigmoid-gated (Qwen)
    moe_n_shared: int = 0             # always-on experts of the expert width, ungated (DeepSeekMoE)
    moe_aux_weight: float = 0.01      # load-balancing loss weight inside aux_loss
    moe_z_weight: float = 0.0         # router z-loss weight inside aux_loss (ST-MoE)
    moe_pool_balance: bool = False    # one balance loss over all MoE layers (HF); False: per layer
    # embeddings and head
    tie_embeddings: bool = True
    embed_scale: float | None = None  # multiply token embeddings (Gemma: sqrt(d_model))
    final_softcap: float | None = None  # logits -> cap*tanh(logits/cap) (Gemma 2)
    head_input_scale: float | None = None  # scales the head's input (T5: d_model**-0.5)
    # encoder-only (BERT family)
    type_vocab_size: int = 0          # token-type (segment) embeddings (BERT: 2)
    embed_dim: int | None = None      # factorised embeddings of this size (ALBERT)
    embed_norm: bool = False          # a norm right after the embeddings (BERT, ALBERT)
    layer_groups: int | None = None   # the n_layer layers share this many blocks (ALBERT)
    head_transform: bool = False      # dense -> activation -> norm before the output matrix (BERT)
    head_bias: bool = False           # a bias on the output logits (BERT's MLM head)
    cls_head: bool = False            # a sequence classifier: see Transformer.classify
    n_classes: int = 2                # its classes (NSP, SOP: 2; a classify run: the data's labels)
    emd_steps: int = 0                # DeBERTa's enhanced mask decoder: the last block's reruns
    # recurrence in time: Block-Recurrent Transformer (block_width > 0 lays out its layers)
    block_width: int = 0              # tokens per block; attention sees this and the previous block
    recurrent_layers: tuple = ()      # indices of the layers that carry state vectors
    n_states: int = 32                # state vectors per recurrent layer
    state_gate: str = "fixed"         # fixed | lstm
    state_forget_bias: float = 1.0    # initial forget bias: ~log(blocks to remember) (1804.11188)
    state_dropout: float = 0.0        # training: a row's block reads the initial states instead
    memory_dropout: float = 0.0       # training: a row's block sees no memory (in every layer)
    enhanced_recurrence: bool = False  # a layer's memory is the layer above's (ERNIE-Doc)
    compress_factor: int = 0          # blocks older than the memory pooled c:1 into slots (0: off)
    compress_slots: int = 16          # compressed slots a query reads, those before its memory
    pos_bias_dim: int = 32            # position dynamic_bias: hidden width of its MLP
    # recurrence in depth: Universal Transformer = layer_groups 1 (one block, n_layer steps) + these
    depth_embedding: str = "none"     # none | sinusoidal (position + step) | learned: each step
    act: bool = False                 # Adaptive Computation Time: halting over the n_layer steps
    act_threshold: float = 0.99       # halt once the summed halting probability passes this
    act_weight: float = 0.01          # ponder cost weight inside aux_loss
    # regularisation, init, memory
    dropout: float = 0.0
    drop_path: float = 0.0            # stochastic depth rate of every residual branch
    init_std: float = 0.02
    scaled_residual_init: bool = True  # output projections drawn with std/sqrt(2*n_layer) (GPT-2)
    grad_checkpoint: bool = False     # recompute each residual branch's activations in backward

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_type(f.name, getattr(self, f.name), f.type))
        for key, allowed in [("architecture", ARCHITECTURES), ("norm", NORMS),
                             ("position", POSITIONS), ("rope_scaling", ROPE_SCALINGS),
                             ("ffn", FFNS), ("activation", ACTIVATIONS), ("moe_router", ROUTERS),
                             ("norm_placement", PLACEMENTS), ("state_gate", ("fixed", "lstm")),
                             ("attention_type", ("softmax", "linear", "hybrid")),
                             ("depth_embedding", ("none", "sinusoidal", "learned"))]:
            check_choice(key, getattr(self, key), allowed)
        for t in self.layer_pattern:
            check_choice("layer_pattern entry", t, MIXERS)
        for t in self.ffn_pattern:
            check_choice("ffn_pattern entry", t, ("dense", "moe"))
        for rule, (ok, keys) in LIMITS.items():
            for key in keys.split():
                if getattr(self, key) is not None and not ok(getattr(self, key)):
                    raise ValueError(f"{key}={getattr(self, key)!r} must be {rule}")
        self.check_layout()
        self.check_stacks()
        POSITIONS[self.position].check(self)

    def check_layout(self):
        """Fields that must agree with each other (LIMITS checks each one alone)."""
        c, width, pattern = self.compress_factor, self.block_width, self.layer_pattern
        moe_set = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if
                   f.name.startswith(("moe_", "n_expert")) and getattr(self, f.name) != f.default]
        for broken, message in [  # (the disagreement, what to say)
            (self.head_dim is None and self.d_model % self.n_head, f"d_model={self.d_model} must "
             f"be divisible by n_head={self.n_head} (or set head_dim explicitly)"),
            (self.n_head % self.kv_heads, f"n_head={self.n_head} must be divisible by n_kv_head="
             f"{self.n_kv_head} (each kv head serves a whole group of query heads)"),
            (self.dn_v_heads and self.dn_v_heads % self.dn_heads, f"dn_v_heads={self.dn_v_heads} "
             f"must be a multiple of dn_heads={self.dn_heads}"),
            ("moe" in self.ffn_pattern and self.moe_top_k > self.n_expert, f"moe_top_k="
             f"{self.moe_top_k} must be between 1 and n_expert={self.n_expert}"),
            (moe_set and "moe" not in self.ffn_pattern, f"{', '.join(moe_set)} configure MoE "
             f"layers, but ffn_pattern={list(self.ffn_pattern)} has none; add ffn_pattern: [moe] "
             f"(or [dense, moe]: every 2nd layer), or drop them"),
            (self.moe_shared_d_ff and self.moe_n_shared, "moe_shared_d_ff (a gated shared expert) "
             "and moe_n_shared (ungated shared experts) are two kinds of shared expert; set one"),
            ("local_attn" in pattern and not self.sliding_window, "layer_pattern has local_attn "
             "layers but sliding_window is not set; set it to the number of keys a query sees"),
            ((self.layer_groups or 0) > self.n_layer, f"layer_groups={self.layer_groups} must be "
             f"between 1 and n_layer={self.n_layer}"),
            (self.decoder_start_token_id >= self.vocab_size, f"decoder_start_token_id="
             f"{self.decoder_start_token_id} must be below vocab_size={self.vocab_size}"),
            (any(i >= self.n_layer for i in self.recurrent_layers) or self.recurrent_layers and
             not width, f"recurrent_layers={list(self.recurrent_layers)} must be layer indices "
             f"below n_layer={self.n_layer}, with block_width > 0"),
            (c and (not width or width % c), f"compress_factor={c} must divide a positive "
             f"block_width={width} (0 = off)"),
            ((self.enhanced_recurrence or self.memory_dropout or self.state_dropout) and not width,
             "enhanced_recurrence, memory_dropout and state_dropout act on block memories and "
             "states: they need block-recurrent layers (block_width > 0)"),
            (self.act and not self.n_layer, "act halts over the n_layer steps: set n_layer >= 1"),
            (self.emd_steps and (self.causal or self.act or not self.n_layer
                                 or layer_types(self)[-1][0] not in ("attn", "local_attn")),
             f"emd_steps={self.emd_steps}: the enhanced mask decoder reruns the last attention "
             f"block of an encoder_only model (n_layer >= 1, no act)"),
            (width and POSITIONS[self.position].score_bias is not Position.score_bias,
             f"position={self.position!r} adds a bias to the attention scores, which "
             f"block-recurrent layers (block_width > 0) do not read; use rope, dynamic_bias, "
             f"learned, sinusoidal or none")]:
            if broken:
                raise ValueError(message)

    def check_stacks(self):
        """An encoder_decoder's encoder:/decoder: sections, validated now, not at first use."""
        if self.architecture != "encoder_decoder" and (self.encoder or self.decoder):
            raise ValueError(f"encoder:/decoder: sections configure the stacks of an "
                             f"encoder_decoder; this config is {self.architecture}: move their "
                             f"keys to the top level")
        for part in ("encoder", "decoder"):
            for key in getattr(self, part) or {}:
                check_key(f"{part} section key", key)
        if self.architecture == "encoder_decoder":
            stack_config(self, "encoder"), stack_config(self, "decoder")

    # derived values are properties, never overwritten fields
    @property
    def causal(self) -> bool:  # a query sees no later key: every stack but an encoder
        return self.architecture != "encoder_only"

    @property
    def hs(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        return 4 * self.d_model if self.ffn == "mlp" else 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def ffn_biased(self) -> bool:
        return self.bias if self.ffn_bias is None else self.ffn_bias

    @property
    def dn_nv(self) -> int:  # Gated DeltaNet value heads
        return self.dn_v_heads or self.dn_heads

    @property
    def dn_dv(self) -> int:  # Gated DeltaNet value head size
        return self.dn_v_head_dim or self.dn_head_dim

    @property
    def rope_dim(self) -> int:
        return int(self.hs * self.rope_fraction)

    @property
    def positions_bounded(self) -> bool:  # positions end at block_size (a table of that many rows)
        return (POSITIONS[self.position].bounded or self.emd_steps > 0
                or self.depth_embedding == "sinusoidal")

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        raw = from_seed_schema(raw)
        for key in raw:
            check_key("config key", key)
        return cls(**raw)

    @classmethod
    def from_yaml(cls, path, **overrides) -> "Config":
        raw = read_yaml(path)
        raw.pop("train", None)  # a `train:` section holds train.py's settings, not the model's
        return cls.from_dict({**raw, **overrides})


LIMITS = {  # rule -> (test, the fields it covers); None (an unset option) passes every rule
    ">= 1": (lambda v: v >= 1, "vocab_size block_size n_head n_kv_head d_model head_dim "
             "d_ff rope_original_max_len rel_buckets rel_max_distance hybrid_ratio sliding_window "
             "dn_heads dn_v_heads dn_head_dim dn_v_head_dim dn_conv dn_chunk n_expert moe_top_k "
             "moe_d_ff moe_shared_d_ff embed_dim layer_groups n_states compress_slots "
             "pos_bias_dim n_classes"),
    ">= 0": (lambda v: v >= 0, "n_layer decoder_start_token_id pos_offset type_vocab_size "
             "block_width compress_factor moe_aux_weight moe_z_weight moe_n_shared emd_steps "
             "act_weight"),
    "> 0": (lambda v: v > 0, "norm_eps rope_theta rope_local_theta rope_factor "
            "rope_low_freq_factor rope_high_freq_factor rope_beta_fast rope_beta_slow "
            "rope_attn_factor attn_scale attn_softcap moe_capacity embed_scale final_softcap "
            "head_input_scale init_std"),
    "in (0, 1]": (lambda v: 0 < v <= 1, "rope_fraction act_threshold"),
    "in [0, 1)": (lambda v: 0 <= v < 1, "dropout drop_path state_dropout memory_dropout"),
}


def read_yaml(path) -> dict:
    """The mapping in a YAML config file, or a one-line ValueError naming file, line and column."""
    import yaml  # lazy: model.py imports only torch at module level
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise ValueError(f"config file {path} {what}; see configs/ for the named models")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path} is not UTF-8 text (byte offset {e.start}); save it "
                         f"as UTF-8") from None
    except yaml.YAMLError as e:  # a bad indent, a tab: say where, in one line
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ValueError(f"config file {path} is not valid YAML{where}: {problem}; fix that line "
                         f"(YAML indents with spaces, never tabs)") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must be a mapping of config keys (key: value lines), not a "
                         f"{type(raw).__name__}")
    return raw


# Other projects' names for our keys. The "Modern Transformer" seed's YAML schema (SEED_SCHEMA) is
# read as written; the rest are only named in the unknown-key error, since their meaning differs
# where it matters (a Universal Transformer's depth is steps of one shared block; the
# block-recurrent package counts recurrent_layers from 1): read silently, another model is built.
FOREIGN_KEYS = {
    "weight_tying": "tie_embeddings", "n_layers": "n_layer", "n_heads": "n_head",
    "n_kv_heads": "n_kv_head", "moe_routing": "moe_router", "num_experts": "n_expert",
    "top_k": "moe_top_k", "num_shared_experts": "moe_n_shared",
    "num_heads": "n_head", "heads": "n_head", "h": "n_head", "num_kv_heads": "n_kv_head",
    "dim": "d_model", "hidden_size": "d_model", "num_layers": "n_layer", "dim_head": "head_dim",
    "num_tokens": "vocab_size", "n_vocab": "vocab_size", "max_seq_len": "block_size",
    "context_length": "block_size", "num_state_vectors": "n_states",
    "compressed_mem_factor": "compress_factor", "use_compressed_mem": "compress_factor",
    "depth": "n_layer (with layer_groups: 1 for a Universal Transformer's shared steps, as in "
             "configs/ut_base.yaml)",
}
SEED_SCHEMA = ("weight_tying", "n_layers", "n_heads", "n_kv_heads", "moe_routing", "num_experts",
               "top_k", "num_shared_experts")
SEED_DEFAULTS = dict(norm="rmsnorm", position="rope", ffn="glu", activation="silu", bias=False)


def from_seed_schema(raw: dict) -> dict:
    """A config in the Modern Transformer seed's schema (its names above, and a stack's own
    decoder:/encoder: section even on a one-stack model) as ours: names translated, a lone stack's
    section lifted to the top, num_experts giving MoE layers as the seed's do, and its block
    (pre-norm RMSNorm, RoPE, SwiGLU, no biases) under what the file sets. Ours pass unchanged."""
    sections = [raw[p] for p in ("encoder", "decoder") if isinstance(raw.get(p), dict)]
    if not set(raw).union(*sections) & set(SEED_SCHEMA):
        return raw
    ours = lambda d: {FOREIGN_KEYS[k] if k in SEED_SCHEMA else k: v for k, v in d.items()}
    out = {**SEED_DEFAULTS, **ours(raw)}
    for part in ("encoder", "decoder"):
        if isinstance(out.get(part), dict):
            section = ours(out.pop(part))
            if out.get("architecture") == "encoder_decoder":
                out[part] = section
            else:  # the seed writes a decoder_only model's keys in a decoder: section
                out.update(section)
    for d in (out, out.get("encoder") or {}, out.get("decoder") or {}):
        if "n_expert" in d:
            d.setdefault("ffn_pattern", ["moe"])
    return out


def check_key(what, key):
    """An unknown config key is a one-line error; for another project's name it names ours."""
    names = [f.name for f in dataclasses.fields(Config)]
    if key not in names and key in FOREIGN_KEYS:
        ours, _, note = FOREIGN_KEYS[key].partition(" ")
        raise ValueError(f"{what}={key!r} is another project's name; did you mean {ours!r}"
                         f"{' ' + note if note else ''}?")
    check_choice(what, key, names)


def check_choice(what, value, allowed):
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        choices = (f"one of {sorted(allowed)}" if len(allowed) <= 12
                   else "known (the fields of Config in model.py)")
        raise ValueError(f"{what}={value!r} is not {choices}{hint}")


def check_type(name, value, tp):
    """Return value converted to the field type tp (int -> float, list -> tuple), or raise."""
    allowed = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    if value is None and type(None) in allowed:
        return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tuple in allowed and isinstance(value, list):
        return tuple(value)
    if any(isinstance(value, t) and not (t is int and isinstance(value, bool))
           for t in allowed if t is not type(None)):
        return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ValueError(f"config key {name}={value!r} must be {names}")


def stack_config(cfg: Config, part: str) -> Config:
    """One stack of an encoder-decoder: the shared fields, overridden by that stack's section."""
    own = {"encoder": dict(architecture="encoder_only", tie_embeddings=True, head_bias=False,
                           head_transform=False, emd_steps=0),  # its output feeds no MLM head
           "decoder": dict(architecture="decoder_only", cross_attention=True)}[part]
    section = getattr(cfg, part) or {}
    for key in section:  # the stacks share one embedding and pass d_model-wide states
        if key in ("vocab_size", "d_model", "encoder", "decoder", *own):
            raise ValueError(f"{part} section key {key!r} cannot be set per stack of an "
                             f"encoder-decoder; set it at the top level (or not at all)")
    try:
        return dataclasses.replace(cfg, encoder=None, decoder=None, **own, **section)
    except ValueError as e:  # say which stack: the same key may be fine at the top level
        raise ValueError(f"{part} stack: {e}") from None


def layer_types(cfg: Config) -> list:
    """Per-layer (mixer, ffn) names: the patterns tiled over n_layer (Gemma 3: 5 local, 1 full)."""
    mix = {"softmax": cfg.layer_pattern, "linear": ("deltanet",),
           "hybrid": ("deltanet",) * cfg.hybrid_ratio + ("attn",)}[cfg.attention_type]
    if cfg.block_width:
        mix = ["recurrent" if i in cfg.recurrent_layers else "block_attn"
               for i in range(cfg.n_layer)]
    ffn = cfg.ffn_pattern
    return [(mix[i % len(mix)], ffn[i % len(ffn)]) for i in range(cfg.n_layer)]


# ----------------------------------------------------------------------------------------------
# 2. Building blocks: norms


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), in fp32; unit_offset: Gemma's (1 + w)."""

    def __init__(self, dim, eps, unit_offset=False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x):
        if self.unit_offset:  # Gemma: scale in fp32, then cast
            w = 1.0 + self.weight.float()
            return F.rms_norm(x.float(), x.shape[-1:], w, self.eps).type_as(x)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], None, self.eps).type_as(x)  # Llama


NORMS = {  # (dim, cfg) -> module. LayerNorm: Ba et al. 2016, arXiv:1607.06450
    "layernorm": lambda dim, cfg: nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias),
    "rmsnorm": lambda dim, cfg: RMSNorm(dim, cfg.norm_eps, cfg.norm_unit_offset),
}
PLACEMENTS = ("pre", "post", "sandwich")

# ----------------------------------------------------------------------------------------------
# 2. Building blocks: positions. A scheme is one class with up to three hooks (absolute table,
# rotary, score bias) and one POSITIONS entry; the model calls only the hooks, never the name.


class Position(nn.Module):
    """A position scheme. Each hook returns None where the scheme does nothing (this base class,
    position: none, does nothing at all: causal attention alone orders the tokens).

        table(pos)                  (T, E) added to the token embeddings (absolute schemes)
        rotary(pos, mixer)          (cos, sin), each (T, rd), rotating q and k (RoPE)
        score_bias(qpos, kpos)      what each layer adds to its attention scores, once per call
        layer_bias(bias, attn, q, k)  one layer's (1 or B, nh, T, S) scores bias from that:
                                    the call's bias itself, or (DeBERTa) made from its q and k
    """
    key = "nopos"      # the model's attribute holding the scheme: the prefix of its weights' names
    bounded = False    # positions end at block_size (a table of that many rows)

    def __init__(self, cfg: Config, width: int):
        super().__init__()

    @classmethod
    def check(cls, cfg: Config):  # one-line ValueErrors for the fields this scheme reads
        pass

    def table(self, pos):
        return None

    def rotary(self, pos, mixer):
        return None

    def score_bias(self, qpos, kpos):
        return None

    def layer_bias(self, bias, attn, q, k):
        return bias


def sinusoidal_table(n_pos, dim):
    """The fixed sin/cos table of "Attention Is All You Need" (arXiv:1706.03762), laid out as Marian
    has it: sines in the first half of the channels, cosines in the second. Computed in float64 as
    Marian does, so the fp32 table is the same to the last bit (fp32 angles drift by ~1e-6)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]                  # (P, 1)
    inv = 10000.0 ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (C/2,)
    return torch.cat((torch.sin(pos * inv), torch.cos(pos * inv)), dim=-1).float()  # (P, C)


class LearnedPosition(Position):
    """Learned absolute positions (GPT-2, BERT); BART's ids start at pos_offset = 2."""
    key, bounded = "wpe", True

    def __init__(self, cfg: Config, width: int):
        super().__init__(cfg, width)
        self.offset = cfg.pos_offset
        rows = cfg.block_size + cfg.pos_offset
        self.weight = nn.Parameter(torch.randn(rows, width) * cfg.init_std)

    def table(self, pos):
        return self.weight[pos + self.offset]                                 # (T, E)


class SinusoidalPosition(Position):
    """Fixed sinusoids added to the embeddings (Vaswani et al. 2017, arXiv:1706.03762; Marian)."""
    key, bounded = "wpe", True

    def __init__(self, cfg: Config, width: int):
        super().__init__(cfg, width)
        self.register_buffer("sinusoids", sinusoidal_table(cfg.block_size, width), persistent=False)

    def table(self, pos):
        return self.sinusoids[pos]                                            # (T, E)


def rope_linear(inv, cfg, pos):  # position interpolation (Chen et al. 2023, arXiv:2306.15595)
    return inv / cfg.rope_factor


def rope_dynamic(inv, cfg, pos):  # NTK-aware: raise the base once the call outgrows the context
    seq_len = int(pos.max()) + 1
    if seq_len <= cfg.rope_original_max_len:
        return inv
    d, f = cfg.rope_dim, cfg.rope_factor
    grow = (f * seq_len / cfg.rope_original_max_len - (f - 1)) ** (d / (d - 2))
    return inv / grow ** (torch.arange(0, d, 2, dtype=torch.float32, device=inv.device) / d)


def rope_llama3(inv, cfg, pos):  # Llama 3.1: slow down only the low-frequency band
    wavelen = 2 * math.pi / inv
    lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    s = (cfg.rope_original_max_len / wavelen - lo) / (hi - lo)
    mid = (1 - s) * inv / cfg.rope_factor + s * inv
    return torch.where(wavelen > cfg.rope_original_max_len / lo, inv / cfg.rope_factor,
                       torch.where(wavelen < cfg.rope_original_max_len / hi, inv, mid))


def rope_yarn(inv, cfg, pos):
    """YaRN (Peng et al. 2023, arXiv:2309.00071), as HF computes it: channels that turn more than
    beta_fast times in the original context keep their frequency, fewer than beta_slow times are
    interpolated (/ factor), a ramp between; RoPE.rotary scales cos, sin (rope_attn_factor)."""
    d, base, L = cfg.rope_dim, cfg.rope_theta, cfg.rope_original_max_len
    channel = lambda turns: d * math.log(L / (turns * 2 * math.pi)) / (2 * math.log(base))
    lo = max(math.floor(channel(cfg.rope_beta_fast)), 0)
    hi = min(math.ceil(channel(cfg.rope_beta_slow)), d - 1)
    ramp = ((torch.arange(d // 2, device=inv.device) - lo) / (hi - lo or 1e-3)).clamp(0, 1)
    return inv / cfg.rope_factor * ramp + inv * (1 - ramp)


ROPE_SCALINGS = {"none": lambda inv, cfg, pos: inv, "linear": rope_linear,
                 "dynamic": rope_dynamic, "llama3": rope_llama3, "yarn": rope_yarn}


class RoPE(Position):
    """RoPE (Su et al. 2021, arXiv:2104.09864) on q and k, HF's split-halves form (channel i pairs
    with i + rd/2). Sliding-window layers may use another base, unscaled (Gemma 3)."""
    key = "rope"

    def __init__(self, cfg: Config, width: int):
        super().__init__(cfg, width)
        self.cfg, local = cfg, cfg.rope_local_theta
        exponents = torch.arange(0, cfg.rope_dim, 2, dtype=torch.float32) / cfg.rope_dim
        self.register_buffer("inv_freq", cfg.rope_theta ** -exponents, persistent=False)  # (rd/2,)
        self.register_buffer("inv_freq_local", (local or cfg.rope_theta) ** -exponents,
                             persistent=False)
        # (scaling, cos/sin factor) by layer kind: sliding-window layers with a base of their own
        # are unscaled (Gemma 3); YaRN's factor is 0.1 ln(s) + 1, which HF applies for factor s > 1
        factor = cfg.rope_attn_factor or (0.1 * math.log(cfg.rope_factor) + 1 if (
            cfg.rope_scaling == "yarn" and cfg.rope_factor > 1) else 1.0)
        self.scalings = {"global": (cfg.rope_scaling, factor),
                         "local": ("none", 1.0) if local else (cfg.rope_scaling, factor)}

    @classmethod
    def check(cls, cfg):
        if cfg.rope_dim % 2:
            raise ValueError(f"RoPE needs an even number of rotated channels, got {cfg.rope_dim} "
                             f"(head_dim={cfg.hs}, rope_fraction={cfg.rope_fraction}); use an "
                             f"even head_dim")
        if cfg.rope_scaling == "llama3" and cfg.rope_high_freq_factor <= cfg.rope_low_freq_factor:
            raise ValueError(f"rope_high_freq_factor={cfg.rope_high_freq_factor} must exceed "
                             f"rope_low_freq_factor={cfg.rope_low_freq_factor}")

    def rotary(self, pos, mixer):                                 # pos: (T,), or (B, T) per row
        kind = "local" if mixer == "local_attn" else "global"
        inv = self.inv_freq_local if kind == "local" else self.inv_freq
        scaling, factor = self.scalings[kind]
        f = pos.float()[..., None] * ROPE_SCALINGS[scaling](inv, self.cfg, pos)
        f = torch.cat((f, f), dim=-1)                                         # (T, rd)
        if f.dim() == 3:  # each row its own positions (a left-padded batch): (B, 1, T, rd)
            f = f[:, None]
        return f.cos() * factor, f.sin() * factor


def apply_rope(x, cos, sin):          # x: (B, nh, T, hs); cos, sin: (T, rd) or (B, 1, T, rd)
    rd = cos.shape[-1]
    if rd < x.shape[-1]:                             # partial RoPE rotates the first rd channels
        return torch.cat((apply_rope(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)
    rotated = torch.cat((-x[..., rd // 2:], x[..., :rd // 2]), dim=-1)       # rotate_half
    return (x * cos + rotated * sin).type_as(x)


class RelativeBias(Position):
    """T5's learned per-head bias on log-spaced buckets of key - query distance (Raffel et al.
    2019, arXiv:1910.10683), one table per stack; bidirectional stacks split the buckets in two."""
    key = "rel_bias"

    def __init__(self, cfg: Config, width: int):
        super().__init__(cfg, width)
        self.bidirectional = not cfg.causal
        self.buckets, self.max_distance = cfg.rel_buckets, cfg.rel_max_distance
        self.bias = nn.Embedding(cfg.rel_buckets, cfg.n_head)

    @classmethod
    def check(cls, cfg):
        exact = cfg.rel_buckets // (2 if cfg.causal else 4)
        if exact < 1 or cfg.rel_max_distance <= exact:
            raise ValueError(f"relative_bias needs rel_buckets={cfg.rel_buckets} >= 4 (2 in a "
                             f"decoder) and rel_max_distance={cfg.rel_max_distance} above the "
                             f"{exact} exact buckets")

    def score_bias(self, qpos, kpos):
        rel = kpos[None, :] - qpos[:, None]                  # (T, S) key position - query position
        nb, bucket = self.buckets, torch.zeros_like(rel)
        if self.bidirectional:
            nb //= 2
            bucket, n = nb * (rel > 0).long(), rel.abs()
        else:
            n = (-rel).clamp(min=0)
        exact = nb // 2                                      # small distances get a bucket each
        log = exact + (torch.log(n.float().clamp(min=1) / exact)
                       / math.log(self.max_distance / exact) * (nb - exact)).long()
        bucket = bucket + torch.where(n < exact, n, log.clamp(max=nb - 1))
        bias = self.bias(bucket).permute(2, 0, 1)[None]      # (1, nh, T, S)
        return bias.contiguous()  # once here, not in every layer's attention kernel


def deberta_buckets(rel, span, max_distance):
    """DeBERTa's relative index of query - key distance rel: exact within span/2, log-spaced
    beyond, shifted into [0, 2*span) rows of the relative embedding table."""
    mid = span // 2
    far = rel.abs().clamp(min=mid - 1).float()                # |rel| < mid never takes this branch
    log = torch.ceil(torch.log(far / mid) / math.log((max_distance - 1) / mid) * (mid - 1)) + mid
    bucket = torch.where(rel.abs() <= mid, rel, (log * rel.sign()).long())
    return (bucket + span).clamp(0, 2 * span - 1)


class Disentangled(Position):
    """DeBERTa's disentangled attention (He et al. 2020, arXiv:2006.03654): content-to-position
    q_i·Kr[idx(i,j)] plus position-to-content k_j·Qr[idx(i,j)], Kr and Qr the normed relative
    embeddings through each layer's own key and query projections, scaled like q·k."""
    key = "rel_embeddings"

    def __init__(self, cfg: Config, width: int):
        super().__init__(cfg, width)
        self.span, self.max_distance = cfg.rel_buckets, cfg.rel_max_distance
        self.weight = nn.Parameter(torch.randn(2 * cfg.rel_buckets, cfg.d_model) * cfg.init_std)
        self.norm = NORMS[cfg.norm](cfg.d_model, cfg)

    @classmethod
    def check(cls, cfg):
        if cfg.kv_heads != cfg.n_head or cfg.attn_gate or cfg.rel_buckets < 2 or (
                cfg.rel_max_distance - 1 <= cfg.rel_buckets // 2):
            raise ValueError(f"disentangled attention needs n_kv_head = n_head, no attn_gate, "
                             f"rel_buckets={cfg.rel_buckets} >= 2 and rel_max_distance="
                             f"{cfg.rel_max_distance} > rel_buckets/2 + 1")

    def score_bias(self, qpos, kpos):  # the normed table and each (query, key) pair's row in it
        rel = qpos[:, None] - kpos[None, :]                                   # (T, S)
        return self.norm(self.weight), deberta_buckets(rel, self.span, self.max_distance)

    def layer_bias(self, bias, attn, q, k):
        (R, idx), (B, nh, T, hs), S = bias, q.shape, k.shape[2]
        Qr = attn.q_proj(R).view(1, -1, nh, hs).transpose(1, 2)              # (1, nh, 2span, hs)
        Kr = attn.k_proj(R).view(1, -1, nh, hs).transpose(1, 2)
        index = idx.expand(B, nh, T, S)
        c2p = (q @ Kr.transpose(-1, -2)).gather(-1, index)                   # (B, nh, T, S)
        p2c = (k @ Qr.transpose(-1, -2)).gather(-1, index.transpose(-1, -2)).transpose(-1, -2)
        return (c2p + p2c) * attn.scale


def alibi_slopes(n):
    """ALiBi's head slopes 2^(-8i/n), i = 1..n, for n a power of two; otherwise those of the power
    of two below n, then every other slope of the power above (the paper's code)."""
    p = 2 ** math.floor(math.log2(n))
    slopes = [2 ** (-8 * i / p) for i in range(1, p + 1)]
    return slopes + alibi_slopes(2 * p)[0::2][:n - p] if p < n else slopes


class ALiBi(Position):
    """ALiBi (Press et al. 2021, arXiv:2108.12409): no position embedding; head h adds
    -m_h * (query position - key position) to its scores (-m_h * |distance| in encoders)."""
    key = "alibi"

    def __init__(self, cfg: Config, width: int):
        super().__init__(cfg, width)
        self.bidirectional = not cfg.causal
        slopes = torch.tensor(alibi_slopes(cfg.n_head))[:, None, None]       # (nh, 1, 1)
        self.register_buffer("slopes", slopes, persistent=False)

    def score_bias(self, qpos, kpos):
        dist = (qpos[:, None] - kpos[None, :]).float()                        # (T, S)
        return -(self.slopes * (dist.abs() if self.bidirectional else dist))[None]  # (1, nh, T, S)


class LayerOwnedBias(Position):
    """position: dynamic_bias. Each block-recurrent layer owns its bias (DynamicPositionBias)."""
    key = "layer_bias"

    @classmethod
    def check(cls, cfg):
        if not cfg.block_width:
            raise ValueError("position='dynamic_bias' is built into block-recurrent layers; set "
                             "block_width > 0 or pick another position")


POSITIONS = {"learned": LearnedPosition, "sinusoidal": SinusoidalPosition, "rope": RoPE,
             "relative_bias": RelativeBias, "disentangled": Disentangled, "alibi": ALiBi,
             "dynamic_bias": LayerOwnedBias, "none": Position}

# ----------------------------------------------------------------------------------------------
# 2. Building blocks: attention, its KV cache and its mask


class Context(NamedTuple):
    """What the layers of one mixer type read about the current call, built once per forward."""
    pos: torch.Tensor                  # (T,) absolute positions of the new tokens
    kpos: torch.Tensor                 # (S,) positions of the keys: pos itself, or the cache slots'
    causal: bool                       # a query sees no later key (decoders)
    decoding: bool = False             # attend over the cache (a call after the prefill)
    pad: torch.Tensor | None = None    # (B, 1, 1, S) bool, False = a padding key, never attended
    rope: tuple | None = None          # (cos, sin), each (T, rd)
    bias: object = None                # the position scheme's score_bias(pos, kpos)
    position: Position | None = None   # the scheme, which makes each layer's bias (layer_bias)
    memory: torch.Tensor | None = None  # (B, S, C) keys' source: encoder output, or EMD's states
    drops: torch.Tensor | None = None  # (2, B, blocks) (memory, states) dropped per row, block


class KVCache(nn.Module):
    """Static, preallocated keys and values of one attention layer, (B, nkv, S, hs). With `window`
    it is a ring buffer (position p in slot p % S) of window + chunk - 1 slots: a sliding-window
    layer keeps only the keys it can still see, plus room for a chunk of `chunk` tokens after the
    prefill (speculative verification) to be written without overwriting keys its first query
    reads. `static`: every call reads all S slots, those not yet written masked like padding, so
    a decode step has the same shapes at every position (torch.compile, CUDA graphs)."""

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, window=None, dtype=None,
                 device=None, chunk=1, static=False):
        super().__init__()
        self.slots = min(max_len, window + chunk - 1) if window else max_len
        self.window, self.static = window, static
        shape = (batch_size, n_kv_head, self.slots, head_dim)               # (B, nkv, S, hs)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("slot_ids", torch.arange(self.slots, device=device), persistent=False)
        if static:  # CUDA graphs replay on these very buffers: their addresses must not change
            torch._dynamo.mark_static_address(self.k)
            torch._dynamo.mark_static_address(self.v)

    def write(self, pos, k, v):       # pos: (T,) absolute positions; k, v: (B, nkv, T, hs)
        # a chunk after the prefill overwrites the keys of positions pos - S, which its first query
        # still reads unless they lie a whole window back; checked only where the ring wraps
        ring = self.window is not None and self.slots < self.window + len(pos) - 1
        if len(pos) > 1 and ring and int(pos[0]) > 0 and int(pos[-1]) >= self.slots:
            raise ValueError(f"a {len(pos)}-token chunk at position {int(pos[0])} would overwrite "
                             f"ring-buffer slots it still reads; prefill from position 0, then "
                             f"decode one token at a time (or set up the cache with chunk="
                             f"{len(pos)})")
        if len(pos) > self.slots:     # a prefill longer than the window keeps only its last slots
            pos, k, v = pos[-self.slots:], k[:, :, -self.slots:], v[:, :, -self.slots:]
        slot = pos % self.slots       # the identity unless this is a sliding-window layer
        self.k.index_copy_(2, slot, k.to(self.k.dtype))
        self.v.index_copy_(2, slot, v.to(self.v.dtype))

    def read(self, n):                # the first n slots (the written ones): (B, nkv, n, hs) each
        return self.k[:, :, :n], self.v[:, :, :n]

    def positions(self, pos):
        """The absolute position each slot a call at positions pos (T,) reads holds, once pos is
        written: (S,). Only the written slots are read, so a step costs O(length so far), not
        O(max_len); a static cache reads all slots, an unwritten one at a future position (slot
        s of a ring not yet filled: s), which causal masking hides."""
        if self.static:  # tensor arithmetic only: no position is read back to the host
            last = pos[-1]
            held = last - (last - self.slot_ids) % self.slots
            return torch.where(held < 0, held + self.slots, held)
        last = int(pos[-1])
        n = min(self.slots, last + 1)
        return last - (last - self.slot_ids[:n]) % self.slots

    def reorder(self, rows):          # beam search: row i now continues row rows[i]
        self.k.copy_(self.k.index_select(0, rows))
        self.v.copy_(self.v.index_select(0, rows))


def attention_mask(qpos, kpos, causal, window=None, pad=None, bias=None):
    """What attend() applies to the scores of queries at qpos (T,) over keys at kpos (S,), as
    (mask, is_causal). mask is bool (True = attend), (T, S), or with key padding pad (B, 1, 1, S)
    (B, 1, T, S); given a float bias (.., T, S) it is the bias with -inf where masked. It is None
    where nothing needs masking: every key is visible (an encoder without padding; one query after
    all the keys, none of them a window or more back, as in a ring buffer of at most `window`
    slots), or the mask is causal over the call's own keys, which the fused kernels apply
    themselves (is_causal)."""
    T, S = len(qpos), len(kpos)
    all_near = pad is None and (window is None or S <= window)   # no key can be `window` back
    if all_near and (not causal or T == 1):
        return bias, False
    if all_near and bias is None and qpos is kpos:
        return None, True
    keep = pad if pad is not None else True                                  # (B, 1, 1, S)
    if causal or window is not None:
        rel = kpos[None, :] - qpos[:, None]                                   # (T, S) key - query
        if causal:
            keep = keep & (rel <= 0)
        if window is not None:  # `window` keys: the query's own and those before (around) it
            keep = keep & (rel > -window if causal else rel.abs() < window)
    return (keep if bias is None else bias.masked_fill(~keep, float("-inf"))), False


def attend(q, k, v, mask=None, causal=False, scale=None, softcap=None, dropout=0.0):
    """softmax(q·kᵀ·scale [softcapped] + mask)·v. q: (B, nh, T, hs); k, v: (B, nkv, S, hs).
    mask: bool (True = attend) or float (added), from attention_mask; causal: no mask, and query i
    sees keys 0..i (the call's own tokens)."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)       # a position bias kept in fp32 under autocast
    if softcap is None:  # torch's fused kernels (flash on GPU where the mask allows)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=causal, scale=scale, enable_gqa=True)
    g = q.shape[1] // k.shape[1]      # repeat_kv: kv head h serves q heads h*g .. h*g+g-1
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-2, -1)) * scale                                     # (B, nh, T, S)
    s = softcap * torch.tanh(s / softcap)
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None and mask.dtype == torch.bool:
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    elif mask is not None:
        s = s + mask
    p = F.dropout(F.softmax(s.float(), dim=-1).type_as(q), dropout)
    return p @ v                                                              # (B, nh, T, hs)


class Attention(nn.Module):
    """Multi-head attention (arXiv:1706.03762) with GQA/MQA (arXiv:2305.13245), QK-norm, softcap,
    an output gate (Qiu et al. 2025, arXiv:2505.06708) and, in local_attn layers, a sliding window
    of `window` keys (Mistral, arXiv:2310.06825; Gemma 2/3)."""

    def __init__(self, cfg: Config, window=None):
        super().__init__()
        self.nh, self.nkv, self.hs, self.window = cfg.n_head, cfg.kv_heads, cfg.hs, window
        self.gated = cfg.attn_gate    # q_proj then yields [q_h | gate_h] per head (HF Qwen3-Next)
        q_out = self.nh * self.hs * (2 if self.gated else 1)
        self.q_proj = nn.Linear(cfg.d_model, q_out, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, self.nkv * self.hs, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, self.nkv * self.hs, bias=cfg.bias)
        self.o_proj = nn.Linear(self.nh * self.hs, cfg.d_model, bias=cfg.bias)
        self.q_norm = NORMS[cfg.norm](self.hs, cfg) if cfg.qk_norm else nn.Identity()
        self.k_norm = NORMS[cfg.norm](self.hs, cfg) if cfg.qk_norm else nn.Identity()
        self.scale = cfg.attn_scale or self.hs ** -0.5
        self.softcap, self.dropout = cfg.attn_softcap, cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, ctx: Context, cache=None):                           # x: (B, T, C)
        B, T, _ = x.shape
        qg = self.q_proj(x).view(B, T, self.nh, -1)                   # (B, T, nh, hs or 2*hs)
        q, gate = qg[..., :self.hs], qg[..., self.hs:]                # gate empty unless gated
        q = self.q_norm(q).transpose(1, 2)                            # (B, nh, T, hs)
        if ctx.rope is not None:
            q = apply_rope(q, *ctx.rope)
        k, v, mask, causal = self.keys_and_mask(x, q, ctx, cache)     # (B, nkv, S, hs) each
        dropout = self.dropout if self.training else 0.0
        y = attend(q, k, v, mask, causal, self.scale, self.softcap, dropout)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hs)        # (B, T, nh*hs)
        if self.gated:
            y = y * torch.sigmoid(gate.reshape(B, T, -1))
        return self.resid_drop(self.o_proj(y))

    def project_kv(self, src, rope=None):                             # src: (B, S, C)
        B, S, _ = src.shape
        k = self.k_norm(self.k_proj(src).view(B, S, self.nkv, self.hs)).transpose(1, 2)
        v = self.v_proj(src).view(B, S, self.nkv, self.hs).transpose(1, 2)
        return (k if rope is None else apply_rope(k, *rope)), v       # (B, nkv, S, hs) each

    def keys_and_mask(self, x, q, ctx, cache):
        """The keys and values the queries attend, and the mask. This call's keys are written to
        the cache; decoding then reads every slot written so far (ctx.kpos says which positions)."""
        k, v = self.project_kv(x if ctx.memory is None else ctx.memory, ctx.rope)  # (B, nkv, T, hs)
        if cache is not None:
            cache.write(ctx.pos, k, v)
            if ctx.decoding:
                k, v = cache.read(len(ctx.kpos))                      # (B, nkv, S, hs)
        bias = None if ctx.bias is None else ctx.position.layer_bias(ctx.bias, self, q, k)
        return k, v, *attention_mask(ctx.pos, ctx.kpos, ctx.causal, self.window, ctx.pad, bias)


class CrossKV:
    """A decoder layer's cross-attention keys and values, from the encoder output at prefill."""
    k = v = None

    def store(self, k, v):
        self.k, self.v = k, v


class CrossAttention(Attention):
    """Decoder-to-encoder attention (arXiv:1706.03762): keys and values come from the encoder
    output, computed once per generation and then read from the cache."""

    def keys_and_mask(self, x, q, ctx, cache):
        if cache is not None and ctx.decoding:
            k, v = cache.k, cache.v
        else:
            k, v = self.project_kv(ctx.memory)                        # (B, nkv, S, hs)
            if cache is not None:
                cache.store(k, v)
        return k, v, *attention_mask(ctx.pos, ctx.kpos, False, pad=ctx.pad)


# ----------------------------------------------------------------------------------------------
# 2. Building blocks: Block-Recurrent Transformer (Hutchins et al. 2022, arXiv:2203.07852).
# Tokens come in blocks of block_width; each sees its own block up to itself and the whole previous
# block, which may come from the previous call (XL memory). With compress_factor c, the blocks
# before that are kept too, mean-pooled c:1 into compressed slots (Compressive Transformer).
# Recurrent layers also carry n_states state vectors: tokens read the states of the block's start;
# after the block, the states attend to themselves and to its tokens and gate into their next value.


class BlockMemory:
    """What a block-recurrent layer carries from one call to the next: keys/values (and positions)
    from the previous block on, the last compress_slots compressed slots (keys, values, first
    positions); recurrent layers add their states and the current block's tokens."""
    k = v = pos = ck = cv = cpos = states = block_k = block_v = block_pos = None

    def store(self, k, v, pos):                 # the keys the next call's first token still sees
        self.k, self.v, self.pos = k, v, pos

    def store_compressed(self, ck, cv, cpos, slots):
        """Append new compressed slots to the carried ones, keep the last `slots`; return all."""
        if self.ck is not None:
            ck, cv, cpos = (torch.cat((self.ck, ck), 2), torch.cat((self.cv, cv), 2),
                            torch.cat((self.cpos, cpos)))
        self.ck, self.cv, self.cpos = ck[:, :, -slots:], cv[:, :, -slots:], cpos[-slots:]
        return ck, cv, cpos

    def store_states(self, states, k, v, pos):  # the states, and the open block's keys so far
        self.states, self.block_k, self.block_v, self.block_pos = states, k, v, pos

    def detach(self):  # truncated backprop between training segments
        for name in ("k", "v", "ck", "cv", "states", "block_k", "block_v"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).detach())


class DynamicPositionBias(nn.Module):
    """A per-head attention bias from an MLP over the key distance (dynamic position bias,
    CrossFormer, Wang et al. 2021, arXiv:2108.00154), on log distances as Swin v2 has them
    (arXiv:2111.09883), so a compressed slot's fractional distance gets a bias too."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, cfg.pos_bias_dim), nn.SiLU(),
                                 nn.Linear(cfg.pos_bias_dim, cfg.n_head))

    def forward(self, dist):                  # dist: (T, S) query - key position, >= 0 if attended
        d, index = dist.clamp(min=0).unique(return_inverse=True)  # the MLP runs once per distance
        d = torch.log1p(d)[:, None].type_as(self.mlp[0].weight)   # distances stay exact in fp32
        return self.mlp(d)[index].permute(2, 0, 1)[None]          # (1, nh, T, S)


class BlockAttention(Attention):
    """Block-local causal attention with the previous block as memory, older blocks compressed."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.width, self.c, self.slots = cfg.block_width, cfg.compress_factor, cfg.compress_slots
        self.pos_bias = DynamicPositionBias(cfg) if cfg.position == "dynamic_bias" else None

    def keys_and_mask(self, x, q, ctx, cache):
        w, qpos = self.width, ctx.pos[:, None]                               # qpos: (T, 1)
        k, v = self.project_kv(x, ctx.rope)                                  # (B, nkv, T, hs)
        kpos = ctx.pos
        if cache is not None and cache.k is not None:                        # the XL memory
            k, v, kpos = (torch.cat((cache.k, k), 2), torch.cat((cache.v, v), 2),
                          torch.cat((cache.pos, kpos)))
        old = kpos < (int(ctx.pos[-1]) + 1) // w * w - w   # what the next call's first token drops
        mask = (kpos <= qpos) & (kpos // w >= qpos // w - 1)                 # (T, S)
        at = kpos.float()                                                    # where each key sits
        if self.c:  # slots before a query's previous block: the last compress_slots of them
            ck, cv, cpos = self.compress(k[:, :, old], v[:, :, old], kpos[old])
            if cache is not None:
                ck, cv, cpos = cache.store_compressed(ck, cv, cpos, self.slots)
            edge = (qpos // w - 1) * w
            seen = (cpos < edge) & (cpos >= edge - self.slots * self.c)
            mask = torch.cat((seen, mask), 1)                                # (T, Sc + S)
            at = torch.cat((cpos + (self.c - 1) / 2, at))    # a slot sits at its tokens' mean
        if cache is not None:
            cache.store(k[:, :, ~old], v[:, :, ~old], kpos[~old])
        if self.c:
            k, v, kpos = torch.cat((ck, k), 2), torch.cat((cv, v), 2), torch.cat((cpos, kpos))
        if ctx.drops is not None:  # memory_dropout: hide the whole memory of a row's block
            qb = ctx.pos // w                                                # (T,)
            hidden = ctx.drops[0][:, qb - qb[0], None] & (kpos // w < qb[:, None])   # (B, T, S)
            mask = mask & ~hidden[:, None]                                   # (B, 1, T, S)
        if self.pos_bias is not None:  # a float mask: the bias, and -inf where masked
            mask = self.pos_bias(qpos - at).masked_fill(~mask, float("-inf"))
        return k, v, mask, False

    def compress(self, k, v, kpos):
        """Mean-pool keys/values c:1 (one of Rae et al. 2019's compression functions,
        arXiv:1911.05507) -> (B, nkv, n, hs) twice and each slot's first position (n,)."""
        n = len(kpos) // self.c            # whole groups: a call without cache may start mid-group
        cut = len(kpos) - n * self.c
        ck, cv = (t[:, :, cut:].unflatten(2, (n, self.c)).mean(3) for t in (k, v))
        return ck, cv, kpos[cut::self.c]


class StateGate(nn.Module):
    """How new state content z enters the states: fixed (learned constant gates) or LSTM-style."""

    def __init__(self, cfg: Config):
        super().__init__()
        C, self.lstm = cfg.d_model, cfg.state_gate == "lstm"
        self.z = nn.Linear(C, C)
        no_gate = (nn.Identity(), nn.Identity())
        self.i, self.f = (nn.Linear(C, C), nn.Linear(C, C)) if self.lstm else no_gate
        self.i_bias = nn.Parameter(torch.full((C,), -1.0))              # input gate mostly shut
        self.f_bias = nn.Parameter(torch.full((C,), cfg.state_forget_bias))

    def forward(self, state, h):                                        # (B, N, C) each
        if self.lstm:   # c' = sigmoid(f) c + sigmoid(i) tanh(z)
            z, i, f = torch.tanh(self.z(h)), self.i(h) + self.i_bias, self.f(h) + self.f_bias
        else:           # c' = sigmoid(b_f) c + sigmoid(b_i) z
            z, i, f = self.z(h), self.i_bias, self.f_bias
        return torch.sigmoid(f) * state + torch.sigmoid(i) * z


class RecurrentAttention(BlockAttention):
    """A recurrent layer: block-local self-attention plus attention to the state vectors (token
    path), and the state update at each block's end (state path)."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        C, hidden = cfg.d_model, self.nh * self.hs
        self.init_states = nn.Parameter(torch.randn(cfg.n_states, C) * cfg.init_std)
        self.state_norm, self.state_norm_2 = NORMS[cfg.norm](C, cfg), NORMS[cfg.norm](C, cfg)
        self.q_state = nn.Linear(C, hidden, bias=cfg.bias)        # queries of the states
        self.o_read = nn.Linear(hidden, C, bias=cfg.bias)         # tokens' reading of the states
        self.o_self = nn.Linear(hidden, C, bias=cfg.bias)         # states' reading of themselves
        self.o_tokens = nn.Linear(hidden, C, bias=cfg.bias)       # states' reading of the block
        self.state_ffn = FFNS[cfg.ffn](cfg)
        self.gate_1, self.gate_2 = StateGate(cfg), StateGate(cfg)

    def heads(self, t):                                     # (B, L, nh*hs) -> (B, nh, L, hs)
        return t.view(t.shape[0], t.shape[1], -1, self.hs).transpose(1, 2)

    def forward(self, x, ctx: Context, cache=None):                           # x: (B, T, C)
        B, T, _ = x.shape
        y = super().forward(x, ctx, cache)                                     # block-local
        carried = cache is not None and cache.states is not None
        states = cache.states if carried else self.init_states.expand(B, -1, -1)
        q = self.heads(self.q_proj(x))                                         # (B, nh, T, hs)
        k, v = self.project_kv(x)                                              # no RoPE here
        kpos = ctx.pos
        if cache is not None and cache.block_k is not None:   # the current block's earlier tokens
            k, v = torch.cat((cache.block_k, k), 2), torch.cat((cache.block_v, v), 2)
            kpos = torch.cat((cache.block_pos, kpos))
        reads, w = [], self.width
        for b in torch.unique_consecutive(ctx.pos // w).tolist():             # blocks in order
            rows = (ctx.pos // w == b).nonzero().flatten()
            if ctx.drops is not None and int(ctx.pos[rows[0]]) % w == 0:
                # state_dropout: a dropped row's block reads the initial states
                drop = ctx.drops[1][:, b - int(ctx.pos[0]) // w, None, None]
                states = torch.where(drop, self.init_states, states)
            sk, sv = self.project_kv(self.state_norm(states))                  # (B, nkv, N, hs)
            reads.append(attend(q[:, :, rows], sk, sv, scale=self.scale))
            if int(ctx.pos[rows[-1]]) % w == w - 1:                            # block complete
                in_block = kpos // w == b
                states = self.update(states, k[:, :, in_block], v[:, :, in_block])
        read = torch.cat(reads, 2).transpose(1, 2).reshape(B, T, -1)
        if cache is not None:
            last = int(ctx.pos[-1])
            open_block = (kpos // w == last // w) & (last % w != w - 1)
            cache.store_states(states, k[:, :, open_block], v[:, :, open_block], kpos[open_block])
        return y + self.resid_drop(self.o_read(read))

    def update(self, states, bk, bv):
        """States attend to themselves and to one block's keys/values, then gate; then an FFN."""
        h = self.state_norm(states)
        q = self.heads(self.q_state(h))
        sk, sv = self.project_kv(h)
        z = (self.o_self(attend(q, sk, sv, scale=self.scale).transpose(1, 2).flatten(2))
             + self.o_tokens(attend(q, bk, bv, scale=self.scale).transpose(1, 2).flatten(2)))
        states = self.gate_1(states, z)
        return self.gate_2(states, self.state_ffn(self.state_norm_2(states)))


# ----------------------------------------------------------------------------------------------
# 2. Building blocks: Gated DeltaNet (Yang et al. 2024, arXiv:2412.06464), as HF Qwen3-Next has it.
# Per value head a state S (dk, dv) is decayed, corrected toward v along k, and read by q:
#     S <- exp(g_t) S;   S <- S + k_t (beta_t (v_t - S^T k_t))^T;   o_t = S^T q_t


def delta_rule_recurrent(q, k, v, g, beta, S):
    """The recurrence itself, one step per token (decoding). q, k: (B, H, T, dk); v: (B, H, T, dv);
    g, beta: (B, H, T); S: (B, H, dk, dv) fp32. Returns o (B, H, T, dv) and the new S."""
    out = []
    for t in range(q.shape[2]):
        S = S * g[:, :, t, None, None].exp()
        kt = k[:, :, t]                                                       # (B, H, dk)
        u = beta[:, :, t, None] * (v[:, :, t] - (S * kt[..., None]).sum(-2))  # (B, H, dv)
        S = S + kt[..., None] * u[..., None, :]
        out.append((S * q[:, :, t, :, None]).sum(-2))                         # (B, H, dv)
    return torch.stack(out, dim=2), S


def delta_rule_chunked(q, k, v, g, beta, S, chunk):
    """The same recurrence in parallel over chunks of L tokens, O(T L) (training and prefill).
    Within a chunk with cumulative decay G_i and start state S0, the new values U solve
        (I + Lo) U = beta*V - (beta*e^G*K) S0,   Lo[i,j] = beta_i e^(G_i-G_j) k_i.k_j  (j < i),
    then o_i = e^(G_i) S0^T q_i + sum_{j<=i} e^(G_i-G_j) (q_i.k_j) u_j; S carries to the next."""
    B, H, T, dk = k.shape
    pad = -T % chunk                                              # zero-pad T to whole chunks
    q, k, v = (F.pad(x, (0, 0, 0, pad)).unflatten(2, (-1, chunk)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)).unflatten(2, (-1, chunk)) for x in (g, beta))  # (B, H, n, L)
    G = g.cumsum(-1)                                                          # (B, H, n, L)
    decay = (G[..., :, None] - G[..., None, :]).tril().exp().tril()  # (.., L, L) e^(Gi-Gj), j <= i
    kb = k * beta[..., None]
    lower = (kb @ k.transpose(-1, -2) * decay).tril(-1)                       # Lo
    eye = torch.eye(chunk, device=q.device)
    solve = lambda rhs: torch.linalg.solve_triangular(eye + lower, rhs, upper=False,
                                                      unitriangular=True)
    w_v, w_k = solve(v * beta[..., None]), solve(kb * G[..., None].exp())     # (.., L, dv), dk
    qk = q @ k.transpose(-1, -2) * decay                          # (B, H, n, L, L) causal, self in
    q_in = q * G[..., None].exp()                                 # reads S0 decayed to step i
    last = G[..., -1:]                                            # (B, H, n, 1) the chunk's decay
    k_out = (k * (last - G)[..., None].exp()).transpose(-1, -2)   # (B, H, n, dk, L) writes, decayed
    # unbind, not [:, :, c]: backward then stacks n slices once instead of adding n zero tensors
    out = []
    chunks = zip(*(t.unbind(2) for t in (w_v, w_k, q_in, qk, k_out, last.exp())))
    for w_vc, w_kc, q_c, qk_c, k_c, last_c in chunks:
        u = w_vc - w_kc @ S                                                   # (B, H, L, dv)
        out.append(q_c @ S + qk_c @ u)
        S = S * last_c[..., None] + k_c @ u
    return torch.cat(out, dim=2)[:, :, :T], S


class DeltaNetState(nn.Module):
    """A Gated DeltaNet layer's O(1) decoding state: the last dn_conv-1 conv inputs and S (fp32)."""

    def __init__(self, batch_size, cfg: Config, dtype=None, device=None):
        super().__init__()
        nk, nv, dk, dv = cfg.dn_heads, cfg.dn_nv, cfg.dn_head_dim, cfg.dn_dv
        conv = torch.zeros(batch_size, 2 * nk * dk + nv * dv, cfg.dn_conv - 1, dtype=dtype,
                           device=device)
        self.register_buffer("conv", conv, persistent=False)                 # (B, Cqkv, K-1)
        S = torch.zeros(batch_size, nv, dk, dv, device=device)
        self.register_buffer("S", S, persistent=False)                       # (B, nv, dk, dv)

    def write(self, qkv, S):          # qkv: (B, Cqkv, K-1 + T) conv inputs, the last K-1 kept
        self.conv.copy_(qkv[..., qkv.shape[-1] - self.conv.shape[-1]:])
        self.S.copy_(S)

    def reorder(self, rows):          # beam search: row i now continues row rows[i]
        self.conv.copy_(self.conv.index_select(0, rows))
        self.S.copy_(self.S.index_select(0, rows))


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet mixer: conv-mixed q/k/v, L2-normed q/k, gated delta rule, gated RMSNorm."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.nk, self.nv, self.dk, self.dv = cfg.dn_heads, cfg.dn_nv, cfg.dn_head_dim, cfg.dn_dv
        self.chunk = cfg.dn_chunk
        qk, vz = self.nk * self.dk, self.nv * self.dv
        self.split = [qk, qk, vz, vz, self.nv, self.nv]
        self.in_proj = nn.Linear(cfg.d_model, sum(self.split), bias=False)  # [q, k, v, z, b, a]
        conv_dim = sum(self.split[:3])                                       # depthwise, causal
        self.conv = nn.Conv1d(conv_dim, conv_dim, cfg.dn_conv, groups=conv_dim, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.nv).uniform_(1, 16).log())  # Mamba-2's decay
        self.dt_bias = nn.Parameter(torch.ones(self.nv))
        self.norm = RMSNorm(self.dv, cfg.norm_eps)
        self.out_proj = nn.Linear(self.nv * self.dv, cfg.d_model, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, ctx: Context, cache=None):                           # x: (B, T, C)
        B, T, _ = x.shape
        if ctx.pad is not None:  # padding projects to zero: nothing enters the conv or S (HF)
            x = torch.where(ctx.pad.view(B, T, 1), x, 0.0)
        q, k, v, z, b, a = self.in_proj(x).split(self.split, dim=-1)
        qkv = torch.cat((q, k, v), dim=-1).transpose(1, 2)                    # (B, Cqkv, T)
        fresh = cache is None or not ctx.decoding
        K = self.conv.kernel_size[0]
        past = torch.zeros_like(qkv[..., :1]).expand(-1, -1, K - 1) if fresh else cache.conv
        qkv = torch.cat((past, qkv), dim=-1)                                  # the conv's left side
        q, k, v = F.silu(self.conv(qkv)).transpose(1, 2).split(self.split[:3], dim=-1)
        r = self.nv // self.nk                                                # v heads per k head
        q, k = (t.float().view(B, T, self.nk, self.dk) for t in (q, k))
        q, k = (t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6) for t in (q, k))  # L2
        q, k = (t.repeat_interleave(r, dim=2).transpose(1, 2) for t in (q, k))  # (B, nv, T, dk)
        q = q * self.dk ** -0.5
        v = v.float().view(B, T, self.nv, self.dv).transpose(1, 2)            # (B, nv, T, dv)
        beta = torch.sigmoid(b.float()).transpose(1, 2)                       # (B, nv, T)
        g = (-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)).transpose(1, 2)
        S = torch.zeros(B, self.nv, self.dk, self.dv, device=x.device) if fresh else cache.S
        if T == 1:
            o, S = delta_rule_recurrent(q, k, v, g, beta, S)
        else:
            o, S = delta_rule_chunked(q, k, v, g, beta, S, self.chunk)
        if cache is not None:
            cache.write(qkv, S)
        o = self.norm(o.transpose(1, 2).to(x.dtype)) * F.silu(z.float().view(B, T, self.nv, -1))
        return self.resid_drop(self.out_proj(o.to(x.dtype).reshape(B, T, -1)))


MIXERS = {"attn": Attention, "local_attn": lambda cfg: Attention(cfg, window=cfg.sliding_window),
          "deltanet": GatedDeltaNet, "block_attn": BlockAttention, "recurrent": RecurrentAttention}

# ----------------------------------------------------------------------------------------------
# 2. Building blocks: feed-forward

ACTIVATIONS = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU(),
               "silu": nn.SiLU()}


class MLP(nn.Module):
    """Position-wise feed-forward: down(act(up(x)))."""

    def __init__(self, cfg: Config, width=None):
        super().__init__()
        width = width or cfg.ffn_dim
        self.up = nn.Linear(cfg.d_model, width, bias=cfg.ffn_biased)
        self.down = nn.Linear(width, cfg.d_model, bias=cfg.ffn_biased)
        self.act, self.drop = ACTIVATIONS[cfg.activation], nn.Dropout(cfg.dropout)

    def forward(self, x):                                            # (B, T, C)
        return self.drop(self.down(self.act(self.up(x))))


class GLU(nn.Module):
    """Gated linear unit FFN (Shazeer 2020, arXiv:2002.05202): silu: SwiGLU, gelu_tanh: GeGLU."""

    def __init__(self, cfg: Config, width=None):
        super().__init__()
        width = width or cfg.ffn_dim
        self.gate = nn.Linear(cfg.d_model, width, bias=cfg.ffn_biased)
        self.up = nn.Linear(cfg.d_model, width, bias=cfg.ffn_biased)
        self.down = nn.Linear(width, cfg.d_model, bias=cfg.ffn_biased)
        self.act, self.drop = ACTIVATIONS[cfg.activation], nn.Dropout(cfg.dropout)
        self.gate_up = None  # decoding.quantize: [gate; up] as one matrix, one int8 kernel call

    def forward(self, x):                                            # (B, T, C)
        if self.gate_up is None:
            g, u = self.gate(x), self.up(x)
        else:
            g, u = self.gate_up(x).chunk(2, dim=-1)                  # (B, T, F) each
        return self.drop(self.down(self.act(g) * u))


FFNS = {"mlp": MLP, "glu": GLU}

# ----------------------------------------------------------------------------------------------
# 2. Building blocks: mixture of experts. A router turns probs (N, E) into routing slots grouped by
# expert: each slot's token and weight, and the slots per expert. The experts' matrices are stacked
# (E, out, in), so each projection runs over all slots at once (a grouped matmul), with no Python
# loop over tokens; the weighted outputs are added back per token.


def token_choice(probs, cfg):
    """Each token picks its top-k experts (Shazeer et al. 2017, arXiv:1701.06538; Mixtral)."""
    w, idx = probs.topk(cfg.moe_top_k, dim=-1)                       # (N, k)
    if cfg.moe_renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    order = idx.flatten().argsort(stable=True)                       # (N*k,) slots by expert
    counts = torch.bincount(idx.flatten(), minlength=cfg.n_expert)   # (E,)
    return order // cfg.moe_top_k, w.flatten()[order], counts


def expert_choice(probs, cfg):
    """Each expert picks its top-capacity tokens (Zhou et al. 2022, arXiv:2202.09368). Not causal:
    whether a token is taken depends on every other token in the call, later ones included, which
    no one-token-at-a-time decoder can reproduce: setup_cache refuses it."""
    N, E = probs.shape
    cap = min(N, max(1, int(cfg.moe_capacity * N * cfg.moe_top_k / E)))
    w, tok = probs.t().topk(cap, dim=-1)                             # (E, cap)
    return tok.flatten(), w.flatten(), torch.full((E,), cap, device=probs.device)


ROUTERS = {"token_choice": token_choice, "expert_choice": expert_choice}  # -> tok, w, counts


def expert_linear(x, w, b, counts):
    """x (M, in) holds counts[e] rows for each expert e in turn; w (E, out, in), b (E, out) or
    None -> (M, out). One F.grouped_mm where torch takes the input (fp32/bf16/fp16 rows of whole
    16-byte units): a grouped GEMM kernel for bf16 on Hopper-class GPUs, torch's C++ loop
    elsewhere (on CPU no slower than this one); otherwise a Python loop over the experts."""
    w = w.to(x.dtype)                                 # autocast leaves grouped_mm's dtypes alone
    if x.dtype in (torch.float32, torch.bfloat16, torch.float16) and (
            x.shape[1] * x.element_size() % 16 == 0):
        y = F.grouped_mm(x, w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    else:
        y = torch.cat([xe @ we.T for xe, we in zip(x.split(counts.tolist()), w.unbind(0))])
    if b is not None:
        y = y + b.to(y.dtype).repeat_interleave(counts, dim=0, output_size=len(x))
    return y


def balance_loss(loads, n_expert):
    """Switch Transformer's load balance (Fedus et al. 2021, arXiv:2101.03961, eq. 4-6) over the
    routing of `loads`, a list of (slots per expert (E,), summed router probs (E,), tokens):
    E * sum_e f_e * P_e, f_e the slots per token routed to e (summing to k), P_e e's mean prob."""
    counts, prob_sum, n = (sum(t) for t in zip(*loads))
    return n_expert * (counts / n * prob_sum / n).sum()


class MoE(nn.Module):
    """Sparse mixture of expert FFNs (the `ffn` kind: mlp or glu) with an optional gated shared
    expert (Qwen3-Next) or n ungated ones (DeepSeekMoE, arXiv:2401.06066), which are run as one FFN
    n times as wide, as HF DeepseekV2 does: the same sum. After each forward, `aux_loss` holds the
    weighted router z-loss and load-balancing loss of that call, and `load` what balance_loss reads.
    The balance loss is Switch's per layer, summed; HF's Mixtral/Qwen loss pools every layer's
    routing into one f and one P (mixing expert e of different layers), which imported models
    match with moe_pool_balance: Transformer.forward then adds that pooled term instead."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        E, C, Fe = cfg.n_expert, cfg.d_model, cfg.moe_d_ff or cfg.ffn_dim
        self.router = nn.Linear(C, E, bias=False)
        param = lambda *shape: nn.Parameter(torch.randn(shape) * cfg.init_std)
        bias = lambda *shape: nn.Parameter(torch.zeros(shape)) if cfg.ffn_biased else None
        glu = cfg.ffn == "glu"
        self.gate, self.gate_bias = (param(E, Fe, C), bias(E, Fe)) if glu else (None, None)
        self.up, self.up_bias = param(E, Fe, C), bias(E, Fe)
        self.down, self.down_bias = param(E, C, Fe), bias(E, C)
        self.act, self.drop = ACTIVATIONS[cfg.activation], nn.Dropout(cfg.dropout)
        if cfg.moe_shared_d_ff or cfg.moe_n_shared:
            self.shared_expert = FFNS[cfg.ffn](cfg, cfg.moe_shared_d_ff or cfg.moe_n_shared * Fe)
        if cfg.moe_shared_d_ff:
            self.shared_gate = nn.Linear(C, 1, bias=False)
        self.aux_loss = torch.zeros(())

    def forward(self, x):                                            # (B, T, C)
        cfg, shape, x = self.cfg, x.shape, x.reshape(-1, x.shape[-1])  # (N, C)
        logits = self.router(x)                                      # (N, E)
        probs = F.softmax(logits.float(), dim=-1)
        tok, w, counts = ROUTERS[cfg.moe_router](probs, cfg)         # (M,), (M,), (E,)
        h = x[tok]                                                   # (M, C)
        a = expert_linear(h, self.up, self.up_bias, counts)          # (M, Fe)
        if self.gate is not None:                                    # GLU: act(gate h) * up h
            a = self.act(expert_linear(h, self.gate, self.gate_bias, counts)) * a
        else:
            a = self.act(a)
        h = expert_linear(a, self.down, self.down_bias, counts)      # (M, C)
        y = torch.zeros_like(x).index_add_(0, tok, (h * w[:, None].to(h.dtype)).to(x.dtype))
        y = self.drop(y)
        if cfg.moe_shared_d_ff:
            y = y + torch.sigmoid(self.shared_gate(x)) * self.shared_expert(x)
        elif cfg.moe_n_shared:
            y = y + self.shared_expert(x)
        self.load = (counts, probs.sum(0), len(x))
        balance = 0.0 if cfg.moe_pool_balance else balance_loss([self.load], cfg.n_expert)
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()   # router z-loss (ST-MoE)
        self.aux_loss = cfg.moe_aux_weight * balance + cfg.moe_z_weight * z
        return y.view(shape)

# ----------------------------------------------------------------------------------------------
# 3. Block and stack


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016, arXiv:1603.09382): drop a residual branch per sample."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):                                            # (B, T, C)
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """One residual block: token mixer then FFN, with pre-, post- or sandwich norms.

        pre:       x + mixer(norm(x))              post:  norm(x + mixer(x))
        sandwich:  x + post_norm(mixer(norm(x)))
    """

    def __init__(self, cfg: Config, layer_type: tuple):
        super().__init__()
        make_norm = lambda: NORMS[cfg.norm](cfg.d_model, cfg)
        self.post_ln = cfg.norm_placement == "post"
        self.norm_1, self.norm_2 = make_norm(), make_norm()
        sandwich = cfg.norm_placement == "sandwich"
        self.post_norm_1 = make_norm() if sandwich else nn.Identity()
        self.post_norm_2 = make_norm() if sandwich else nn.Identity()
        mixer, ffn = layer_type
        self.mixer = MIXERS[mixer](cfg)
        if cfg.cross_attention:  # between the mixer and the FFN, with a norm of its own
            self.norm_x, self.cross = make_norm(), CrossAttention(cfg)
            self.post_norm_x = nn.Identity()
        self.ffn = MoE(cfg) if ffn == "moe" else FFNS[cfg.ffn](cfg)
        self.drop_path = DropPath(cfg.drop_path)
        self.grad_checkpoint = cfg.grad_checkpoint

    def residual(self, x, norm, post_norm, f):                       # one branch; x: (B, T, C)
        # grad_checkpoint keeps only each branch's input for backward and recomputes the rest
        # there: per branch, not per block, so that backward holds one branch's activations at a
        # time, not a whole block's, for the cost of one more saved input per layer
        if self.grad_checkpoint and self.training:
            return checkpoint(self.branch, x, norm, post_norm, f, use_reentrant=False)
        return self.branch(x, norm, post_norm, f)

    def branch(self, x, norm, post_norm, f):
        if self.post_ln:
            return norm(x + self.drop_path(f(x)))
        return x + self.drop_path(post_norm(f(norm(x))))

    def forward(self, x, ctx: Context, cache=None, cross_ctx: Context | None = None, kv=None):
        """kv: the (B, T, C) states the mixer draws keys and values from, when not x (EMD)."""
        if kv is not None:
            ctx = ctx._replace(memory=kv if self.post_ln else self.norm_1(kv))
        x = self.residual(x, self.norm_1, self.post_norm_1, lambda h: self.mixer(h, ctx, cache))
        if cross_ctx is not None:
            cross = lambda h: self.cross(h, cross_ctx, cache.cross if cache is not None else None)
            x = self.residual(x, self.norm_x, self.post_norm_x, cross)
        return self.residual(x, self.norm_2, self.post_norm_2, self.ffn)


class ACT(nn.Module):
    """Adaptive Computation Time (Graves 2016, arXiv:1603.08983) as the Universal Transformer uses
    it (Dehghani et al. 2018, arXiv:1807.03819): each position accumulates halting probabilities
    over the depth steps; its output is the halting-weighted sum of its states, so once halted it
    stops changing. Every step still runs on every position (halted ones keep serving as keys), so
    a token's result never depends on how many steps other tokens took, and cached decoding equals
    a full forward."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.halt = nn.Linear(cfg.d_model, 1)
        self.threshold, self.weight = cfg.act_threshold, cfg.act_weight
        self.aux_loss = torch.zeros(())

    def forward(self, x, state, last):
        """Halting weights (B, T) of this step's output, from its input x; state = (total p,
        remainder, steps), each (B, T). A position halts once its total p *exceeds* the threshold
        (the UT's rule); the last step halts every one still running (weights sum to 1)."""
        total, rem, steps = state
        p = torch.sigmoid(self.halt(x).squeeze(-1).float())
        running = (total < 1).float()
        halts = running if last else ((total + p * running) > self.threshold).float() * running
        running = running - halts
        total = total + p * running
        rem = rem + halts * (1 - total)                 # the remainder R = 1 - (sum of earlier p)
        total = total + halts * rem
        steps = steps + running + halts
        self.aux_loss = self.weight * (steps + rem).mean()   # ponder cost N + R
        return p * running + halts * rem, (total, rem, steps)


# ----------------------------------------------------------------------------------------------
# 4. Model and heads


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None        # (B, T, V); None: a classify call, or fused (lm_logits)
    loss: torch.Tensor | None          # mean cross-entropy over targets != -1, or None
    aux_loss: torch.Tensor             # auxiliary losses (MoE balance, ACT ponder cost); 0 if none
    cls_logits: torch.Tensor | None = None  # (B, n_classes) when the config has cls_head


def check_inputs(ids, name="input_ids", **same_shape):
    """One-line ValueErrors for inputs of the wrong dtype or shape, where they enter the model;
    no values are read (no device sync). same_shape: tensors of ids' (B, T) shape."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int):
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a tensor of integer token ids (torch.long), got {got}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be (batch, time), got shape {tuple(ids.shape)}; pass one "
                         f"sequence as {name}[None]")
    for key, t in same_shape.items():
        if t is not None and t.shape != ids.shape:
            raise ValueError(f"{key} must have the shape of {name} {tuple(ids.shape)}, got "
                             f"{tuple(t.shape)}")
        integer = (torch.long,) if key == "targets" else (torch.long, torch.int)  # cross_entropy's
        if t is not None and key != "attention_mask" and t.dtype not in integer:
            raise ValueError(f"{key} must hold integers (torch.long), got {t.dtype}")


def check_ids(ids, vocab_size, what="input_ids"):
    """One-line ValueError unless every id is in [0, vocab_size). This reads the values (a device
    sync): call it once on a prompt or a data file, not in a training step."""
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        raise ValueError(f"{what} holds token id {int(ids[bad][0])}, outside the model's "
                         f"vocabulary [0, {vocab_size}); was it made by another tokenizer?")


CE_CHUNK = 1 << 23  # LinearCrossEntropy: logits per row block (32 MB in fp32)


class LinearCrossEntropy(torch.autograd.Function):
    """A training call's LM head and loss in one: the mean cross-entropy of softcap(h·Wᵀ + b)
    against targets (-1: ignored), in blocks of CE_CHUNK // V rows. Each block's gradients are
    taken in forward, while its softmax is at hand, and backward only scales them: no (N, V)
    tensor outlives its block (F.cross_entropy keeps an fp32 log-softmax for backward) and no
    matmul runs twice (Liger's fused linear cross-entropy, Hsu et al. 2024, arXiv:2410.10989).
    torch's F.linear_cross_entropy does this too, but rounds the loss to bf16 under autocast."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, softcap):
        """h (N, E), weight (V, E), bias (V,) or None, targets (N,) -> the loss (fp32)."""
        valid = targets >= 0
        count = valid.sum()
        share = valid / count.clamp_min(1)                  # (N,) each row's weight in the mean
        ctx.grads = [t is not None and t.requires_grad and torch.zeros_like(t, dtype=torch.float32)
                     for t in (h, weight, bias)]            # False: no gradient wanted
        dh, dw, db = ctx.grads
        loss, step = 0, max(1, CE_CHUNK // len(weight))
        for i in range(0, len(h), step):
            rows, hi = slice(i, i + step), h[i:i + step]
            z = F.linear(hi, weight, bias)                                    # (n, V)
            y = (z if softcap is None else softcap * torch.tanh(z / softcap)).float()
            lse = y.logsumexp(-1)                                             # (n,)
            t = targets[rows].clamp_min(0)[:, None]                           # (n, 1)
            loss = loss + ((lse - y.gather(1, t).squeeze(1)) * valid[rows]).sum()
            g = y.sub_(lse[:, None]).exp_()                     # softmax, over y's memory
            g.scatter_add_(1, t, torch.full_like(g[:, :1], -1.0))          # minus the one-hot
            g.mul_(share[rows, None])                                         # d loss / d logits
            if softcap is not None:                             # d cap·tanh(z/cap) / dz
                g.mul_(1 - torch.tanh(z.float() / softcap) ** 2)
            if db is not False:
                db += g.sum(0)
            g = g.to(z.dtype)                                   # autocast: as backward would
            if dh is not False:
                dh[rows] = g @ weight
            if dw is not False and g.dtype == torch.float32:
                dw.addmm_(g.t(), hi)      # in place: a (V, E) temporary costs more than this
            elif dw is not False:
                dw += g.t() @ hi
        ctx.dtypes = [t is not None and t.dtype for t in (h, weight, bias)]
        return loss / count

    @staticmethod
    @once_differentiable
    def backward(ctx, d_loss):
        grads, ctx.grads = ctx.grads, None                  # freed now, not with the graph
        return (*[g.mul_(d_loss).to(dt) if g is not False else None
                  for g, dt in zip(grads, ctx.dtypes)], None, None)


class Transformer(nn.Module):
    """Embeddings -> blocks laid out by layer_types -> final norm -> LM head."""

    def __new__(cls, cfg=None, *args, **kwargs):  # Transformer(cfg) dispatches on architecture
        if cls is Transformer and cfg is not None and cfg.architecture == "encoder_decoder":
            cls = EncoderDecoder
        return super().__new__(cls)

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.layer_types = layer_types(cfg)                    # [(mixer, ffn)] per layer
        self.mixer_types = [m for m, _ in self.layer_types]
        E = cfg.embed_dim or cfg.d_model                       # embedding width (ALBERT: E < C)
        self.wte = nn.Embedding(cfg.vocab_size, E)
        scheme = POSITIONS[cfg.position](cfg, E)
        self.add_module(scheme.key, scheme)                    # its own name: its weights' prefix
        if cfg.type_vocab_size:
            self.wtt = nn.Embedding(cfg.type_vocab_size, E)
        self.embed_norm = NORMS[cfg.norm](E, cfg) if cfg.embed_norm else nn.Identity()
        self.embed_proj = nn.Linear(E, cfg.d_model) if cfg.embed_dim else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        # layer i runs blocks[block_of[i]]: its own block, or its group's shared one (ALBERT)
        groups = cfg.layer_groups or cfg.n_layer
        self.block_of = [int(i / (cfg.n_layer / groups)) for i in range(cfg.n_layer)]
        self.blocks = nn.ModuleList(Block(cfg, self.layer_types[self.block_of.index(g)])
                                    for g in range(groups))
        self.norm_f = NORMS[cfg.norm](cfg.d_model, cfg) if cfg.final_norm else nn.Identity()
        self.head_transform = nn.Identity()
        if cfg.head_transform:  # BERT's MLM head: dense -> activation -> norm
            self.head_transform = nn.Sequential(
                nn.Linear(cfg.d_model, E), ACTIVATIONS[cfg.activation], NORMS[cfg.norm](E, cfg))
        self.lm_head = nn.Linear(E, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.cls_head:  # the sequence classifier (see classify)
            if not cfg.causal:
                self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
            self.cls = nn.Linear(cfg.d_model, cfg.n_classes, bias=not cfg.causal)
        if cfg.emd_steps:  # DeBERTa's absolute positions, read only by the enhanced mask decoder
            self.emd_pos = nn.Embedding(cfg.block_size, cfg.d_model)
        if cfg.depth_embedding == "sinusoidal":  # UT's coordinate embedding: position and step
            self.register_buffer("step_table", sinusoidal_table(cfg.n_layer, cfg.d_model),
                                 persistent=False)
            self.register_buffer("pos_table", sinusoidal_table(cfg.block_size, cfg.d_model),
                                 persistent=False)
        if cfg.depth_embedding == "learned":
            self.step_emb = nn.Embedding(cfg.n_layer, cfg.d_model)
        self.act = ACT(cfg) if cfg.act else None
        # modules whose aux_loss (set in their forward) joins the output's aux_loss
        moe = [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]
        self.aux_modules = moe + ([self.act] if cfg.act else [])
        self.init_weights()

    def init_weights(self):
        cfg = self.config
        self.apply(self._init_weights)
        if cfg.act:  # halting p starts at 1/n_layer: positions first run every step, then learn
            nn.init.constant_(self.act.halt.bias, -math.log(max(cfg.n_layer - 1, 1)))
        if cfg.scaled_residual_init:  # GPT-2: residual projections shrink with depth
            for name, p in self.named_parameters():
                if name.endswith(("o_proj.weight", "down.weight", "ffn.down")):  # ffn.down: MoE's
                    nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):  # matrices and tables (a position scheme's `weight` too): N(0, std)
        table = isinstance(m, Position) and isinstance(getattr(m, "weight", None), nn.Parameter)
        if isinstance(m, (nn.Linear, nn.Embedding)) or table:
            nn.init.normal_(m.weight, 0.0, self.config.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def position(self) -> Position:  # the scheme, registered under its own key (wpe, rope, ...)
        return getattr(self, POSITIONS[self.config.position].key)

    @classmethod
    def from_yaml(cls, path, **overrides):
        return cls(Config.from_yaml(path, **overrides))

    @staticmethod
    def from_pretrained(hf_dir):
        """A model from a HF-format directory (config.json + safetensors): see hf.py."""
        from hf import from_pretrained  # lazy: hf.py sits next to this file, which runs without it
        return from_pretrained(hf_dir)

    def get_num_params(self, non_embedding=False):
        """Parameter count (a tied head once); non_embedding drops token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            n -= sum(p.numel() for p in self.position.parameters()) if self.position.bounded else 0
            n -= self.emd_pos.weight.numel() if self.config.emd_steps else 0
        return n

    def forward(self, input_ids, targets=None, cache=None, input_pos=None, token_type_ids=None,
                attention_mask=None, cls_targets=None, memory=None,
                memory_mask=None) -> ModelOutput:
        """input_ids (B, T) -> ModelOutput(logits (B, T, V), loss, aux_loss, cls_logits).

        With `cache` (from setup_cache) the new tokens sit at `input_pos` (T,); a call starting at
        position 0 is a prefill, a later one attends over the cached keys. Encoders take
        token_type_ids (B, T) and attention_mask (B, T) with 1 = keep. With cls_head, cls_targets
        (B,) add the classifier's cross-entropy to the loss (NSP, SOP, classification); a call
        with cls_targets and no targets skips the LM head (logits None). A decoder with
        cross_attention reads `memory` (B, S, C), padding `memory_mask`.
        """
        cfg = self.config
        mask = attention_mask if cache is None else None  # with a cache it covers past tokens
        check_inputs(input_ids, targets=targets, token_type_ids=token_type_ids, attention_mask=mask)
        if cls_targets is not None and not cfg.cls_head:
            raise ValueError("cls_targets train the sequence classifier, which this config lacks; "
                             "set cls_head: true")
        x, h = self.hidden(input_ids, cache, input_pos, token_type_ids, attention_mask, memory,
                           memory_mask, mask_decoder=True)
        cls_logits = self.classify(x, attention_mask) if cfg.cls_head else None
        logits = loss = None
        if targets is not None or cls_targets is None:
            logits, loss = self.lm_logits(h, targets)
        if cls_targets is not None:
            loss = (0 if loss is None else loss) + F.cross_entropy(cls_logits.float(), cls_targets)
        aux = sum((m.aux_loss for m in self.aux_modules), torch.zeros((), device=x.device))
        loads = [m.load for m in self.aux_modules if isinstance(m, MoE)]
        if cfg.moe_pool_balance and loads:  # HF's balance: every MoE layer pooled (see MoE)
            aux = aux + cfg.moe_aux_weight * balance_loss(loads, cfg.n_expert)
        return ModelOutput(logits, loss, aux, cls_logits)

    def lm_logits(self, x, targets=None):
        """Final states x (B, T, C) -> (logits (B, T, V), mean cross-entropy over targets != -1,
        or None without targets). A training call (targets, grad on) whose vocabulary is wider than
        the head's input runs the head fused with its loss (LinearCrossEntropy): no (B, T, V)
        tensor is made whole or kept for backward, and logits is None. decoding.quantize's int8
        head runs unfused."""
        cfg, head = self.config, self.lm_head
        if cfg.head_input_scale is not None:
            x = x * cfg.head_input_scale
        h = self.head_transform(x)                                        # (B, T, E)
        if (targets is not None and torch.is_grad_enabled() and isinstance(head, nn.Linear)
                and head.out_features > head.in_features):
            return None, LinearCrossEntropy.apply(h.flatten(0, -2), head.weight, head.bias,
                                                  targets.reshape(-1), cfg.final_softcap)
        logits = head(h)                                                  # (B, T, V)
        if cfg.final_softcap is not None:
            logits = cfg.final_softcap * torch.tanh(logits / cfg.final_softcap)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().flatten(0, -2), targets.reshape(-1),
                                       ignore_index=-1)

    def classify(self, x, attention_mask=None):
        """Sequence logits (B, n_classes) from the final states x (B, T, C). An encoder pools its
        first token ([CLS]) through BERT's pooler tanh(W h), as NSP/SOP and fine-tuning do (Devlin
        et al. 2018); a causal decoder reads its last real token (the last 1 of attention_mask),
        the only one that has seen the whole text, with a bias-free matrix (HF's `score` in
        GPT2/LlamaForSequenceClassification)."""
        if not self.config.causal:
            return self.cls(torch.tanh(self.pooler(x[:, 0])))
        last = torch.full((len(x),), x.shape[1] - 1, device=x.device)            # (B,)
        if attention_mask is not None:  # right-padded rows: the position of each row's last 1
            last = (attention_mask.bool() * torch.arange(x.shape[1], device=x.device)).argmax(-1)
        return self.cls(x[torch.arange(len(x), device=x.device), last])

    def hidden(self, input_ids, cache=None, input_pos=None, token_type_ids=None,
               attention_mask=None, memory=None, memory_mask=None, mask_decoder=False):
        """Embeddings -> blocks -> final norm: the (B, T, C) states the classifier reads; with
        mask_decoder, also those the LM head reads (DeBERTa's enhanced mask decoder's, or the
        same) as a pair."""
        cfg, (B, T) = self.config, input_ids.shape
        pos = input_pos if input_pos is not None else torch.arange(T, device=input_ids.device)
        if cfg.enhanced_recurrence:
            x = self.enhanced_recurrence(input_ids, cache, pos, token_type_ids)
            if x is not None:
                return (x, x) if mask_decoder else x
        # a compiled call continues the cache without reading its position back (a host sync
        # would split the graph): compile only the one-token decode step, as generate does
        decoding = cache is not None and (torch.compiler.is_compiling() or int(pos[0]) > 0)
        keep, rows = None, pos
        if attention_mask is not None:
            keep = attention_mask.bool()                                     # (B, L)
            if cache is not None and not torch.compiler.is_compiling() and (
                    keep.shape[0] != B or keep.shape[1] <= int(pos[-1])):
                raise ValueError(f"with a cache, attention_mask covers every position so far: "
                                 f"({B}, {int(pos[-1]) + 1}) or longer, got {tuple(keep.shape)}")
            if cfg.causal:  # each row counts its own tokens: left padding shifts no position
                rows = (keep.cumsum(-1) - 1).clamp(min=0)[:, pos]
        x = self.embed(input_ids, rows, token_type_ids)                  # (B, T, C)
        ctx = {t: self.context(t, pos, cache, keep, decoding, rows) for t in set(self.mixer_types)}
        if self.training and (cfg.memory_dropout or cfg.state_dropout):  # a draw per row, block
            blocks = int(pos[-1]) // cfg.block_width - int(pos[0]) // cfg.block_width + 1
            p = torch.tensor([cfg.memory_dropout, cfg.state_dropout], device=x.device)
            drops = torch.rand(2, B, blocks, device=x.device) < p[:, None, None]
            ctx = {t: c._replace(drops=drops) for t, c in ctx.items()}
        cross = None
        if cfg.cross_attention:
            cross = self.cross_context(pos, decoding, memory, memory_mask)
        halting = [torch.zeros(B, T, device=x.device)] * 3 if self.act else None
        out = torch.zeros_like(x) if self.act else None          # ACT: halting-weighted states
        for i, b in enumerate(self.block_of):
            if cfg.depth_embedding != "none":
                x = x + self.depth_signal(i, rows)
            if self.act is not None:
                w, halting = self.act(x, halting, last=i == cfg.n_layer - 1)       # (B, T)
            kv = x                                             # the last block's input, for EMD
            x = self.blocks[b](x, ctx[self.mixer_types[i]], cache[i] if cache is not None else None,
                               cross)
            if self.act is not None:
                out = out + w[..., None].to(x.dtype) * x
        x = self.norm_f(out if self.act is not None else x)
        if not mask_decoder:
            return x
        h = self.mask_decoder(kv, pos, ctx[self.mixer_types[-1]], cross) if cfg.emd_steps else x
        return x, h                                # the classifier's states, the LM head's

    def enhanced_recurrence(self, input_ids, cache, pos, token_type_ids):
        """ERNIE-Doc (arXiv:2012.15688): a layer's memory is the layer above's from the block
        before, so a call spanning blocks runs them in turn, through a cache, and returns their
        states (B, T, C). A call within one block returns None, its layers' memories shifted."""
        w = self.config.block_width
        starts = ((pos[1:] % w == 0).nonzero().flatten() + 1).tolist()
        if not starts:
            if cache is not None and int(pos[0]) % w == 0:
                for low, high in zip(cache, cache[1:]):
                    low.store(high.k, high.v, high.pos)
            return None
        cache = cache if cache is not None else self.setup_cache(len(input_ids), 0)
        cuts = [0, *starts, len(pos)]
        types = lambda a, b: None if token_type_ids is None else token_type_ids[:, a:b]
        return torch.cat([self.hidden(input_ids[:, a:b], cache, pos[a:b], types(a, b))
                          for a, b in zip(cuts, cuts[1:])], 1)

    def mask_decoder(self, kv, pos, ctx, cross):
        """DeBERTa's enhanced mask decoder (He et al. 2020, sec. 3.2): the last block again over
        its input kv, emd_steps times, the queries from kv + absolute positions. -> (B, T, C)"""
        h = kv + self.emd_pos(pos)
        for _ in range(self.config.emd_steps):
            h = self.blocks[self.block_of[-1]](h, ctx, None, cross, kv)
        return self.norm_f(h)

    def context(self, mixer, pos, cache, keep, decoding, rows=None) -> Context:
        """What the layers of one mixer type read about this call: pos (T,) the positions of the
        new tokens (their cache slots), keep (B, L) which positions hold tokens (None: all), rows
        the positions each row's embeddings and rotary see (pos, or (B, T) in a padded batch).
        Attention layers (attn, local_attn) read their keys' positions (decoding: their cache's
        slots) and the position scheme's score bias; the others keep their own keys."""
        kpos, bias, pad, rows = pos, None, None, pos if rows is None else rows
        if mixer in ("attn", "local_attn"):
            if decoding:
                slots = cache[self.mixer_types.index(mixer)]
                kpos = slots.positions(pos)
                if slots.static:  # every slot is read: those not yet written are masked too
                    pad = (kpos <= pos[-1])[None, None, None, :]                # (1, 1, 1, S)
            bias = self.position.score_bias(pos, kpos)
        if keep is not None:
            held = keep[:, kpos][:, None, None, :]                               # (B, 1, 1, S)
            pad = held if pad is None else pad & held
        return Context(pos=pos, kpos=kpos, causal=self.config.causal,
                       decoding=decoding, pad=pad, rope=self.position.rotary(rows, mixer),
                       bias=bias, position=self.position)

    def cross_context(self, pos, decoding, memory, memory_mask) -> Context:
        """What cross-attention layers read: the encoder output (B, S, C) and its padding (B, S)."""
        if memory is None:
            raise ValueError("this decoder has cross-attention: pass memory= (the encoder output)")
        pad = None if memory_mask is None else memory_mask.bool()[:, None, None, :]
        return Context(pos=pos, kpos=torch.arange(memory.shape[1], device=pos.device), causal=False,
                       decoding=decoding, pad=pad, memory=memory)

    def depth_signal(self, step, pos):                           # -> (T, C), (B, T, C) or (C,)
        if self.config.depth_embedding == "learned":
            return self.step_emb.weight[step]
        return self.step_table[step] + self.pos_table[pos]

    def embed(self, input_ids, pos, token_type_ids=None):
        """Token (+ position, + token type) embeddings, normed and projected: (B, T, C). pos: (T,),
        or (B, T) where each row has its own positions. A compiled step skips the range check, which
        reads a position back (generate checks its whole range before the loop)."""
        cfg = self.config
        if cfg.positions_bounded and not torch.compiler.is_compiling() and (
                int(pos.max()) >= cfg.block_size):
            raise ValueError(f"position {int(pos.max())} is beyond block_size={cfg.block_size} "
                             f"(the position table's length); use a shorter input")
        x = self.wte(input_ids)                                          # (B, T, E)
        if cfg.embed_scale is not None:  # a tensor in the working dtype, as Gemma rounds it
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        table = self.position.table(pos)
        if table is not None:
            x = x + table.to(x.dtype)
        if cfg.type_vocab_size:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.wtt(types)
        return self.drop(self.embed_proj(self.embed_norm(x)))           # (B, T, C)

    # ------------------------------------------------------------------------------------------
    # 5. Inference: cache and generation

    def setup_cache(self, batch_size, max_len, dtype=None, device=None, chunk=1, static=False):
        """Per-layer decoding state for `max_len` positions: static KV caches (sliding-window
        layers hold only their window, as a ring buffer), DeltaNet states, block memories. chunk:
        the most tokens one call after the prefill brings (speculative verification); static: KV
        caches read every slot at every step (fixed shapes for torch.compile; see KVCache)."""
        p = self.wte.weight
        dtype, device, cfg = dtype or p.dtype, device or p.device, self.config
        if cfg.moe_router == "expert_choice" and any(f == "moe" for _, f in self.layer_types):
            raise ValueError("moe_router='expert_choice' is not causal (experts pick among all "
                             "tokens of a call), so cached decoding cannot route as training did; "
                             "sample from a token_choice model")
        kv = lambda window=None: KVCache(batch_size, cfg.kv_heads, max_len, cfg.hs, window, dtype,
                                         device, chunk, static)
        make = {"attn": kv, "local_attn": lambda: kv(cfg.sliding_window),
                "deltanet": lambda: DeltaNetState(batch_size, cfg, dtype, device),
                "block_attn": BlockMemory, "recurrent": BlockMemory}
        caches = [make[t]() for t in self.mixer_types]
        for c in caches if cfg.cross_attention else ():
            c.cross = CrossKV()  # a decoder layer's cross-attention K/V ride along with its cache
        return caches

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 min_p=None, repetition_penalty=1.0, stop_tokens=(), generator=None, callback=None,
                 compile=False):
        """Sample up to max_new_tokens after input_ids (B, T); returns (B, T + n) token ids.

        temperature 0 is greedy. Filters apply in the order top_k, top_p, min_p. A row stops at
        any of stop_tokens (later positions repeat the stop token). callback(ids (B,)) streams.
        input_ids may instead be a list of prompts (lists of ids) of any lengths: they decode as
        one left-padded batch, each row as it would alone, and the result is a list of lists (each
        prompt and its new tokens, up to its stop token). compile: torch.compile the one-token
        step over static caches (CUDA graphs on a GPU); it pays after the first call's compile.
        """
        cfg = self.config
        if cfg.architecture != "decoder_only":
            raise ValueError(f"generate() samples from decoder-only models; this one is "
                             f"{cfg.architecture}")
        check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
        prompts, keep = input_ids, None
        if isinstance(prompts, list):
            input_ids, keep = left_pad(prompts, max_new_tokens, self.wte.weight.device)
        check_inputs(input_ids)
        check_ids(input_ids, cfg.vocab_size)
        B, T = input_ids.shape
        if T > cfg.block_size:
            raise ValueError(f"prompt of {T} tokens exceeds the context of {cfg.block_size} "
                             f"tokens; shorten the prompt")
        if compile and any(t not in ("attn", "local_attn") for t in self.mixer_types):
            raise ValueError("compile=True compiles attention-only decoders (DeltaNet and "
                             "block-recurrent layers carry state it does not handle); drop it")
        # A position table ends at block_size: past it, as nanoGPT, each token re-encodes the last
        # block_size tokens, which all move one position down, so no cached key stays valid
        crop, n = cfg.block_size if cfg.positions_bounded else None, T + max_new_tokens
        if crop and keep is not None and n > crop:
            raise ValueError(f"a batch of prompts decodes within the position table's "
                             f"{crop} tokens: ask for at most {crop - T} new tokens")
        cache = self.setup_cache(B, min(n, crop) if crop else n, device=input_ids.device,
                                 static=compile)
        step = self.sampling_step(cache, crop, keep, compile, input_ids.is_cuda)
        seq = sample_loop(step, input_ids, max_new_tokens, temperature, generator,
                          repetition_penalty, stop_tokens, callback, top_k=top_k, top_p=top_p,
                          min_p=min_p)
        if keep is None:
            return seq
        return [row[T - len(p):].tolist()[:len(p) + first_stop(row[T:], stop_tokens)]
                for p, row in zip(prompts, seq)]

    def sampling_step(self, cache, crop, keep, compile, cuda):
        """step(seq, pos) -> next-token logits (B, V), for sample_loop: the tokens at positions pos
        through the cache, or past a position table's end (crop) the last crop tokens afresh.
        compile: the one-token step compiled; the prefill (several tokens) runs eagerly."""
        def step(seq, pos):
            if crop and int(pos[-1]) >= crop:
                return self(seq[:, -crop:]).logits[:, -1]
            return decode_step(self, seq[:, -len(pos):], pos, cache, keep)
        if not compile:
            return step
        fast = torch.compile(decode_step, mode="reduce-overhead" if cuda else None)

        def compiled(seq, pos):
            if len(pos) == 1 and (crop is None or int(pos[-1]) < crop):
                return fast(self, seq[:, -1:], pos, cache, keep)
            return step(seq, pos)
        return compiled


class EncoderDecoder(Transformer):
    """An encoder over the source and a decoder with cross-attention over the target
    (arXiv:1706.03762). Both stacks are Transformers sharing one token embedding;
    `Transformer(cfg)` builds this class when cfg.architecture is encoder_decoder."""

    def __init__(self, cfg: Config):
        nn.Module.__init__(self)
        self.config = cfg
        self.encoder = Transformer(stack_config(cfg, "encoder"))
        self.decoder = Transformer(stack_config(cfg, "decoder"))
        self.decoder.wte = self.encoder.wte
        if self.decoder.config.tie_embeddings:
            self.decoder.lm_head.weight = self.encoder.wte.weight

    def get_num_params(self, non_embedding=False):
        """Parameter count (the shared embedding and a tied head once); non_embedding drops the
        token table and both stacks' position tables."""
        n = sum(p.numel() for p in self.parameters())
        stacks = (self.encoder, self.decoder)
        tables = sum(s.get_num_params() - s.get_num_params(True) for s in stacks)
        return n - (tables - self.encoder.wte.weight.numel() if non_embedding else 0)  # wte twice

    def forward(self, input_ids, decoder_input_ids=None, targets=None, attention_mask=None,
                cache=None, input_pos=None, memory=None) -> ModelOutput:
        """Source input_ids (B, S) with padding attention_mask (B, S); decoder_input_ids (B, T) ->
        ModelOutput over the target. `memory` skips the encoder (cached generation passes it)."""
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder needs decoder_input_ids (the target, shifted "
                             "right)")
        check_inputs(decoder_input_ids, "decoder_input_ids", targets=targets)
        if memory is None:
            check_inputs(input_ids, attention_mask=attention_mask)
            memory = self.encoder.hidden(input_ids, attention_mask=attention_mask)   # (B, S, C)
        out = self.decoder(decoder_input_ids, targets, cache, input_pos, memory=memory,
                           memory_mask=attention_mask)
        enc_aux = sum((m.aux_loss for m in self.encoder.aux_modules),
                      torch.zeros((), device=memory.device))
        return out._replace(aux_loss=out.aux_loss + enc_aux)

    def setup_cache(self, batch_size, max_len, dtype=None, device=None, chunk=1, static=False):
        return self.decoder.setup_cache(batch_size, max_len, dtype, device, chunk, static)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 min_p=None, repetition_penalty=1.0, stop_tokens=(), generator=None, callback=None,
                 attention_mask=None):
        """Encode input_ids (B, S) once, then sample the target from decoder_start_token_id;
        returns (B, 1 + n) target ids, the start token first. Options as in Transformer.generate."""
        check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
        check_inputs(input_ids, attention_mask=attention_mask)
        check_ids(input_ids, self.config.vocab_size)
        B = input_ids.shape[0]
        check_room(self.decoder.config, 1, max_new_tokens)
        memory = self.encoder.hidden(input_ids, attention_mask=attention_mask)
        cache = self.setup_cache(B, 1 + max_new_tokens, device=input_ids.device)
        step = lambda seq, pos: self(None, seq[:, -len(pos):], attention_mask=attention_mask,
                                     cache=cache, input_pos=pos, memory=memory).logits[:, -1]
        start = torch.full((B, 1), self.config.decoder_start_token_id, dtype=torch.long,
                           device=input_ids.device)
        return sample_loop(step, start, max_new_tokens, temperature, generator,
                           repetition_penalty, stop_tokens, callback, top_k=top_k, top_p=top_p,
                           min_p=min_p)


ARCHITECTURES = {"decoder_only": Transformer, "encoder_only": Transformer,
                 "encoder_decoder": EncoderDecoder}

# ----------------------------------------------------------------------------------------------
# 5. Inference: the generation loop and the sampling ladder


def sample_loop(step, seq, max_new_tokens, temperature, generator, repetition_penalty, stop_tokens,
                callback, **filters):
    """Prefill `seq` (B, T) with step(seq, pos) -> next-token logits (B, V), the new tokens at
    positions pos being seq's last, then sample one token at a time; a row that emits a stop token
    repeats it. Returns (B, T + n). The output and the positions are allocated once: a step
    allocates nothing of its own."""
    B, T = seq.shape
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=seq.device)
    out[:, :T] = seq
    positions = torch.arange(T + max_new_tokens, device=seq.device)
    done = torch.zeros(B, dtype=torch.bool, device=seq.device)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=seq.device)
    logits = step(seq, positions[:T])
    for i in range(T, T + max_new_tokens):
        logits = apply_repetition_penalty(logits, out[:, :i], repetition_penalty)
        nxt = sample(logits, temperature, generator, **filters)                  # (B,)
        if len(stop):
            nxt = torch.where(done, out[:, i - 1], nxt)
            done |= torch.isin(nxt, stop)
        out[:, i] = nxt
        if callback is not None:
            callback(nxt)
        if i == T + max_new_tokens - 1 or (len(stop) and bool(done.all())):
            return out[:, :i + 1]
        logits = step(out[:, :i + 1], positions[i:i + 1])
    return out


def decode_step(model, ids, pos, cache, keep):
    """The next-token logits (B, V) after ids (B, T) at positions pos, through the cache: a
    generate step (what compile=True compiles) and a beam search step."""
    return model(ids, cache=cache, input_pos=pos, attention_mask=keep).logits[:, -1]


def left_pad(prompts, max_new_tokens, device):
    """A list of prompts (lists of ids) as one batch: ids (B, T) padded on the left, each row with
    its own first token (finite embeddings, nothing new for a repetition penalty to see), and keep
    (B, T + max_new_tokens), False at the padding: the attention_mask of every step."""
    if not prompts or not all(isinstance(p, (list, tuple)) and p for p in prompts):
        raise ValueError("a list of prompts must hold non-empty lists of token ids")
    if not all(isinstance(i, int) for p in prompts for i in p):
        raise ValueError("a list of prompts must hold lists of int token ids")
    T = max(map(len, prompts))
    ids = torch.tensor([[p[0]] * (T - len(p)) + list(p) for p in prompts], device=device)
    keep = torch.ones(len(prompts), T + max_new_tokens, dtype=torch.bool, device=device)
    for row, p in zip(keep, prompts):
        row[:T - len(p)] = False
    return ids, keep


def first_stop(new, stop_tokens):
    """How many of the new tokens (n,) to keep: up to and including the first stop token."""
    hits = [i for i, t in enumerate(new.tolist()) if t in stop_tokens]
    return hits[0] + 1 if hits else len(new)


def check_room(cfg, T, max_new_tokens):
    """The room a decode that cannot crop needs: T tokens (a prompt, an encoder-decoder's start
    token) and, where positions end at block_size, max_new_tokens more."""
    if T > cfg.block_size or (cfg.positions_bounded and T + max_new_tokens > cfg.block_size):
        raise ValueError(f"{T} + max_new_tokens={max_new_tokens} tokens exceed the context of "
                         f"{cfg.block_size} tokens; shorten the prompt or ask for fewer tokens")


def check_sampling(temperature, top_k, top_p, min_p, repetition_penalty):
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 or None = off)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p={min_p} must be in [0, 1]")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (1 = off)")


def top_k_filter(logits, k):          # keep the k largest logits
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus sampling (Holtzman et al. 2019): the smallest set with mass >= p. The mass is summed
    from the unlikeliest token up, which keeps it exact: a top-down cumsum reaches 1.0 early in
    fp32, and p = 1 would drop tokens. The tokens whose tail mass is <= 1 - p go; the top stays."""
    sorted_logits, idx = torch.sort(logits, dim=-1)                           # ascending
    drop = F.softmax(sorted_logits, dim=-1).cumsum(-1) <= 1 - p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))


def min_p_filter(logits, p):          # keep tokens with prob >= p * max prob
    probs = F.softmax(logits, dim=-1)
    return logits.masked_fill(probs < p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


LOGIT_FILTERS = {"top_k": top_k_filter, "top_p": top_p_filter, "min_p": min_p_filter}  # in order


def apply_repetition_penalty(logits, prev_ids, penalty):
    """CTRL's penalty (arXiv:1909.05858): seen tokens' logits are divided (> 0) or multiplied."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, -1, prev_ids)
    return logits.scatter(-1, prev_ids, torch.where(seen > 0, seen / penalty, seen * penalty))


def sampling_probs(logits, temperature=1.0, **filters):
    """logits (.., V) -> the probabilities sample() draws from (temperature > 0), (.., V) fp32."""
    logits = logits.float() / temperature
    for name, f in LOGIT_FILTERS.items():
        if filters.get(name):
            logits = f(logits, filters[name])
    return F.softmax(logits, dim=-1)


def sample(logits, temperature=1.0, generator=None, **filters):
    """logits (B, V) -> ids (B,). temperature 0 = argmax; filters top_k, top_p, min_p (None off)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, **filters)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# 6. Checkpoints (ours). HF-format directories: Transformer.from_pretrained, in hf.py


def save_checkpoint(path, model, **extra):
    """Write {"model", "config", **extra} atomically: a crash leaves the old file or none."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config), **extra},
               tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu", mmap=False):
    """torch.load with weights_only=True (never unpickles arbitrary objects); one-line errors.
    mmap: tensors are mapped from the file, read only when used."""
    if Path(path).is_dir():
        raise ValueError(f"checkpoint {path} is a directory; pass the checkpoint file in it "
                         f"(train.py writes {Path(path) / 'ckpt.pt'})")
    if not Path(path).is_file():
        raise ValueError(f"checkpoint {path} does not exist; pass the ckpt.pt that train.py wrote")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, bad pickle, foreign objects: not a usable checkpoint
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); "
                         f"re-save it or use another file") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not an anyformer checkpoint (no 'model' and 'config' entries)")
    return ckpt


def from_checkpoint(ckpt):
    """Rebuild the model a checkpoint dict (from load_checkpoint) describes, weights loaded."""
    cfg = Config.from_dict(ckpt["config"])
    model = ARCHITECTURES[cfg.architecture](cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not match its {cfg.architecture} config (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); was it written by another "
                         f"version?")
    return model


Transformer.from_checkpoint = staticmethod(from_checkpoint)

if __name__ == "__main__":  # python model.py configs/X.yaml: parameter count and one forward pass
    import sys
    try:
        cfg = Config.from_yaml(sys.argv[1]) if len(sys.argv) > 1 else Config()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    with torch.device("meta" if "--meta" in sys.argv else "cpu"):
        model = Transformer(cfg)
    print(f"{cfg.architecture}: {model.get_num_params() / 1e6:.2f}M parameters, "
          f"{model.get_num_params(non_embedding=True) / 1e6:.2f}M without embeddings")
    if "--meta" not in sys.argv:
        ids = torch.randint(0, cfg.vocab_size, (1, min(16, cfg.block_size)))
        kw = {"decoder_input_ids": ids} if cfg.architecture == "encoder_decoder" else {}
        print("logits", tuple(model(ids, **kw).logits.shape))
