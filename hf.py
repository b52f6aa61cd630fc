"""HF-format import and export: a directory written by transformers' save_pretrained (config.json
and safetensors) becomes a model.py Transformer (from_pretrained), and a Transformer whose config a
HF family expresses becomes such a directory (save_pretrained), for the 15 families of FAMILIES.

A family is three things, each kept so that an export (ours -> HF) can run them backwards:
  1. a config translation   HF config.json -> our Config fields            (*_config functions)
  2. a key table            {hf_template: our_template}, {} = a layer (or expert) index: a plain
                            dict, so the export inverts it as it is
  3. reshapes               small named functions for what renaming cannot do (transpose_conv1d,
                            split_qkv, stack_experts, ...), each with one obvious inverse
from_pretrained reads config.json, renames and reshapes the weights, checks their shapes against
the config, and loads them. Every failure is a one-line ValueError naming the file.
save_pretrained inverts each part: *_hf functions write config.json, UNDO undoes the reshapes in
reverse order, invert() turns a key table around. Which family: the first whose round trip (its
*_hf, then its import translation) gives back every field that takes effect in our config
(hf_config); a config no family expresses is a one-line ValueError naming the field.
A Hugging Face Hub model id (gpt2, org/name) stands for the directory hub_dir downloads it to once.
"""
import dataclasses
import http.client
import json
import math
import os
import re
import shutil
import string
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch

from model import Config, Transformer, layer_types, stack_config

# ----------------------------------------------------------------------------------------------
# 1. Config translation: HF config.json dict -> our Config fields

LAYER_TYPES = {"full_attention": "attn", "sliding_attention": "local_attn",
               "linear_attention": "deltanet"}
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}


def rope_fields(hf, rope):
    """Our rope_* fields from one rope_parameters entry (v5) or the old rope_theta/rope_scaling."""
    rope = rope or {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    out = {"rope_theta": rope["rope_theta"], "rope_scaling": "none" if kind == "default" else kind}
    if kind != "default":
        out["rope_factor"] = rope["factor"]
        out["rope_original_max_len"] = rope.get("original_max_position_embeddings",
                                                hf["max_position_embeddings"])
    if kind == "llama3":
        out["rope_low_freq_factor"] = rope["low_freq_factor"]
        out["rope_high_freq_factor"] = rope["high_freq_factor"]
    if kind == "yarn":
        if not rope.get("truncate", True):
            raise ValueError("YaRN truncate=false (untruncated ramp edges) is not supported")
        f, m, m_all = rope["factor"], rope.get("mscale"), rope.get("mscale_all_dim")
        mscale = lambda k: 0.1 * k * math.log(f) + 1 if f > 1 else 1.0  # HF's get_mscale
        out.update(rope_beta_fast=rope.get("beta_fast") or 32.0,
                   rope_beta_slow=rope.get("beta_slow") or 1.0,
                   rope_attn_factor=rope.get("attention_factor")
                   or (mscale(m) / mscale(m_all) if m and m_all else None))
    return out


def window(hf):
    """The sliding window, or None. HF writes "no window" as null, and some configs as -1 or 0
    (which HF 5.23 would turn into a mask that hides every key); Qwen3's use_sliding_window=false
    switches the window off whatever its value. A window >= max_position_embeddings is kept:
    within the context it equals no window, and HF applies it as given."""
    w = hf.get("sliding_window")
    if w is None or w <= 0 or hf.get("use_sliding_window") is False:
        return None
    return w


def gpt2_config(hf):
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                         "are not supported")
    return dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                n_head=hf["n_head"], d_model=hf["n_embd"], d_ff=hf.get("n_inner"),
                norm_eps=hf["layer_norm_epsilon"],
                activation=ACTIVATIONS[hf["activation_function"]],
                attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
                tie_embeddings=hf.get("tie_word_embeddings", True))


def llama_config(hf):
    """LLaMA and its descendants: Mistral (window everywhere), Qwen3 (QK-norm), Gemma 2/3."""
    rope = hf.get("rope_parameters") or {}
    act = hf.get("hidden_activation") or hf["hidden_act"]
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    cfg = dict(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
               n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
               n_kv_head=hf.get("num_key_value_heads"), d_model=hf["hidden_size"],
               head_dim=hf.get("head_dim"), d_ff=hf["intermediate_size"], norm="rmsnorm",
               norm_eps=hf["rms_norm_eps"], position="rope", bias=hf.get("attention_bias", False),
               ffn_bias=hf.get("mlp_bias", False), ffn="glu", activation=ACTIVATIONS[act],
               tie_embeddings=hf.get("tie_word_embeddings", True), sliding_window=window(hf),
               rope_fraction=partial)
    if "full_attention" in rope:  # Gemma 3: one RoPE per layer type
        cfg.update(rope_fields(hf, rope["full_attention"]),
                   rope_local_theta=rope["sliding_attention"]["rope_theta"])
    else:
        cfg.update(rope_fields(hf, rope), rope_local_theta=hf.get("rope_local_base_freq"))
    types = [LAYER_TYPES[t] for t in hf.get("layer_types") or []]
    if cfg["sliding_window"] is None:  # HF builds no window mask then: its sliding layers are full
        types = ["attn" if t == "local_attn" else t for t in types]
    if types:
        cfg["layer_pattern"] = types
    elif cfg["sliding_window"]:  # Mistral: every layer slides
        cfg["layer_pattern"] = ["local_attn"]
    return cfg


def qwen3_config(hf):
    return {**llama_config(hf), "qk_norm": True}


def gemma_config(hf):
    return {**llama_config(hf), "norm_unit_offset": True, "norm_placement": "sandwich",
            "embed_scale": hf["hidden_size"] ** 0.5,
            "attn_scale": hf["query_pre_attn_scalar"] ** -0.5,
            "attn_softcap": hf.get("attn_logit_softcapping"),
            "final_softcap": hf.get("final_logit_softcapping"), "tie_embeddings": True}


def gemma3_config(hf):  # Gemma 3 adds QK-norm and drops the attention softcap
    if hf.get("use_bidirectional_attention"):
        raise ValueError("Gemma 3 use_bidirectional_attention (the embedding variant) is not "
                         "supported")
    return {**gemma_config(hf), "qk_norm": True, "attn_softcap": None}


def mixtral_config(hf):  # every layer MoE, top-k always renormalised
    return {**llama_config(hf), "ffn_pattern": ["moe"], "n_expert": hf["num_local_experts"],
            "moe_top_k": hf["num_experts_per_tok"], "moe_renorm": True,
            "moe_aux_weight": hf.get("router_aux_loss_coef", 0.01), "moe_pool_balance": True}


def qwen3_moe_config(hf):  # MoE where (i+1) % decoder_sparse_step == 0, except mlp_only_layers
    step, dense = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
    pattern = ["moe" if i not in dense and (i + 1) % step == 0 else "dense"
               for i in range(hf["num_hidden_layers"])]
    if "moe" not in pattern:  # every layer dense: a Qwen3 with unused MoE settings
        return {**qwen3_config(hf), "ffn_pattern": pattern}
    return {**qwen3_config(hf), "ffn_pattern": pattern,
            "n_expert": hf.get("num_local_experts") or hf["num_experts"],
            "moe_top_k": hf["num_experts_per_tok"], "moe_d_ff": hf["moe_intermediate_size"],
            "moe_renorm": hf.get("norm_topk_prob", False),
            "moe_aux_weight": hf.get("router_aux_loss_coef", 0.01),
            "moe_pool_balance": True}  # HF's definition of the balance loss (see model.MoE)


def qwen3_next_config(hf):
    """Qwen3-Next: Gated DeltaNet 3:1 gated attention, (1+w) norms, partial RoPE, MoE with a
    shared expert."""
    return {**qwen3_moe_config(hf), "norm_unit_offset": True, "attn_gate": True,
            "moe_renorm": hf.get("norm_topk_prob", True),
            "moe_shared_d_ff": hf["shared_expert_intermediate_size"],
            "dn_heads": hf["linear_num_key_heads"], "dn_v_heads": hf["linear_num_value_heads"],
            "dn_head_dim": hf["linear_key_head_dim"], "dn_v_head_dim": hf["linear_value_head_dim"],
            "dn_conv": hf["linear_conv_kernel_dim"]}


def bert_config(hf):
    """BERT: post-LN encoder, learned positions, token types, embedding norm, MLM + NSP heads."""
    if hf.get("is_decoder"):
        raise ValueError(f"{hf['model_type']} is_decoder=true (causal attention, cross-attention) "
                         f"is not supported; the import reads bidirectional encoders")
    return dict(architecture="encoder_only", vocab_size=hf["vocab_size"],
                block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
                n_head=hf["num_attention_heads"], d_model=hf["hidden_size"],
                d_ff=hf["intermediate_size"], norm_eps=hf["layer_norm_eps"], norm_placement="post",
                final_norm=False, activation=ACTIVATIONS[hf["hidden_act"]],
                type_vocab_size=hf["type_vocab_size"], embed_norm=True, head_transform=True,
                head_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True))


def albert_config(hf):
    """ALBERT: BERT with factorised embeddings (E < H), blocks shared across layer groups, SOP."""
    if hf.get("inner_group_num", 1) != 1:
        raise ValueError(f"ALBERT inner_group_num={hf['inner_group_num']} is not supported "
                         f"(released models use 1)")
    return {**bert_config(hf), "embed_dim": hf["embedding_size"],
            "layer_groups": hf["num_hidden_groups"]}


DEBERTA_V3 = {  # HF option -> (its default, what the import implements, test of the value)
    "relative_attention": (False, "true", bool),
    "position_biased_input": (True, "false (no absolute positions)", lambda v: not v),
    "share_att_key": (False, "true", bool),
    "pos_att_type": (None, "c2p|p2c",  # a list, or in v3's hub files the string "p2c|c2p"
                     lambda v: sorted(v.split("|") if isinstance(v, str) else v or [])
                     == ["c2p", "p2c"]),
    "position_buckets": (-1, "> 0", lambda v: v > 0),
    "norm_rel_ebd": ("none", "layer_norm", lambda v: "layer_norm" in v),
    "conv_kernel_size": (0, "0 (no convolution layer)", lambda v: not v),
    "type_vocab_size": (0, "0", lambda v: not v),
}


def deberta_config(hf):
    """DeBERTa-v3: BERT's post-LN encoder, disentangled attention over log-bucketed positions."""
    for key, (default, need, ok) in DEBERTA_V3.items():
        if not ok(hf.get(key, default)):
            raise ValueError(f"DeBERTa {key}={hf.get(key, default)!r} is not supported; the import "
                             f"implements DeBERTa-v3-style configs ({key} {need})")
    if hf.get("embedding_size", hf["hidden_size"]) != hf["hidden_size"]:  # v2's embed_proj
        raise ValueError(f"DeBERTa embedding_size={hf['embedding_size']} != hidden_size="
                         f"{hf['hidden_size']} is not supported; the import implements "
                         f"DeBERTa-v3-style configs (no embed_proj)")
    hs = hf["hidden_size"] // hf["num_attention_heads"]
    max_rel = hf.get("max_relative_positions", -1)
    return {**bert_config(hf), "position": "disentangled",
            "rel_buckets": hf["position_buckets"],
            "rel_max_distance": max_rel if max_rel > 0 else hf["max_position_embeddings"],
            "attn_scale": (3 * hs) ** -0.5}  # q·k and both relative terms share sqrt(3·hs)


def bart_config(hf):
    """BART: post-LN encoder-decoder, learned positions offset by 2, layernorm_embedding,
    final_logits_bias."""
    stacks = {part: dict(n_layer=hf[f"{part}_layers"], n_head=hf[f"{part}_attention_heads"],
                         d_ff=hf[f"{part}_ffn_dim"]) for part in ("encoder", "decoder")}
    return dict(architecture="encoder_decoder", **stacks, vocab_size=hf["vocab_size"],
                d_model=hf["d_model"], n_layer=hf["decoder_layers"],
                n_head=hf["decoder_attention_heads"], block_size=hf["max_position_embeddings"],
                pos_offset=2, embed_norm=True, norm_placement="post", final_norm=False,
                head_bias=True, activation=ACTIVATIONS[hf["activation_function"]],
                embed_scale=hf["d_model"] ** 0.5 if hf.get("scale_embedding") else None,
                decoder_start_token_id=hf["decoder_start_token_id"])


def marian_config(hf):
    """Marian (the original Transformer for NMT): BART's layout, sinusoidal positions, no
    embedding norm."""
    if not hf.get("share_encoder_decoder_embeddings", True):
        raise ValueError("Marian share_encoder_decoder_embeddings=false (separate source and "
                         "target vocabularies) is not supported; the import shares one embedding")
    return {**bart_config(hf), "position": "sinusoidal", "pos_offset": 0, "embed_norm": False}


def t5_config(hf):
    """T5: pre-norm RMSNorm encoder-decoder, relative position bias, unscaled q·k, no biases."""
    gated = hf.get("is_gated_act", hf["feed_forward_proj"].startswith("gated"))
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    return dict(architecture="encoder_decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"],
                head_dim=hf["d_kv"], d_ff=hf["d_ff"], n_head=hf["num_heads"],
                n_layer=hf["num_layers"],
                decoder=dict(n_layer=hf.get("num_decoder_layers") or hf["num_layers"]),
                block_size=hf.get("n_positions", 512), norm="rmsnorm",
                norm_eps=hf["layer_norm_epsilon"], position="relative_bias",
                rel_buckets=hf["relative_attention_num_buckets"],
                rel_max_distance=hf["relative_attention_max_distance"], attn_scale=1.0, bias=False,
                ffn="glu" if gated else "mlp",
                activation=ACTIVATIONS[hf.get("dense_act_fn", "relu")],
                head_input_scale=hf["d_model"] ** -0.5 if scaled else None,
                decoder_start_token_id=hf.get("decoder_start_token_id") or 0)


# ----------------------------------------------------------------------------------------------
# 2. Key tables: HF weight name -> ours; {} is the layer (and expert) index

LLAMA_KEYS = {
    "model.embed_tokens.weight": "wte.weight",
    "model.norm.weight": "norm_f.weight",
    "lm_head.weight": "lm_head.weight",
    **{f"model.layers.{{}}.self_attn.{p}_proj.{w}": f"blocks.{{}}.mixer.{p}_proj.{w}"
       for p in "qkvo" for w in ("weight", "bias")},
    "model.layers.{}.self_attn.q_norm.weight": "blocks.{}.mixer.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "blocks.{}.mixer.k_norm.weight",
    **{f"model.layers.{{}}.mlp.{p}_proj.{w}": f"blocks.{{}}.ffn.{p}.{w}"
       for p in ("gate", "up", "down") for w in ("weight", "bias")},
    "model.layers.{}.input_layernorm.weight": "blocks.{}.norm_1.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blocks.{}.norm_2.weight",
}
GEMMA_KEYS = {  # sandwich norms: post_attention_layernorm is the norm *after* attention
    **LLAMA_KEYS,
    "model.layers.{}.post_attention_layernorm.weight": "blocks.{}.post_norm_1.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "blocks.{}.norm_2.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "blocks.{}.post_norm_2.weight",
}
GPT2_LAYER = {"ln_1": "norm_1", "ln_2": "norm_2", "attn.c_proj": "mixer.o_proj",
              "attn.c_attn": "mixer.qkv", "mlp.c_fc": "ffn.up", "mlp.c_proj": "ffn.down"}
GPT2_BARE = {  # Conv1D weights are (in, out); c_attn holds [q | k | v]: see the reshapes
    "wte.weight": "wte.weight", "wpe.weight": "wpe.weight",
    "ln_f.weight": "norm_f.weight", "ln_f.bias": "norm_f.bias",
    **{f"h.{{}}.{a}.{w}": f"blocks.{{}}.{b}.{w}" for a, b in GPT2_LAYER.items()
       for w in ("weight", "bias")},
}
# save_pretrained writes transformer.*, hub files may omit the prefix: both read, the first written
GPT2_KEYS = {**{f"transformer.{k}": v for k, v in GPT2_BARE.items()}, **GPT2_BARE}
MOE_KEYS = {  # Qwen3-MoE; each expert apart on disk, stacked by stack_experts
    **LLAMA_KEYS,
    "model.layers.{}.mlp.gate.weight": "blocks.{}.ffn.router.weight",
    **{f"model.layers.{{}}.mlp.experts.{{}}.{p}_proj.weight":
       f"blocks.{{}}.ffn.experts.{{}}.{p}.weight" for p in ("gate", "up", "down")},
}
MIXTRAL_KEYS = {
    **LLAMA_KEYS,
    "model.layers.{}.block_sparse_moe.gate.weight": "blocks.{}.ffn.router.weight",
    **{f"model.layers.{{}}.block_sparse_moe.experts.{{}}.{w}.weight":
       f"blocks.{{}}.ffn.experts.{{}}.{p}.weight"
       for w, p in (("w1", "gate"), ("w3", "up"), ("w2", "down"))},
}
QWEN3_NEXT_LAYER = {"in_proj_qkvz.weight": "in_proj_qkvz", "in_proj_ba.weight": "in_proj_ba",
                    "conv1d.weight": "conv.weight", "A_log": "A_log", "dt_bias": "dt_bias",
                    "norm.weight": "norm.weight", "out_proj.weight": "out_proj.weight"}
QWEN3_NEXT_KEYS = {
    **MOE_KEYS,
    **{f"model.layers.{{}}.linear_attn.{a}": f"blocks.{{}}.mixer.{b}"
       for a, b in QWEN3_NEXT_LAYER.items()},
    **{f"model.layers.{{}}.mlp.shared_expert.{p}_proj.weight":
       f"blocks.{{}}.ffn.shared_expert.{p}.weight" for p in ("gate", "up", "down")},
    "model.layers.{}.mlp.shared_expert_gate.weight": "blocks.{}.ffn.shared_gate.weight",
}
BERT_LAYER = {"attention.self.query": "mixer.q_proj", "attention.self.key": "mixer.k_proj",
              "attention.self.value": "mixer.v_proj", "attention.output.dense": "mixer.o_proj",
              "attention.output.LayerNorm": "norm_1", "intermediate.dense": "ffn.up",
              "output.dense": "ffn.down", "output.LayerNorm": "norm_2"}
BERT_HEADS = {"bert.pooler.dense": "pooler", "cls.predictions.transform.dense": "head_transform.0",
              "cls.predictions.transform.LayerNorm": "head_transform.2",
              "cls.predictions.decoder": "lm_head", "cls.seq_relationship": "cls",
              "bert.embeddings.LayerNorm": "embed_norm"}
BERT_KEYS = {  # first: the HF name the export writes for ours (the head bias under its own)
    "cls.predictions.bias": "lm_head.bias",
    **{f"bert.embeddings.{a}_embeddings.weight": f"{b}.weight"
       for a, b in [("word", "wte"), ("position", "wpe"), ("token_type", "wtt")]},
    **{f"bert.encoder.layer.{{}}.{a}.{w}": f"blocks.{{}}.{b}.{w}" for a, b in BERT_LAYER.items()
       for w in ("weight", "bias")},
    **{f"{a}.{w}": f"{b}.{w}" for a, b in BERT_HEADS.items() for w in ("weight", "bias")},
}
ALBERT_LAYER = {"attention.query": "mixer.q_proj", "attention.key": "mixer.k_proj",
                "attention.value": "mixer.v_proj", "attention.dense": "mixer.o_proj",
                "attention.LayerNorm": "norm_1", "ffn": "ffn.up", "ffn_output": "ffn.down",
                "full_layer_layer_norm": "norm_2"}
ALBERT_HEADS = {"albert.pooler": "pooler", "predictions.dense": "head_transform.0",
                "predictions.LayerNorm": "head_transform.2", "predictions.decoder": "lm_head",
                "sop_classifier.classifier": "cls", "albert.embeddings.LayerNorm": "embed_norm",
                "albert.encoder.embedding_hidden_mapping_in": "embed_proj"}
ALBERT_KEYS = {  # group g, inner layer 0: blocks.{0} takes the group index only
    "predictions.bias": "lm_head.bias",
    **{k.replace("bert.", "albert."): v for k, v in BERT_KEYS.items() if "_embeddings" in k},
    **{f"albert.encoder.albert_layer_groups.{{}}.albert_layers.{{}}.{a}.{w}":
       f"blocks.{{0}}.{b}.{w}" for a, b in ALBERT_LAYER.items() for w in ("weight", "bias")},
    **{f"{a}.{w}": f"{b}.{w}" for a, b in ALBERT_HEADS.items() for w in ("weight", "bias")},
}
DEBERTA_LAYER = {**{k: v for k, v in BERT_LAYER.items() if not k.startswith("attention.self")},
                 **{f"attention.self.{p}_proj": f"mixer.{p[0]}_proj"
                    for p in ("query", "key", "value")}}
DEBERTA_KEYS = {
    "deberta.embeddings.word_embeddings.weight": "wte.weight",
    **{f"deberta.embeddings.LayerNorm.{w}": f"embed_norm.{w}" for w in ("weight", "bias")},
    "deberta.encoder.rel_embeddings.weight": "rel_embeddings.weight",
    **{f"deberta.encoder.LayerNorm.{w}": f"rel_embeddings.norm.{w}" for w in ("weight", "bias")},
    **{f"deberta.encoder.layer.{{}}.{a}.{w}": f"blocks.{{}}.{b}.{w}"
       for a, b in DEBERTA_LAYER.items() for w in ("weight", "bias")},
    **{k: v for k, v in BERT_KEYS.items() if k.startswith("cls.predictions")},
    # legacy=False names the same MLM head lm_predictions.lm_head.{dense, LayerNorm, bias}
    **{f"lm_predictions.lm_head.{a}.{w}": f"head_transform.{b}.{w}"
       for a, b in (("dense", 0), ("LayerNorm", 2)) for w in ("weight", "bias")},
    "lm_predictions.lm_head.bias": "lm_head.bias",
}
BART_LAYER = {**{f"{a}_attn.{p}_proj": f"{b}.{p}_proj" for a, b in (("self", "mixer"),
                                                                    ("encoder", "cross"))
                 for p in "qkv"},
              "self_attn.out_proj": "mixer.o_proj", "encoder_attn.out_proj": "cross.o_proj",
              "self_attn_layer_norm": "norm_1", "encoder_attn_layer_norm": "norm_x",
              "fc1": "ffn.up", "fc2": "ffn.down", "final_layer_norm": "norm_2"}
BART_KEYS = {
    "model.shared.weight": "encoder.wte.weight",
    "lm_head.weight": "decoder.lm_head.weight",
    "final_logits_bias": "decoder.lm_head.bias",
    **{f"model.{s}.embed_tokens.weight": f"{s}.wte.weight" for s in ("encoder", "decoder")},
    **{f"model.{s}.embed_positions.weight": f"{s}.wpe.weight" for s in ("encoder", "decoder")},
    **{f"model.{s}.layernorm_embedding.{w}": f"{s}.embed_norm.{w}" for s in ("encoder", "decoder")
       for w in ("weight", "bias")},
    **{f"model.{s}.layers.{{}}.{a}.{w}": f"{s}.blocks.{{}}.{b}.{w}" for s in ("encoder", "decoder")
       for a, b in BART_LAYER.items() for w in ("weight", "bias")},
}
MARIAN_KEYS = {k: v for k, v in BART_KEYS.items() if "embed_positions" not in k}  # sinusoids
T5_SHARED = {  # the decoder's sub-layer 1 is cross-attention, so its FFN is sub-layer 2
    "shared.weight": "encoder.wte.weight",
    "lm_head.weight": "decoder.lm_head.weight",
    **{f"{s}.embed_tokens.weight": f"{s}.wte.weight" for s in ("encoder", "decoder")},
    **{f"{s}.final_layer_norm.weight": f"{s}.norm_f.weight" for s in ("encoder", "decoder")},
    **{f"{s}.block.{{}}.layer.{{}}.SelfAttention.relative_attention_bias.weight":
       f"{s}.rel_bias.bias.weight" for s in ("encoder", "decoder")},
    **{f"{s}.block.{{}}.layer.0.SelfAttention.{p}.weight": f"{s}.blocks.{{}}.mixer.{p}_proj.weight"
       for s in ("encoder", "decoder") for p in "qkvo"},
    **{f"decoder.block.{{}}.layer.1.EncDecAttention.{p}.weight":
       f"decoder.blocks.{{}}.cross.{p}_proj.weight" for p in "qkvo"},
    **{f"{s}.block.{{}}.layer.0.layer_norm.weight": f"{s}.blocks.{{}}.norm_1.weight"
       for s in ("encoder", "decoder")},
    "decoder.block.{}.layer.1.layer_norm.weight": "decoder.blocks.{}.norm_x.weight",
    **{f"{s}.block.{{}}.layer.{i}.layer_norm.weight": f"{s}.blocks.{{}}.norm_2.weight"
       for s, i in (("encoder", 1), ("decoder", 2))},
}
T5_FFN = {"mlp": (("wi", "up"), ("wo", "down")),                       # relu: wo(relu(wi x))
          "glu": (("wi_0", "gate"), ("wi_1", "up"), ("wo", "down"))}   # gated-gelu (v1.1)


def t5_keys(ffns):
    """T5's table for these FFN kinds: the import reads both; the export writes its config's."""
    return {**T5_SHARED, **{f"{s}.block.{{}}.layer.{i}.DenseReluDense.{a}.weight":
                            f"{s}.blocks.{{}}.ffn.{b}.weight" for s, i in (("encoder", 1),
                                                                          ("decoder", 2))
                            for f in ffns for a, b in T5_FFN[f]}}


T5_KEYS = t5_keys(T5_FFN)

# ----------------------------------------------------------------------------------------------
# 3. Reshapes: what renaming cannot do, on the renamed state dict (sd) and the config fields (cfg)


def transpose_conv1d(sd, cfg):
    """GPT-2's Conv1D weights (its blocks' matrices) are (in, out): transposed to Linear's (out,
    in)."""
    for name in [n for n in sd if sd[n].dim() == 2 and n.startswith("blocks.")]:
        sd[name] = sd[name].t()


def split_qkv(sd, cfg):
    """GPT-2's c_attn rows are [q | k | v], d_model each: three projections."""
    for name in [n for n in sd if ".qkv." in n]:
        for p, part in zip("qkv", sd.pop(name).split(cfg["d_model"], dim=0)):
            sd[name.replace("qkv", f"{p}_proj")] = part


def stack_experts(sd, cfg):
    """HF stores each expert's matrices apart (ffn.experts.{e}.up.weight, ...); ours stacks them,
    (E, out, in)."""
    for name in [n for n in sd if ".experts.0." in n]:
        stem, part = name.split(".experts.0.")
        sd[f"{stem}.{part.removesuffix('.weight')}"] = torch.stack(
            [sd.pop(f"{stem}.experts.{e}.{part}") for e in range(cfg["n_expert"])])


def merge_deltanet_in_proj(sd, cfg):
    """HF groups in_proj_qkvz and in_proj_ba rows per key head ([q_g, k_g, v_g, z_g], [b_g, a_g]);
    ours is one in_proj with rows [q, k, v, z, b, a]."""
    nk, dk, dv = cfg["dn_heads"], cfg["dn_head_dim"], cfg["dn_v_head_dim"]
    r = cfg["dn_v_heads"] // nk
    for name in [n for n in sd if n.endswith("in_proj_qkvz")]:
        qkvz = sd.pop(name).unflatten(0, (nk, -1)).split([dk, dk, r * dv, r * dv], dim=1)
        ba = sd.pop(name.replace("qkvz", "ba")).unflatten(0, (nk, -1)).split([r, r], dim=1)
        sd[name.replace("in_proj_qkvz", "in_proj.weight")] = torch.cat(
            [p.flatten(0, 1) for p in qkvz + ba])                    # each p: (nk, rows, C)


def flatten_logits_bias(sd, cfg):
    """BART's final_logits_bias is a (1, V) buffer; ours is the head's (V,) bias."""
    sd["decoder.lm_head.bias"] = sd["decoder.lm_head.bias"].flatten()


FAMILIES = {  # model_type -> (config translation, key table, reshapes in order)
    "gpt2": (gpt2_config, GPT2_KEYS, (transpose_conv1d, split_qkv)),
    "llama": (llama_config, LLAMA_KEYS, ()),
    "mistral": (llama_config, LLAMA_KEYS, ()),
    "qwen3": (qwen3_config, LLAMA_KEYS, ()),
    "gemma2": (gemma_config, GEMMA_KEYS, ()),
    "gemma3_text": (gemma3_config, GEMMA_KEYS, ()),
    "mixtral": (mixtral_config, MIXTRAL_KEYS, (stack_experts,)),
    "qwen3_moe": (qwen3_moe_config, MOE_KEYS, (stack_experts,)),
    "qwen3_next": (qwen3_next_config, QWEN3_NEXT_KEYS, (merge_deltanet_in_proj, stack_experts)),
    "bert": (bert_config, BERT_KEYS, ()),
    "albert": (albert_config, ALBERT_KEYS, ()),
    "deberta-v2": (deberta_config, DEBERTA_KEYS, ()),
    "bart": (bart_config, BART_KEYS, (flatten_logits_bias,)),
    "marian": (marian_config, MARIAN_KEYS, (flatten_logits_bias,)),
    "t5": (t5_config, T5_KEYS, ()),
}
def context_pooler(hf):
    """config.json fields DeBERTa's classifier needs: its ContextPooler applies pooler_hidden_act
    (default gelu) to pooler_hidden_size outputs, ours tanh to the hidden size (as BERT's)."""
    return {"pooler_hidden_act": "tanh", "pooler_hidden_size": hf["hidden_size"]}


SCORE = {"score.weight": "cls.weight"}  # a decoder's: a bias-free matrix on the last token
CLASSIFIER = {f"classifier.{w}": f"cls.{w}" for w in ("weight", "bias")}  # on the pooled [CLS]
CONTEXT_POOLER = {f"pooler.dense.{w}": f"pooler.{w}" for w in ("weight", "bias")}  # DeBERTa's
SEQUENCE_CLASSIFIERS = {  # model_type -> (its *ForSequenceClassification, the classifier's keys
    "gpt2": ("GPT2ForSequenceClassification", SCORE, None),      # and pooler's, the config.json
    "llama": ("LlamaForSequenceClassification", SCORE, None),    # fields those need)
    "mistral": ("MistralForSequenceClassification", SCORE, None),
    "qwen3": ("Qwen3ForSequenceClassification", SCORE, None),
    "gemma2": ("Gemma2ForSequenceClassification", SCORE, None),
    "gemma3_text": ("Gemma3TextForSequenceClassification", SCORE, None),
    "mixtral": ("MixtralForSequenceClassification", SCORE, None),
    "qwen3_moe": ("Qwen3MoeForSequenceClassification", SCORE, None),
    "qwen3_next": ("Qwen3NextForSequenceClassification", SCORE, None),
    "bert": ("BertForSequenceClassification", CLASSIFIER, None),      # the pooler: in BERT_KEYS
    "albert": ("AlbertForSequenceClassification", CLASSIFIER, None),  # and ALBERT_KEYS
    "deberta-v2": ("DebertaV2ForSequenceClassification", {**CLASSIFIER, **CONTEXT_POOLER},
                   context_pooler),
}
PRETRAINING = {"bert": "BertForPreTraining", "albert": "AlbertForPreTraining"}  # + NSP or SOP


# weights (and fields) only the LM head reads: a *ForSequenceClassification has no LM head, so
# the export leaves them out and the import keeps ours as initialised
LM_HEAD_WEIGHTS = ("lm_head.", "head_transform.", "emd_pos.")
LM_HEAD_ONLY = ("tie_embeddings", "head_transform", "head_bias", "final_softcap",
                "head_input_scale", "emd_steps")


def heads(sd, cfg):
    """The classifier a file holds, if any: a *ForPreTraining's NSP/SOP or a
    *ForSequenceClassification's n-way one."""
    cfg["cls_head"] = "cls.weight" in sd
    if cfg["cls_head"]:
        cfg["n_classes"] = len(sd["cls.weight"])


IGNORED = ("attn.bias", "attn.masked_bias", "mtp.", "vision_tower.", "multi_modal_projector.",
           "embed_positions", "rotary_emb.inv_freq")  # buffers, sinusoids, parts we do not run
PREFIXES = {"model.language_model.": "model."}         # multimodal Gemma 3: the text model

# ----------------------------------------------------------------------------------------------
# 4. Reading the files

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # gpt2, meta-llama/Llama-3.2-1B
HUB_FILES = ("config.json", "generation_config.json", "tokenizer.json")  # all this repo reads


def hub_dir(name, weights=True) -> Path:
    """A local path as it is; else a Hugging Face Hub model id (gpt2, org/name), whose config,
    tokenizer and (weights) safetensors are downloaded once into $ANYFORMER_CACHE (default
    ~/.cache/anyformer) and read from there afterwards. $HF_TOKEN opens gated models, and
    $HF_ENDPOINT names another Hub. Never a .bin file: loading never unpickles."""
    path = Path(name)
    if path.exists() or not HUB_ID.fullmatch(str(name)) or path.suffix in (".pt", ".json"):
        return path
    root = Path(os.environ.get("ANYFORMER_CACHE") or Path.home() / ".cache" / "anyformer")
    local = root / str(name).replace("/", "--")
    done = local / (".complete" if weights else ".tokenizer")      # every file there: no request
    if done.is_file() or (local / ".complete").is_file():
        return local
    hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    get = lambda file, need=False: hub_file(f"{hub}/{name}/resolve/main/{file}", local / file,
                                            name, need)
    for file in HUB_FILES:
        get(file, need=file == "config.json")
    if weights:  # a family we do not import is refused before its weights are downloaded
        text_model(read_json(local / "config.json"))
    if weights and get("model.safetensors.index.json"):
        shards = read_json(local / "model.safetensors.index.json").get("weight_map", {})
        for file in sorted(set(shards.values())):
            get(file, need=True)
    elif weights and not get("model.safetensors"):
        raise ValueError(f"{name} on the Hub has no model.safetensors (nor an index of shards); "
                         f"anyformer loads safetensors only, never pickled .bin weights")
    done.touch()
    return local


def hub_file(url, path: Path, name, need) -> bool:
    """Download url to path (atomically: complete or absent) unless it is there: True, or False
    where the Hub has no such file and need is False."""
    if path.is_file():
        return True
    request = urllib.request.Request(url)
    if os.environ.get("HF_TOKEN"):  # to the Hub only, not to the storage it redirects weights to
        request.add_unredirected_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # torchrun's ranks each write their own
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            path.parent.mkdir(parents=True, exist_ok=True)
            size = int(r.headers.get("Content-Length") or 0)
            print(f"downloading {name}: {path.name} ({size / 1e6:,.1f} MB) to {path.parent}",
                  file=sys.stderr)
            with open(tmp, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
            if size and tmp.stat().st_size != size:
                raise OSError(f"the connection closed after {tmp.stat().st_size:,} of {size:,} "
                              f"bytes of {path.name}; run again")
    except urllib.error.HTTPError as e:
        if e.code == 404 and not need:
            return False
        why = {401: "no such model, or a gated or private one: check the name; for a gated "
                    "model accept its license on the Hub and set HF_TOKEN",
               403: "a gated model: accept its license on the Hub and set HF_TOKEN",
               404: f"the Hub has no {path.name} for it"}.get(e.code, e.reason)
        raise ValueError(f"{name} is no local path, and the Hub answers HTTP {e.code} for {url}: "
                         f"{why}") from None
    except (OSError, http.client.HTTPException) as e:  # unreachable, timed out, cut short
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{name} is no local path, and downloading it from the Hub failed ({e}); "
                         f"pass a local directory (huggingface-cli download {name} --local-dir "
                         f"DIR)") from None
    os.replace(tmp, path)
    return True



def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, OSError) as e:   # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-save it") from None


def weight_files(hf_dir: Path) -> list:
    """The safetensors files: the shards a model.safetensors.index.json lists, else every one."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map (tensor name -> shard file)")
        for name, file in weight_map.items():
            if not (hf_dir / file).is_file():
                raise ValueError(f"{index} puts tensor {name!r} in {file}, which is missing from "
                                 f"{hf_dir}; download every shard")
        return sorted({hf_dir / file for file in weight_map.values()})
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{hf_dir} has no *.safetensors weights; save the HF model with "
                         f"save_pretrained()")
    return files


def damage(path: Path) -> str:
    """Where a .safetensors file that does not load breaks: its header (an 8-byte length, then
    JSON), or the first tensor whose bytes run past the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n)) if 8 + n <= size else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        return "its header is cut short or is not valid JSON"
    spans = sorted((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
    first = next((k for end, k in spans if 8 + n + end > size), None)
    return f"tensor {first!r} runs past the end of the file" if first else "its data is invalid"


def read_weights(hf_dir: Path, keys: dict):
    """Every tensor of the weight files renamed to ours, and where each came from ("file: name")."""
    from safetensors.torch import load_file  # lazy: only needed for HF directories
    sd, source, unknown = {}, {}, []
    for path in weight_files(hf_dir):
        try:
            tensors = load_file(str(path))
        except Exception:  # SafetensorError, OSError: a file cut short or overwritten
            raise ValueError(f"{path} is truncated or corrupt ({damage(path)}); re-download or "
                             f"re-save it") from None
        for name, t in tensors.items():
            for prefix, replacement in PREFIXES.items():
                name = replacement + name[len(prefix):] if name.startswith(prefix) else name
            ours = rename(name, keys)
            if ours is not None:
                sd[ours], source[ours] = t, f"{path}: {name}"
            elif not any(part in name for part in IGNORED):
                unknown.append(name)
    if unknown:  # an unmapped weight is an option we do not implement: refuse rather than be wrong
        raise ValueError(f"{hf_dir} holds weights the import does not know ({unknown[:3]}); the "
                         f"checkpoint uses an option anyformer does not implement")
    return sd, source


def templates(name):
    """A weight name's key-table lookups: (template, its numbers) with every number a {}, then
    with only the first one (the layer), as T5's literal layer.0/1/2 need."""
    parts = name.split(".")
    numbers = [p for p in parts if p.isdigit()]
    every = ".".join("{}" if p.isdigit() else p for p in parts)
    first = name
    if numbers:
        i = parts.index(numbers[0])
        first = ".".join(parts[:i] + ["{}"] + parts[i + 1:])
    return [(every, numbers), (first, numbers[:1])]


def rename(name, keys):
    """One HF weight name -> ours through a key table (templates), or None."""
    for template, args in templates(name):
        if template in keys:
            return keys[template].format(*args)
    return None


def check_shapes(sd, source, model, hf_dir):
    """Each weight must have the shape the config gives its parameter; name the first that does
    not by its file and HF name (a reshaped one, renamed on the way, by the nearest renamed one)."""
    want = model.state_dict()
    for name, t in sd.items():
        if name in want and t.shape != want[name].shape:
            near = max(source, key=lambda s: len(os.path.commonprefix([s, name])))
            raise ValueError(f"{source.get(name, source[near])} does not fit "
                             f"{hf_dir / 'config.json'}: as our {name} it is {tuple(t.shape)}, "
                             f"the config makes it {tuple(want[name].shape)}; the weights and "
                             f"config.json disagree")


def tie_shared(sd, model):
    """Fill every name of a shared parameter from the one the file holds: a tied head, an
    encoder-decoder's one embedding."""
    shared = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    for names in shared.values():
        src = next((n for n in names if n in sd), None)
        for n in names if src else ():
            sd.setdefault(n, sd[src])


def text_model(hf) -> tuple:
    """(the config.json dict, its FAMILIES key); a multimodal config's text model's."""
    hf = {**hf, **hf.get("text_config", {})}
    family = hf.get("model_type")
    family = "gemma3_text" if family == "gemma3" else family
    if family not in FAMILIES:
        raise ValueError(f"HF model_type {family!r} is not supported; supported: "
                         f"{sorted(FAMILIES)}")
    return hf, family


def from_pretrained(hf_dir):
    """Build a Transformer from a HF-format directory (config.json + safetensors) of a family in
    FAMILIES, or a Hub model id (hub_dir downloads it once); the model is returned in eval mode."""
    hf_dir = hub_dir(hf_dir)
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{hf_dir} has no config.json; pass a directory written by "
                         f"save_pretrained()")
    hf, family = text_model(read_json(path))
    make_config, keys, reshapes = FAMILIES[family]
    _, classifier, pooler = SEQUENCE_CLASSIFIERS.get(family, (None, {}, None))
    try:
        raw = make_config(hf)
    except KeyError as e:
        raise ValueError(f"{path} lacks {e.args[0]!r}, which a {family} config needs") from None
    sd, source = read_weights(hf_dir, {**keys, **classifier})
    try:
        for reshape in reshapes:
            reshape(sd, raw)
    except (RuntimeError, ValueError, IndexError) as e:
        raise ValueError(f"{hf_dir}: the weights do not fit {path} ({e})") from None
    heads(sd, raw)
    for key, want in (pooler(hf) if pooler and raw["cls_head"] else {}).items():
        if hf.get(key) != want:
            raise ValueError(f"{path} has {key}={hf.get(key)!r}; the import implements a "
                             f"classifier whose pooler has {key}={want!r}")
    # HF ties the head to the embedding unless the file holds a different lm_head.weight
    head_key = next((k for k in sd if k.endswith("lm_head.weight")), None)
    head = sd.pop(head_key) if head_key else None
    embed = next((v for k, v in sd.items() if k.endswith("wte.weight")), None)
    untie = head is not None and embed is not None and not torch.equal(head, embed)
    try:
        model = Transformer(Config.from_dict({**raw, "tie_embeddings": not untie}))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if untie:
        sd[head_key] = head
    tie_shared(sd, model)
    check_shapes(sd, source, model, hf_dir)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if str((hf.get("architectures") or [""])[0]).endswith("ForSequenceClassification"):
        missing = [k for k in missing if not k.startswith(LM_HEAD_WEIGHTS)]  # it has no LM head
    if missing or unexpected:
        raise ValueError(f"{hf_dir}: weights do not match the {family} layout "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# 5. Export: the import run backwards. Our Config -> config.json (each family's translation
#    inverted), our weights -> HF's (reshapes undone in reverse order, key tables inverted)

# gelu_tanh as the function ours runs (F.gelu, approximate="tanh"), not gelu_new's formula
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
HF_LAYER_TYPES = {ours: hf for hf, ours in LAYER_TYPES.items()}


def hf_rope(cfg):
    """One rope_parameters entry (rope_fields inverted). HF's dynamic scaling takes the original
    context from max_position_embeddings, so it is not written."""
    kind = cfg.rope_scaling
    rope = {"rope_type": "default" if kind == "none" else kind, "rope_theta": cfg.rope_theta}
    if kind != "none":
        rope["factor"] = cfg.rope_factor
    if kind == "llama3":
        rope.update(original_max_position_embeddings=cfg.rope_original_max_len,
                    low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor)
    if kind == "yarn":
        rope.update(original_max_position_embeddings=cfg.rope_original_max_len,
                    beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
        if cfg.rope_attn_factor is not None:
            rope["attention_factor"] = cfg.rope_attn_factor
    return rope


def hf_layer_types(cfg, family_has):
    """layer_types of our mixers; one the family lacks is written as full attention, and the round
    trip in hf_config then tells the two apart."""
    return [HF_LAYER_TYPES[m] if m in family_has else "full_attention" for m, _ in layer_types(cfg)]


def without(d, *keys):
    return {k: v for k, v in d.items() if k not in keys}


def llama_hf(cfg):
    return dict(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                num_key_value_heads=cfg.kv_heads, hidden_size=cfg.d_model, head_dim=cfg.hs,
                intermediate_size=cfg.ffn_dim, rms_norm_eps=cfg.norm_eps,
                hidden_act=HF_ACTIVATIONS.get(cfg.activation), attention_bias=cfg.bias,
                mlp_bias=cfg.ffn_biased, tie_word_embeddings=cfg.tie_embeddings,
                rope_parameters=hf_rope(cfg))


def mistral_hf(cfg):  # no bias options; a window on every layer or on none
    local = {m for m, _ in layer_types(cfg)} == {"local_attn"}
    return {**without(llama_hf(cfg), "attention_bias", "mlp_bias"),
            "sliding_window": cfg.sliding_window if local else None}


def qwen3_hf(cfg):  # windows on any layers (layer_types)
    types = hf_layer_types(cfg, ("attn", "local_attn"))
    return {**without(llama_hf(cfg), "mlp_bias"), "layer_types": types,
            "use_sliding_window": "sliding_attention" in types,
            "sliding_window": cfg.sliding_window}


def gemma2_hf(cfg):
    scalar = (cfg.attn_scale or cfg.hs ** -0.5) ** -2  # HF scales by query_pre_attn_scalar**-0.5
    return {**without(llama_hf(cfg), "mlp_bias", "hidden_act"),
            "hidden_activation": HF_ACTIVATIONS.get(cfg.activation),
            "layer_types": hf_layer_types(cfg, ("attn", "local_attn")),
            "sliding_window": cfg.sliding_window,
            "query_pre_attn_scalar": round(scalar) if math.isclose(scalar, round(scalar))
            else scalar,
            "attn_logit_softcapping": cfg.attn_softcap,
            "final_logit_softcapping": cfg.final_softcap}


def gemma3_hf(cfg):  # one RoPE per layer type; the local one unscaled
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    return {**gemma2_hf(cfg), "attn_logit_softcapping": None,
            "rope_parameters": {"sliding_attention": local, "full_attention": hf_rope(cfg)}}


def mixtral_hf(cfg):
    return {**without(llama_hf(cfg), "attention_bias", "mlp_bias"), "sliding_window": None,
            "intermediate_size": cfg.moe_d_ff or cfg.ffn_dim, "num_local_experts": cfg.n_expert,
            "num_experts_per_tok": cfg.moe_top_k, "router_aux_loss_coef": cfg.moe_aux_weight}


def qwen3_moe_hf(cfg):  # MoE layers where ffn_pattern has them, the others dense (mlp_only_layers)
    dense = [i for i, (_, f) in enumerate(layer_types(cfg)) if f == "dense"]
    return {**without(qwen3_hf(cfg), "layer_types", "use_sliding_window", "sliding_window"),
            "num_experts": cfg.n_expert, "num_experts_per_tok": cfg.moe_top_k,
            "moe_intermediate_size": cfg.moe_d_ff or cfg.ffn_dim, "decoder_sparse_step": 1,
            "mlp_only_layers": dense, "norm_topk_prob": cfg.moe_renorm,
            "router_aux_loss_coef": cfg.moe_aux_weight}


def qwen3_next_hf(cfg):
    return {**qwen3_moe_hf(cfg), "layer_types": hf_layer_types(cfg, ("attn", "deltanet")),
            "rope_parameters": {**hf_rope(cfg), "partial_rotary_factor": cfg.rope_fraction},
            "shared_expert_intermediate_size": cfg.moe_shared_d_ff,
            "linear_num_key_heads": cfg.dn_heads,
            "linear_num_value_heads": cfg.dn_v_heads or cfg.dn_heads,
            "linear_key_head_dim": cfg.dn_head_dim,
            "linear_value_head_dim": cfg.dn_v_head_dim or cfg.dn_head_dim,
            "linear_conv_kernel_dim": cfg.dn_conv}


def bert_hf(cfg):
    return dict(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
                layer_norm_eps=cfg.norm_eps, hidden_act=HF_ACTIVATIONS.get(cfg.activation),
                type_vocab_size=cfg.type_vocab_size, tie_word_embeddings=cfg.tie_embeddings)


def albert_hf(cfg):
    return {**bert_hf(cfg), "embedding_size": cfg.embed_dim or cfg.d_model,
            "num_hidden_groups": cfg.layer_groups or cfg.n_layer, "inner_group_num": 1}


def deberta_hf(cfg):
    return {**bert_hf(cfg), "relative_attention": True, "position_biased_input": False,
            "share_att_key": True, "pos_att_type": ["c2p", "p2c"],
            "position_buckets": cfg.rel_buckets, "norm_rel_ebd": "layer_norm",
            "max_relative_positions": cfg.rel_max_distance, "legacy": True}


def bart_hf(cfg):
    stacks = {part: stack_config(cfg, part) for part in ("encoder", "decoder")}
    return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                **{f"{part}_{k}": v for part, s in stacks.items()
                   for k, v in (("layers", s.n_layer), ("attention_heads", s.n_head),
                                ("ffn_dim", s.ffn_dim))},
                max_position_embeddings=cfg.block_size,
                activation_function=HF_ACTIVATIONS.get(cfg.activation),
                scale_embedding=cfg.embed_scale is not None,
                decoder_start_token_id=cfg.decoder_start_token_id,
                tie_word_embeddings=cfg.tie_embeddings)


def marian_hf(cfg):  # its embedding's padding_idx must be an id: the decoder start, as in Marian
    return {**bart_hf(cfg), "share_encoder_decoder_embeddings": True,
            "decoder_vocab_size": cfg.vocab_size, "pad_token_id": cfg.decoder_start_token_id}


def t5_hf(cfg):
    act, gated = HF_ACTIVATIONS.get(cfg.activation), cfg.ffn == "glu"
    proj = f"gated-{act}" if gated else act
    return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.hs, d_ff=cfg.ffn_dim,
                num_heads=cfg.n_head, num_layers=stack_config(cfg, "encoder").n_layer,
                num_decoder_layers=stack_config(cfg, "decoder").n_layer,
                n_positions=cfg.block_size, layer_norm_epsilon=cfg.norm_eps,
                relative_attention_num_buckets=cfg.rel_buckets,
                relative_attention_max_distance=cfg.rel_max_distance, feed_forward_proj=proj,
                is_gated_act=gated, dense_act_fn=act,
                scale_decoder_outputs=cfg.head_input_scale is not None,
                decoder_start_token_id=cfg.decoder_start_token_id,
                tie_word_embeddings=cfg.tie_embeddings)


EXPORTS = {  # model_type -> (our Config -> config.json fields, the HF class transformers builds)
    "gpt2": (lambda cfg: dict(vocab_size=cfg.vocab_size, n_positions=cfg.block_size,
                              n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.d_model,
                              n_inner=cfg.ffn_dim, layer_norm_epsilon=cfg.norm_eps,
                              activation_function=HF_ACTIVATIONS.get(cfg.activation),
                              scale_attn_weights=cfg.attn_scale != 1.0,
                              tie_word_embeddings=cfg.tie_embeddings), "GPT2LMHeadModel"),
    "llama": (llama_hf, "LlamaForCausalLM"),
    "mistral": (mistral_hf, "MistralForCausalLM"),
    "qwen3": (qwen3_hf, "Qwen3ForCausalLM"),
    "gemma2": (gemma2_hf, "Gemma2ForCausalLM"),
    "gemma3_text": (gemma3_hf, "Gemma3ForCausalLM"),
    "mixtral": (mixtral_hf, "MixtralForCausalLM"),
    "qwen3_moe": (qwen3_moe_hf, "Qwen3MoeForCausalLM"),
    "qwen3_next": (qwen3_next_hf, "Qwen3NextForCausalLM"),
    "bert": (bert_hf, "BertForMaskedLM"),        # with a cls head (NSP, SOP): *ForPreTraining
    "albert": (albert_hf, "AlbertForMaskedLM"),
    "deberta-v2": (deberta_hf, "DebertaV2ForMaskedLM"),
    "bart": (bart_hf, "BartForConditionalGeneration"),
    "marian": (marian_hf, "MarianMTModel"),
    "t5": (t5_hf, "T5ForConditionalGeneration"),
}
EXPORT_KEYS = {"t5": lambda cfg: t5_keys((cfg.ffn,))}  # tables read two ways, written one way

# fields that change training, not the function the weights compute: no family needs to have them
TRAINING_ONLY = ("dropout", "drop_path", "state_dropout", "memory_dropout", "grad_checkpoint",
                 "init_std", "scaled_residual_init", "dn_chunk", "moe_aux_weight",
                 "moe_z_weight", "moe_pool_balance", "act_weight")


def effective(cfg: Config) -> dict:
    """What decides a model's outputs, field by field as it takes effect: defaults resolved
    (n_kv_head None is n_head), the per-layer layout instead of the patterns that make it (last),
    and the fields of features cfg does not use left out. Two configs with equal effective()
    compute the same function of the same weights."""
    if cfg.architecture == "encoder_decoder":
        stacks = {f"{part}.{k}": v for part in ("encoder", "decoder")
                  for k, v in effective(stack_config(cfg, part)).items()}
        return {"architecture": cfg.architecture,
                "decoder_start_token_id": cfg.decoder_start_token_id, **stacks}
    layers = layer_types(cfg)
    mixers, ffns = {m for m, _ in layers}, {f for _, f in layers}
    rope, scaling = cfg.position == "rope", cfg.rope_scaling
    resolved = {"n_kv_head": cfg.kv_heads, "head_dim": cfg.hs, "d_ff": cfg.ffn_dim,
                "ffn_bias": cfg.ffn_biased, "attn_scale": cfg.attn_scale or cfg.hs ** -0.5,
                "layer_groups": cfg.layer_groups or cfg.n_layer, "moe_d_ff": cfg.moe_d_ff or
                cfg.ffn_dim, "dn_v_heads": cfg.dn_v_heads or cfg.dn_heads,
                "dn_v_head_dim": cfg.dn_v_head_dim or cfg.dn_head_dim,
                # local layers: their own base unscaled, else the global one as it is scaled
                "rope_local_theta": (cfg.rope_local_theta, "none") if cfg.rope_local_theta
                else (cfg.rope_theta, scaling)}
    unused = {  # field -> it is read only by a feature cfg does not use
        "sliding_window": "local_attn" not in mixers,
        "rope_theta": not rope, "rope_scaling": not rope, "rope_fraction": not rope,
        "rope_local_theta": not rope or "local_attn" not in mixers,
        "rope_factor": not rope or scaling == "none",
        "rope_original_max_len": not rope or scaling not in ("llama3", "dynamic", "yarn"),
        **{k: not rope or scaling != "yarn" for k in ("rope_beta_fast", "rope_beta_slow",
                                                      "rope_attn_factor")},
        "rope_low_freq_factor": not rope or scaling != "llama3",
        "rope_high_freq_factor": not rope or scaling != "llama3",
        "pos_offset": cfg.position != "learned",
        "rel_buckets": cfg.position not in ("relative_bias", "disentangled"),
        "rel_max_distance": cfg.position not in ("relative_bias", "disentangled"),
        "d_ff": "dense" not in ffns,
        **{k: "deltanet" not in mixers for k in ("dn_heads", "dn_v_heads", "dn_head_dim",
                                                 "dn_v_head_dim", "dn_conv")},
        **{k: "moe" not in ffns for k in ("n_expert", "moe_top_k", "moe_d_ff", "moe_router",
                                          "moe_renorm", "moe_shared_d_ff")},
        "moe_capacity": "moe" not in ffns or cfg.moe_router != "expert_choice",
        "norm_unit_offset": cfg.norm != "rmsnorm", "norm_bias": cfg.norm != "layernorm",
        **{k: not cfg.block_width for k in ("recurrent_layers", "n_states", "state_gate",
                                            "state_forget_bias", "compress_factor",
                                            "compress_slots")},
        "pos_bias_dim": cfg.position != "dynamic_bias",
        "act_threshold": not cfg.act,
        **dict.fromkeys(("encoder", "decoder", "decoder_start_token_id", "layer_pattern",
                         "attention_type", "hybrid_ratio", "ffn_pattern") + TRAINING_ONLY,
                        True),
    }
    out = {f.name: resolved.get(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
           if not unused.get(f.name)}
    return {**out, "layers": [f"{m}+{f}" for m, f in layers]}


def same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def family_config(family, cfg: Config, classifier=False):
    """(config.json fields, the import's Config of them) for one family: its inverse, then its
    import translation, with what the import decides from the weights (a tied head, BERT's NSP
    head, a sequence classifier of n_classes) taken from cfg where the family can hold it."""
    hf = EXPORTS[family][0](cfg)
    make_config, keys, _ = FAMILIES[family]
    raw = make_config(hf)
    keys = EXPORT_KEYS[family](cfg) if family in EXPORT_KEYS else keys
    raw["tie_embeddings"] = cfg.tie_embeddings if any(
        v.endswith("lm_head.weight") for v in keys.values()) else True
    raw["cls_head"] = cfg.cls_head and (classifier or family in PRETRAINING)
    raw["n_classes"] = cfg.n_classes if raw["cls_head"] else Config.n_classes
    pooler = SEQUENCE_CLASSIFIERS[family][2] if classifier else None
    return {**hf, **(pooler(hf) if pooler else {})}, raw


def hf_config(cfg: Config, classifier=False):
    """(model_type, config.json fields, the import's Config fields) of the first HF family whose
    round trip (family_config) gives back every effective field of cfg: that family computes
    exactly what cfg does. A classifier (cfg's cls_head, as a *ForSequenceClassification) is
    matched among the families that have one, on every field but those only its LM head reads
    (LM_HEAD_ONLY: that head is not exported). If none does, a one-line ValueError names the first
    field that no family has (or, when each field is in some family, where the nearest one
    differs)."""
    families = SEQUENCE_CLASSIFIERS if classifier else EXPORTS
    want, misses = effective(cfg), {}
    if classifier:
        want = {k: v for k, v in want.items() if k not in LM_HEAD_ONLY}
    for family in families:
        try:
            hf, raw = family_config(family, cfg, classifier)
            got = effective(Config.from_dict(raw))
        except (KeyError, ValueError, TypeError):  # the family cannot take these values at all
            misses[family] = list(want)
            continue
        misses[family] = [k for k in want if not same(want[k], got.get(k))]
        if not misses[family]:
            return family, hf, raw
    what = "a sequence classifier of this config" if classifier else "this config"
    field = next((k for k in want if all(k in m for m in misses.values())), None)
    if field is not None:
        raise ValueError(f"no HF family expresses {what}: none of {', '.join(families)} has "
                         f"{field}={want[field]!r}; keep it as an anyformer checkpoint")
    near = min(misses, key=lambda f: len(misses[f]))
    raise ValueError(f"no HF family expresses {what}: each field is in some family, but "
                     f"the nearest, {near}, differs in {', '.join(misses[near])}; keep it as an "
                     f"anyformer checkpoint")


def merge_qkv(sd, cfg):  # split_qkv inverted
    for name in [n for n in sd if ".mixer.q_proj." in n]:
        sd[name.replace("q_proj", "qkv")] = torch.cat(
            [sd.pop(name.replace("q_proj", f"{p}_proj")) for p in "qkv"])


def unstack_experts(sd, cfg):  # stack_experts inverted: (E, out, in) -> one matrix per expert
    for name in [n for n in sd if re.search(r"\.ffn\.(gate|up|down)$", n)]:
        stem, part = name.rsplit(".", 1)
        for e, w in enumerate(sd.pop(name).unbind(0)):
            sd[f"{stem}.experts.{e}.{part}.weight"] = w


def split_deltanet_in_proj(sd, cfg):  # merge_deltanet_in_proj inverted: rows grouped per key head
    nk, dk, dv = cfg["dn_heads"], cfg["dn_head_dim"], cfg["dn_v_head_dim"]
    r = cfg["dn_v_heads"] // nk
    for name in [n for n in sd if n.endswith("mixer.in_proj.weight")]:
        q, k, v, z, b, a = (p.unflatten(0, (nk, -1)) for p in sd.pop(name).split(
            [nk * dk, nk * dk, nk * r * dv, nk * r * dv, nk * r, nk * r]))  # each (nk, rows, C)
        stem = name.removesuffix(".weight")
        sd[f"{stem}_qkvz"] = torch.cat([q, k, v, z], 1).flatten(0, 1)
        sd[f"{stem}_ba"] = torch.cat([b, a], 1).flatten(0, 1)


def unflatten_logits_bias(sd, cfg):  # flatten_logits_bias inverted: BART's (1, V) buffer
    sd["decoder.lm_head.bias"] = sd["decoder.lm_head.bias"][None]


UNDO = {transpose_conv1d: transpose_conv1d, split_qkv: merge_qkv,  # each reshape's inverse
        stack_experts: unstack_experts, merge_deltanet_in_proj: split_deltanet_in_proj,
        flatten_logits_bias: unflatten_logits_bias}


def invert(keys):
    """A key table the other way: our template -> (HF template, which HF index each of ours
    fills). The first HF name of ours wins; an HF index ours lacks is 0 (ALBERT's inner layer,
    T5's one relative bias at block 0, layer 0)."""
    out = {}
    for hf, ours in keys.items():
        fields = [f for _, f, _, _ in string.Formatter().parse(ours) if f is not None]
        out.setdefault(re.sub(r"\{\d*\}", "{}", ours),
                       (hf, [int(f) if f else i for i, f in enumerate(fields)]))
    return out


def hf_name(name, table):
    """One of our names -> its HF name through an inverted table, or None: the name as it is,
    then its templates (as rename reads them)."""
    for template, args in [(name, []), *templates(name)]:
        if template in table:
            hf, slots = table[template]
            values = ["0"] * hf.count("{}")
            for value, slot in zip(args, slots):
                values[slot] = value
            return hf.format(*values)
    return None


def hf_weights(model, family, raw, classifier=False) -> dict:
    """The model's weights under the family's HF names, each tensor once (a tied head and an
    encoder-decoder's second embedding name are left to HF's tying, as save_pretrained does); a
    classifier's under its *ForSequenceClassification's names, without the LM head."""
    params = dict(model.named_parameters())          # a shared parameter once, its first name
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    sd = {n: t.detach() for n, t in model.state_dict().items() if (n in params or n not in every)
          and not (classifier and n.startswith(LM_HEAD_WEIGHTS))}
    for reshape in reversed(FAMILIES[family][2]):
        UNDO[reshape](sd, raw)
    keys = EXPORT_KEYS[family](model.config) if family in EXPORT_KEYS else FAMILIES[family][1]
    if classifier:  # its names first: the export writes the first HF name of each of ours
        keys = {**SEQUENCE_CLASSIFIERS[family][1], **keys}
    table, out = invert(keys), {}
    for name, t in sd.items():
        hf = hf_name(name, table)
        if hf is None:
            raise ValueError(f"our weight {name} has no name in HF's {family} layout; this "
                             f"model cannot be exported")
        out[hf] = t.to("cpu", copy=True).contiguous()  # own storage: safetensors refuses views
    return out


def write_atomically(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def check_target(hf_dir: Path):
    """A directory save_pretrained may write: weight files of another model there (shards, an
    index) would be read with or instead of the new model.safetensors."""
    stale = sorted(p.name for p in hf_dir.glob("*.safetensors*") if p.name != "model.safetensors")
    if stale:
        raise ValueError(f"{hf_dir} holds other weight files ({', '.join(stale[:3])}) that a "
                         f"loader would read with or instead of the new model.safetensors; pass "
                         f"an empty or new directory")


def save_pretrained(model, hf_dir, tokenizer=None, token_ids=None, classes=None):
    """Write model as a HF-format directory that transformers' Auto classes load (CausalLM,
    MaskedLM or PreTraining, Seq2SeqLM, SequenceClassification): config.json, model.safetensors
    and, for a tokenizer made from a HF tokenizer.json (data/tokenizers.py), that tokenizer.json.
    The family is the first that computes exactly what model.config does (hf_config); a config
    none expresses is a one-line ValueError naming the field. token_ids: config.json's bos/eos/pad
    ids (e.g. those of the directory the model came from). A model with a classifier (cls_head) is
    written as the family's *ForSequenceClassification, its labels `classes` (id2label; default
    LABEL_i), unless it is an encoder's 2-way head given no classes: that is NSP or SOP
    (*ForPreTraining). A decoder classifier needs token_ids' pad_token_id: HF classifies at the
    last token that is not that id. Each file is written atomically."""
    from safetensors.torch import save_file  # lazy, as in the import
    cfg = model.config
    classifier = cfg.cls_head and (classes is not None or cfg.n_classes != 2
                                   or cfg.architecture != "encoder_only")
    if classes is not None and not cfg.cls_head:
        raise ValueError("classes label a classifier, which this model lacks (cls_head is false); "
                         "pass classes=None")
    if classes is not None and not len(set(classes)) == len(classes) == cfg.n_classes:
        raise ValueError(f"classes={list(classes)!r} must be {cfg.n_classes} distinct labels, one "
                         f"per output of the model's classifier")
    family, hf, raw = hf_config(cfg, classifier)
    tok_json = None
    if tokenizer is not None:
        meta = getattr(tokenizer, "meta", None) or {}
        if meta.get("kind") != "hf":
            raise ValueError(f"tokenizer of kind {meta.get('kind')!r} was not made from a HF "
                             f"tokenizer.json, so there is none to write; pass tokenizer=None")
        tok_json = meta["json"]
    unknown = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))  # not HF's defaults
    config = {**unknown, **(token_ids or {}), **hf, "model_type": family}
    if classifier:
        labels = list(classes) if classes is not None else [f"LABEL_{i}" for i in
                                                            range(cfg.n_classes)]
        config.update(architectures=[SEQUENCE_CLASSIFIERS[family][0]], num_labels=len(labels),
                      id2label={str(i): c for i, c in enumerate(labels)},
                      label2id={c: i for i, c in enumerate(labels)},
                      problem_type="single_label_classification")
        if cfg.architecture == "decoder_only" and config["pad_token_id"] is None:
            raise ValueError("a decoder classifier's config.json needs a pad_token_id (HF reads "
                             "the last token that is not padding): pass token_ids={"
                             "'pad_token_id': an id no text ends with}")
    else:
        config["architectures"] = [PRETRAINING[family] if cfg.cls_head else EXPORTS[family][1]]
    hf_dir = Path(hf_dir)
    check_target(hf_dir)
    weights = hf_weights(model, family, raw, classifier)
    config["dtype"] = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    hf_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(hf_dir / "model.safetensors",
                     lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    write_atomically(hf_dir / "config.json",
                     lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    if tok_json is not None:
        write_atomically(hf_dir / "tokenizer.json", lambda tmp: tmp.write_text(tok_json))
    return hf_dir


def class_names(hf_dir):
    """The labels of a *ForSequenceClassification directory's classifier (config.json's id2label,
    in index order; the model holds only their number), or None for any other directory."""
    hf = read_json(Path(hf_dir) / "config.json")
    if not str((hf.get("architectures") or [""])[0]).endswith("ForSequenceClassification"):
        return None
    id2label = hf.get("id2label") or {}
    n = len(id2label) or hf.get("num_labels", 2)
    return [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(n)]
