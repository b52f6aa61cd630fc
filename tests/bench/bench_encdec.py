"""Encoder-decoder generation speed on CPU: our cache against no cache, and against HF transformers'
generate.

    python tests/bench/bench_encdec.py [--threads 2] [--source 64] [--new_tokens 128] [--reps 3] \\
        [--quick]

For a T5-small-like (d_model 512, 6 + 6 layers, 8 heads of 64, ReLU FF 2048, vocab 32128, tied head)
and a BART-base-like model (d_model 768, 6 + 6 layers, 12 heads, GELU FF 3072, vocab 50265, learned
positions), built by HF with random weights, saved with save_pretrained and loaded with
Transformer.from_pretrained; fp32, batch 1, greedy, a --source-token source, --new_tokens new
tokens, every token generated (no stop):
  ours      model.generate: the encoder runs once, then one token at a time through the decoder's
  static
            KV cache, cross-attention keys/values computed once at the first step;
  no cache  the encoder once, then a full decoder forward over the whole target so far for every
  token; HF        model.generate(do_sample=False, num_beams=1) with its default (dynamic) cache.
tokens/s is the best of --reps whole calls (encoder included; "no cache" runs once), interleaved so
a load spike hits all of them; ours and HF must produce the same tokens.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model import Transformer  # noqa: E402

MODELS = {  # name -> (HF model class, HF config class, config kwargs)
    "t5-small-like": ("T5ForConditionalGeneration", "T5Config",
                      dict(vocab_size=32128, d_model=512, d_kv=64, num_heads=8, d_ff=2048,
                           num_layers=6, feed_forward_proj="relu", decoder_start_token_id=0,
                           pad_token_id=0, eos_token_id=1)),
    "bart-base-like": ("BartForConditionalGeneration", "BartConfig",
                       dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                            encoder_attention_heads=12, decoder_attention_heads=12,
                            encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                            max_position_embeddings=1024)),
}


def build(name):
    import transformers
    model_cls, config_cls, kw = MODELS[name]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Transformer.from_pretrained(d)
    return hf, ours


@torch.no_grad()
def no_cache_generate(model, src, n):
    """Greedy decoding with a full decoder forward over the whole target for every new token."""
    memory = model.encoder.hidden(src)
    seq = torch.full((src.shape[0], 1), model.config.decoder_start_token_id, dtype=torch.long)
    for _ in range(n):
        logits = model.decoder(seq, memory=memory).logits[:, -1]
        seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
    return seq


def bench(name, args):
    hf, ours = build(name)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, hf.config.vocab_size, (1, args.source), generator=g)
    n = args.new_tokens
    runs = {
        "ours": lambda: ours.generate(src, n, temperature=0),
        "no cache": lambda: no_cache_generate(ours, src, n),
        "HF": lambda: hf.generate(src, attention_mask=torch.ones_like(src), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, num_beams=1,
                                  eos_token_id=None, forced_bos_token_id=None,
                                  forced_eos_token_id=None, no_repeat_ngram_size=0,
                                  decoder_start_token_id=hf.config.decoder_start_token_id),
    }
    best, out = {k: float("inf") for k in runs}, {}
    with torch.no_grad():
        for rep in range(args.reps):
            for key, run in runs.items():
                if key == "no cache" and rep:   # several times slower: one run tells
                    continue
                t0 = time.perf_counter()
                out[key] = run()
                best[key] = min(best[key], time.perf_counter() - t0)
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"\n== {name}: {params:.1f}M parameters, fp32, batch 1, source {args.source}, {n} new "
          f"tokens, {args.threads} threads")
    for key in runs:
        print(f"{key:>9}: {n / best[key]:7.1f} tokens/s  ({1e3 * best[key] / n:6.2f} ms/token)")
    distinct = len(set(out["HF"][0, 1:].tolist()))
    print(f"ours / HF: {best['HF'] / best['ours']:.2f}x; ours / no cache: "
          f"{best['no cache'] / best['ours']:.2f}x; tokens identical to HF: "
          f"{torch.equal(out['ours'], out['HF'])}, to no cache: "
          f"{torch.equal(out['ours'], out['no cache'])} ({distinct} distinct of {n})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--source", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", choices=tuple(MODELS))
    p.add_argument("--quick", action="store_true", help="32 new tokens, 1 rep")
    args = p.parse_args()
    if args.quick:
        args.new_tokens, args.reps = 32, 1
    torch.set_num_threads(args.threads)
    for name in MODELS:
        if args.only in (None, name):
            bench(name, args)


if __name__ == "__main__":
    main()
