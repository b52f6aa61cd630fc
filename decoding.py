"""Decoding beyond plain sampling, for any model.py model: int8 weights, speculative decoding and
beam search. model.py keeps the model, its cache and generate(); this file builds on them.

  quantize(model, "int8")                  Linear weights -> int8, on the device's fastest kernel
  speculative_generate(target, draft, ids, n, draft_tokens=4, ...)
                                           Leviathan et al. 2023: a small draft proposes, the
                                           target checks a whole chunk in one forward
  beam_search(model, ids, n, num_beams=4, length_penalty=1.0, early_stopping=False, ...)
                                           HF generate(num_beams=...)'s search, token for token
"""
import functools
import itertools
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (
    GLU,
    MoE,
    apply_repetition_penalty,
    check_ids,
    check_inputs,
    check_room,
    check_sampling,
    decode_step,
    first_stop,
    left_pad,
    sampling_probs,
)

# ----------------------------------------------------------------------------------------------
# 1. int8 weights. Each output channel (row) of a Linear weight is scaled into [-127, 127] and
# rounded: int8 w8 with w ~ w8 * scale, scale = max|row| / 127. Which kernel runs it depends on the
# device (measured on a 2-core Sapphire Rapids, torch 2.13, one token = a matrix-vector product):
#   CPU   torch's dynamic int8 Linear (fbgemm/x86, qnnpack on ARM): each call quantizes its input
#         to uint8 and runs an int8 GEMM. 2.5-6x faster than fp32 on large matrices (32000 x 512:
#         0.5 vs 3.0 ms), ~1% relative error, but ~40 us of fixed cost per call, so below
#         INT8_MIN_WEIGHTS weights fp32 is faster and the Linear is left as it is.
#         (torch._weight_int8pack_mm is 8x slower than fp32 here; bf16 matvec is slower too.)
#   GPU   weight-only int8: F.linear over the int8 matrix converted to the input's dtype, times the
#         scales. Eager that converts the whole matrix each call; under torch.compile (generate
#         with compile=True) the conversion fuses into the matmul, reading 1 byte per weight.

INT8_MIN_WEIGHTS = 1 << 19  # CPU: smaller Linears run faster in fp32 (the kernel's fixed cost)


def int8_rows(w):
    """w (out, in) -> (int8 (out, in), fp32 scales (out,)) with w ~ int8 * scales[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).to(torch.int8), scale


class DynamicInt8Linear(nn.Module):
    """A CPU Linear with int8 weights run by torch.ops.quantized.linear_dynamic. The weight lives
    packed for the kernel (not a parameter: quantize a model after moving it, for inference)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w8, scale = int8_rows(linear.weight)
        zero = torch.zeros(len(scale), dtype=torch.long)
        with warnings.catch_warnings():  # torch 2.13 deprecates qint8 tensors; the kernel needs one
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(w8, scale.double(), zero, 0)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(qw, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.reduce_range = not full_range_exact()
        self.key = next(KEYS)
        INT8_LINEARS[self.key] = self

    def forward(self, x):                                            # (.., in) -> (.., out)
        return int8_linear(x, self.key)


# torch.compile cannot trace the kernel's packed weight (a TorchScript object), so the kernel runs
# as a custom op that names its layer by a key: a compiled decode step stays one graph.
INT8_LINEARS = weakref.WeakValueDictionary()  # key -> DynamicInt8Linear; gone with its layer
KEYS = itertools.count()


@torch.library.custom_op("anyformer::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, key: int) -> torch.Tensor:
    layer = INT8_LINEARS[key]
    return torch.ops.quantized.linear_dynamic(x.float(), layer.packed, layer.reduce_range).to(
        x.dtype)


@int8_linear.register_fake
def _(x, key):                                                       # the output's shape alone
    return x.new_empty(*x.shape[:-1], INT8_LINEARS[key].out_features)


@functools.cache
def full_range_exact():
    """Whether the CPU kernel multiplies 8-bit inputs exactly. Without VNNI, x86 int8 kernels sum
    pairs of uint8 x int8 products in 16 bits, which saturate (255 * 127 * 2 > 32767); torch's
    remedy, reduce_range, quantizes inputs to 7 bits (~1.7% error against ~1.0%). A matrix of ones
    times a vector of ones (every pair at the maximum) tells which kind of kernel runs here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ones = torch.quantize_per_tensor(torch.ones(8, 64), 1.0, 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(ones, None)
    y = torch.ops.quantized.linear_dynamic(torch.ones(1, 64), packed, False)
    return bool((y == 64).all())


class WeightOnlyInt8Linear(nn.Module):
    """A Linear with int8 weights and per-row scales, dequantized in the matmul (GPUs)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w8, scale = int8_rows(linear.weight)
        self.register_buffer("weight", w8.to(linear.weight.device))
        self.register_buffer("scale", scale.to(linear.weight))
        self.bias = linear.bias

    def forward(self, x):                                            # (.., in) -> (.., out)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


def int8_kernel(linear: nn.Linear, min_weights):
    """The int8 replacement for one Linear on its device, or the Linear itself where int8 would
    be slower (a small matrix on the CPU kernel)."""
    if linear.weight.device.type != "cpu" or torch.backends.quantized.engine == "none":
        return WeightOnlyInt8Linear(linear)
    return DynamicInt8Linear(linear) if linear.weight.numel() >= min_weights else linear


QUANTIZERS = {"int8": int8_kernel}  # mode -> (Linear, min_weights) -> its replacement


def quantize(model: nn.Module, mode="int8", min_weights=INT8_MIN_WEIGHTS):
    """Replace the model's Linear layers (the LM head included) by `mode` kernels, in place, and
    return the model; a GLU's gate and up become one matrix first. For inference: call it last
    (after .to(device)); the weights are not trainable and not saved. min_weights: CPU Linears
    smaller than this stay as they are (0: all).
    The CPU kernel quantizes each call's input with one scale, so a token's result depends a
    little on what shares its call (a prompt's prefill against token by token, a batch's other
    rows): unlike fp32, an int8 batch row is close to, not equal to, its prompt decoded alone.
    """
    if mode not in QUANTIZERS:
        raise ValueError(f"quantize mode {mode!r} is not one of {sorted(QUANTIZERS)}")
    if any(isinstance(m, MoE) for m in model.modules()):
        raise ValueError("int8 covers Linear layers; MoE expert stacks (E, out, in) are not, and "
                         "would stay in full precision: quantize a dense model")
    for glu in [m for m in model.modules() if isinstance(m, GLU) and m.gate_up is None]:
        glu.gate_up = stack_linears(glu.gate, glu.up)  # one kernel call for both: each has a cost
        del glu.gate, glu.up
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, QUANTIZERS[mode](child, min_weights))
    return model


def stack_linears(a: nn.Linear, b: nn.Linear):
    """One Linear computing [a(x), b(x)] along the last dimension."""
    both = nn.Linear(a.in_features, a.out_features + b.out_features, bias=a.bias is not None,
                     device=a.weight.device, dtype=a.weight.dtype)
    with torch.no_grad():
        both.weight.copy_(torch.cat((a.weight, b.weight)))
        if a.bias is not None:
            both.bias.copy_(torch.cat((a.bias, b.bias)))
    return both


# ----------------------------------------------------------------------------------------------
# 2. Speculative decoding (Leviathan et al. 2023, arXiv:2211.17192). Each round the draft model
# proposes k tokens one at a time; the target scores all of them in one forward over a chunk of
# k + 1 tokens (about the cost of one step when reading the weights dominates). Draft token i is
# kept with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the next token is
# drawn from max(0, p_i - q_i) renormalised, and if all k are kept, from p_{k+1}. The output is
# distributed exactly as sampling from the target alone; greedy (temperature 0) keeps the drafts
# that equal the target's argmax, so its output is plain greedy decoding's.

def speculative_accept(p, q, drafts, generator=None):
    """One verification for N independent rounds. p (N, k+1, V): the target's distributions at
    each draft position and after the last; q (N, k, V): the draft's; drafts (N, k) drawn from q.
    Returns (accepted (N,) in 0..k, next token (N,))."""
    N, k, V = q.shape
    at = drafts[..., None]
    p_d, q_d = p[:, :k].gather(-1, at)[..., 0], q.gather(-1, at)[..., 0]        # (N, k)
    u = torch.rand(N, k, generator=generator, device=p.device)
    kept = (u * q_d < p_d).long().cumprod(dim=-1)            # u < p/q, up to the first rejection
    m = kept.sum(dim=-1)                                                      # (N,)
    q_pad = torch.cat((q, torch.zeros(N, 1, V, device=q.device)), dim=1)     # q_{k+1} = 0: p_{k+1}
    rows = torch.arange(N, device=p.device)
    residual = (p[rows, m] - q_pad[rows, m]).clamp(min=0)                     # (N, V)
    nxt = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1, generator=generator)
    return m, nxt[:, 0]


def check_stateless(model, what):
    """Speculative decoding and beam search rewind or reorder the cache: attention layers only
    (a DeltaNet state or block memory cannot step back, and is not reordered)."""
    stack = model.decoder if model.config.architecture == "encoder_decoder" else model
    kinds = set(stack.mixer_types)
    if not kinds <= {"attn", "local_attn", "deltanet"} or (what == "speculative decoding" and
                                                            "deltanet" in kinds):
        raise ValueError(f"{what} needs a cache it can rewind and reorder; this model has "
                         f"{sorted(kinds)} layers (attn and local_attn only"
                         f"{'' if what == 'speculative decoding' else ', or deltanet'})")


class Distributions:
    """What a round compares at each of n consecutive positions: the logits after the repetition
    penalty (greedy: temperature 0), or the probabilities sampling draws from."""

    def __init__(self, temperature, repetition_penalty, filters):
        self.temperature, self.penalty, self.filters = temperature, repetition_penalty, filters

    def __call__(self, logits, seq, new):
        """logits (n, V) at the positions after seq (1, L) + new[:m - n + 1 + i], row i; new (m,)
        the tokens since seq."""
        if self.penalty != 1.0:
            start = len(new) - len(logits) + 1
            logits = torch.cat([apply_repetition_penalty(
                row[None], torch.cat((seq, new[None, :start + i]), 1), self.penalty)
                for i, row in enumerate(logits)])
        if self.temperature == 0:
            return logits
        return sampling_probs(logits, self.temperature, **self.filters)


@torch.no_grad()
def speculative_generate(target, draft, input_ids, max_new_tokens, draft_tokens=4,
                         temperature=1.0, top_k=None, top_p=None, min_p=None,
                         repetition_penalty=1.0, stop_tokens=(), generator=None, callback=None,
                         stats=None):
    """target.generate(input_ids (1, T), max_new_tokens, ...)'s output, drafted by `draft` (a
    smaller decoder over the same vocabulary) draft_tokens at a time. Greedy: the same tokens;
    sampling: the same distribution. stats (a dict) receives rounds, drafted and accepted."""
    check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    for m in (target, draft):
        if m.config.architecture != "decoder_only":
            raise ValueError(f"speculative decoding pairs decoder-only models; got "
                             f"{m.config.architecture}")
        check_stateless(m, "speculative decoding")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size}) must be the "
                         f"target's ({target.config.vocab_size}): the same tokenizer")
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens={draft_tokens} must be at least 1")
    check_inputs(input_ids)
    check_ids(input_ids, target.config.vocab_size)
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one sequence (rows accept different numbers "
                         f"of drafts); got a batch of {input_ids.shape[0]}")
    T, total = input_ids.shape[1], input_ids.shape[1] + max_new_tokens
    for m in (target, draft):
        check_room(m.config, T, max_new_tokens)
    dist = Distributions(temperature, repetition_penalty, dict(top_k=top_k, top_p=top_p,
                                                                 min_p=min_p))
    # the target verifies k + 1 tokens at once; the draft catches up on 2 after a full accept
    t_cache = target.setup_cache(1, total, device=input_ids.device, chunk=draft_tokens + 1)
    d_cache = draft.setup_cache(1, total, device=input_ids.device, chunk=2)
    run = lambda m, cache, ids, start: m(ids, cache=cache, input_pos=torch.arange(
        start, start + ids.shape[1], device=ids.device)).logits[0]              # (n, V)
    seq = input_ids
    if T > 1:                          # both caches hold every token but the last one
        run(target, t_cache, seq[:, :-1], 0)
        run(draft, d_cache, seq[:, :-1], 0)
    unseen = seq[:, -1:]               # tokens the draft has not read, ending at position n - 1
    counts = dict(rounds=0, drafted=0, accepted=0)
    while seq.shape[1] < total:
        n, k = seq.shape[1], min(draft_tokens, total - seq.shape[1] - 1)
        drafts = torch.zeros(k, dtype=torch.long, device=seq.device)
        q = torch.zeros(k, target.config.vocab_size, device=seq.device)   # the draft's dists
        for j in range(k):             # the draft proposes k tokens, one forward each
            logits = run(draft, d_cache, unseen, n - unseen.shape[1] + j)[-1:]
            q[j] = dist(logits, seq, drafts[:j])[0]
            drafts[j] = (q[j].argmax() if temperature == 0 else
                         torch.multinomial(q[j], 1, generator=generator)[0])
            unseen = drafts[None, j:j + 1]
        chunk = torch.cat((seq[:, -1:], drafts[None]), dim=1)                    # (1, k + 1)
        p = dist(run(target, t_cache, chunk, n - 1), seq, drafts)              # (k + 1, V)
        if temperature == 0:
            same = (p[:k].argmax(-1) == drafts).long().cumprod(0)
            m = int(same.sum())
            nxt = p[m].argmax(-1)
        else:
            m, nxt = speculative_accept(p[None], q[None], drafts[None], generator)
            m, nxt = int(m[0]), nxt[0]
        new = torch.cat((drafts[:m], nxt[None]))
        new = new[:first_stop(new, stop_tokens)]
        for t in new if callback is not None else ():
            callback(t[None])
        seq = torch.cat((seq, new[None]), dim=1)
        counts = dict(rounds=counts["rounds"] + 1, drafted=counts["drafted"] + k,
                      accepted=counts["accepted"] + m)
        if int(new[-1]) in stop_tokens:
            break
        # the draft read drafts[:k-1]; a full accept leaves it the last draft and the new token
        unseen = torch.cat((drafts[k - 1:], nxt[None]))[None] if m == k and k else nxt[None, None]
    if stats is not None:
        stats.update(counts)
    return seq


# ----------------------------------------------------------------------------------------------
# 3. Beam search, as HF transformers 5.23's generate(num_beams=...) runs it (GenerationMixin.
# _beam_search), so that both return the same sequences. Per batch row: num_beams running
# hypotheses with their summed log-probabilities; each step takes the top 2 * num_beams of all
# beam x token continuations (enough to keep num_beams running if some end); those that end (a
# stop token, or the length limit) among the top num_beams enter the finished set with score
# sum / generated_length ** length_penalty, the rest continue. It stops when every row's finished
# set is full and (early_stopping False) no running beam could still beat its worst member at the
# current length, (True) at once, ("never") at the best length the limit allows.

def gather_beams(t, idx):           # t (B, K, ..) -> t[b, idx[b, j]] for idx (B, J)
    while idx.dim() < t.dim():
        idx = idx[..., None]
    return torch.take_along_dim(t, idx, dim=1)


@torch.no_grad()
def beam_search(model, input_ids, max_new_tokens, num_beams=4, length_penalty=1.0,
                early_stopping=False, stop_tokens=(), attention_mask=None):
    """The best of num_beams hypotheses per row: (B, T + n) after a decoder's prompt input_ids
    (B, T), or (B, 1 + n) from an encoder-decoder's decoder_start_token_id for its source
    input_ids (B, S) with padding attention_mask. Rows shorter than the longest end in repeats of
    their stop token. early_stopping: False, True or "never" (as HF). A decoder also takes a list
    of prompts of any lengths (one left-padded batch, as in generate) and returns a list."""
    cfg, ids, keep = model.config, input_ids, None
    if isinstance(ids, list) and cfg.architecture == "decoder_only":
        ids, keep = left_pad(ids, max_new_tokens, model.wte.weight.device)
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams} must be at least 1")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping={early_stopping!r} must be True, False or 'never'")
    if cfg.architecture == "encoder_only":
        raise ValueError("beam search decodes with a decoder; this model is encoder_only")
    check_stateless(model, "beam search")
    check_inputs(ids, attention_mask=attention_mask)
    check_ids(ids, cfg.vocab_size)
    B, nb, V = ids.shape[0], num_beams, cfg.vocab_size
    if cfg.architecture == "encoder_decoder":
        check_room(model.decoder.config, 1, max_new_tokens)
        memory = model.encoder.hidden(ids, attention_mask=attention_mask).repeat_interleave(nb, 0)
        mask = None if attention_mask is None else attention_mask.repeat_interleave(nb, 0)
        cache = model.setup_cache(B * nb, 1 + max_new_tokens, device=ids.device)
        step = lambda x, pos: model(None, x, attention_mask=mask, cache=cache, input_pos=pos,
                                    memory=memory).logits[:, -1]
        ids = torch.full((B, 1), cfg.decoder_start_token_id, device=ids.device)
    else:
        if attention_mask is not None:
            raise ValueError("a decoder's beam search pads prompts itself: pass them as a list")
        check_room(cfg, ids.shape[1], max_new_tokens)
        cache = model.setup_cache(B * nb, ids.shape[1] + max_new_tokens, device=ids.device)
        mask = None if keep is None else keep.repeat_interleave(nb, 0)
        step = lambda x, pos: decode_step(model, x, pos, cache, mask)
    prompt_len = ids.shape[1]
    max_len, dev = prompt_len + max_new_tokens, ids.device
    n_cand = max(2, 1 + len(stop_tokens)) * nb               # candidates kept per step
    top_nb = torch.arange(n_cand, device=dev) < nb     # those that may enter the finished set
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=dev)
    fill = stop_tokens[0] if stop_tokens else 0
    running = torch.full((B, nb, max_len), fill, dtype=torch.long, device=dev)
    running[:, :, :prompt_len] = ids[:, None]
    scores = torch.zeros(B, nb, device=dev)
    scores[:, 1:] = -1e9                      # every beam starts as the same prompt: count it once
    done_seqs, done_scores = running.clone(), torch.full((B, nb), -1e9, device=dev)
    done_lens = torch.zeros(B, nb, dtype=torch.long, device=dev)
    finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    offsets = torch.arange(B, device=dev)[:, None] * nb
    logits = step(ids.repeat_interleave(nb, 0), torch.arange(prompt_len, device=dev))
    for cur in range(prompt_len, max_len):
        logp = F.log_softmax(logits.float(), dim=-1).view(B, nb, V) + scores[..., None]
        top_logp, top_idx = torch.topk(logp.view(B, nb * V), n_cand)            # (B, n_cand)
        beam, tok = top_idx // V, top_idx % V
        cand = gather_beams(running, beam)
        cand[:, :, cur] = tok
        ends = torch.isin(tok, stop) | (cur + 1 >= max_len)
        # the best num_beams candidates that go on
        alive_logp = top_logp + ends.float() * -1e9
        pick = torch.topk(alive_logp, nb).indices
        running, scores = gather_beams(cand, pick), gather_beams(alive_logp, pick)
        rows = (gather_beams(beam, pick) + offsets).flatten()  # each running beam's parent row
        # the finished set: merge in the ended top-num_beams candidates, scored per length
        # (-1e9 terms added one by one as HF does: in fp32 their sum rounds the same way)
        new = top_logp / (cur + 1 - prompt_len) ** length_penalty
        new = new + (finished.all(-1, keepdim=True) & (early_stopping is True)).float() * -1e9
        new = new + (~improvable).float() * -1e9
        new = new + (~(ends & top_nb)).float() * -1e9
        merged = torch.topk(torch.cat((done_scores, new), 1), nb).indices
        lens = torch.full((B, n_cand), cur + 1 - prompt_len, device=dev)
        done_seqs = gather_beams(torch.cat((done_seqs, cand), 1), merged)
        done_scores = gather_beams(torch.cat((done_scores, new), 1), merged)
        done_lens = gather_beams(torch.cat((done_lens, lens), 1), merged)
        finished = gather_beams(torch.cat((finished, ends & top_nb), 1), merged)
        # can a running beam still beat the worst finished one?
        best_len = (max_len if early_stopping == "never" and length_penalty > 0 else cur + 1)
        best = scores[:, :1] / (best_len - prompt_len) ** length_penalty
        worst = torch.where(finished, done_scores.min(1, keepdim=True).values, -1e9)
        improvable = improvable & (best > worst).any(-1, keepdim=True)
        if not (bool(improvable.any()) and not (bool(finished.all()) and early_stopping is True)
                and not bool(ends.all())):
            break
        for c in cache:
            c.reorder(rows)
        logits = step(running[:, :, cur].reshape(-1, 1), torch.tensor([cur], device=dev))
    best = done_seqs[:, 0, :prompt_len + int(done_lens[:, 0].max())]
    if keep is None:
        return best
    return [row[prompt_len - len(p):].tolist()[:len(p) + first_stop(row[prompt_len:], stop_tokens)]
            for p, row in zip(input_ids, best)]
