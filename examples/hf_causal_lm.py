"""A Hugging Face transformers Llama trained with and without torch_ext.fuse(): the same model,
the same batches, the same losses; the fused one computes its loss from the hidden states with
linear_cross_entropy (never the tokens x vocabulary logits) and runs each MLP as one fused op.

The model is built from a config (random init, nothing downloaded): 2 layers, hidden 256,
vocabulary 32000. The text comes from a random Markov chain over the vocabulary (each token has 4
possible successors), sampled afresh every step. Both models start from the same weights and see
the same batches; the fused one prints its loss every few steps, and the summary gives the
tokens per second and the peak memory of a training step of each, and the largest difference
between their losses. Needs `pip install transformers`.

    python examples/hf_causal_lm.py                       # 4 x 512 tokens a step, ~1 min on 2 cores
    python examples/hf_causal_lm.py --seq-len 128 --plot llama.png
"""
from __future__ import annotations

import copy
import time

from _common import LossLog, parser, setup  # first: it sets OMP_WAIT_POLICY before torch loads

import torch

import torch_ext

SUCCESSORS = 4


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_of(step):
    """(MB the process's peak resident size rises above its size before `step()`, its result)
    (Linux: VmHWM is reset by writing 5 to /proc/self/clear_refs); NaN where it cannot be measured."""
    torch_ext.empty_cache()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    except OSError:
        return float("nan"), step()
    result = step()
    return (_status_kib("VmHWM") - before) / 1024, result


def main() -> None:
    p = parser(__doc__, steps=20, batch_size=4, lr=3e-4, log_every=5)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default %(default)s)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default %(default)s)")
    args = p.parse_args()
    gen = setup(args)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise SystemExit("this example needs transformers: pip install transformers") from None

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq_len,
                         tie_word_embeddings=False)
    plain = LlamaForCausalLM(config).train()
    fused, report = torch_ext.fuse(copy.deepcopy(plain), return_report=True)  # same initial weights
    successors = torch.randint(args.vocab, (args.vocab, SUCCESSORS), generator=gen)

    def batch() -> torch.Tensor:
        ids = torch.empty(args.batch_size, args.seq_len, dtype=torch.long)
        ids[:, 0] = torch.randint(args.vocab, (args.batch_size,), generator=gen)
        for t in range(1, args.seq_len):
            pick = torch.randint(SUCCESSORS, (args.batch_size,), generator=gen)
            ids[:, t] = successors[ids[:, t - 1], pick]
        return ids

    models = {"unfused": plain, "fused": fused}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr) for k, m in models.items()}
    seconds = {k: 0.0 for k in models}
    peaks = {}

    def step(name: str, ids: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        opts[name].zero_grad(set_to_none=True)
        loss = models[name](input_ids=ids, labels=ids).loss  # HF shifts the labels itself
        loss.backward()
        opts[name].step()
        seconds[name] += time.perf_counter() - start
        return loss.detach()

    print(f"Llama causal LM (2 layers, hidden 256, vocab {args.vocab}), {args.batch_size} x {args.seq_len} tokens "
          f"a step; fuse() replaced {len(report.replaced)}:")
    for line in report.replaced:
        print(f"  {line}")
    log = LossLog(args.steps, args.log_every)
    worst = 0.0
    for s in range(1, args.steps + 1):
        ids = batch()
        losses = {}
        for name in models:
            if s == 2:  # after the first step has created the optimizer state
                peaks[name], losses[name] = peak_memory_of(lambda name=name, ids=ids: step(name, ids))
            else:
                losses[name] = step(name, ids)
        if s <= 2:  # tokens/s from step 3 on (the first steps allocate)
            seconds = {k: 0.0 for k in models}
        worst = max(worst, abs(float(losses["fused"]) - float(losses["unfused"])))
        log(s, losses["fused"])
    timed = max(1, args.steps - 2) * args.batch_size * args.seq_len
    rate = {k: timed / max(v, 1e-9) for k, v in seconds.items()}
    log.summary(
        f"tokens/s unfused {rate['unfused']:.0f}, fused {rate['fused']:.0f} ({rate['fused'] / rate['unfused']:.2f}x); "
        f"peak step memory unfused {peaks.get('unfused', float('nan')):.0f} MB, "
        f"fused {peaks.get('fused', float('nan')):.0f} MB; "
        f"largest loss difference {worst:.2e}")
    log.plot(args.plot, "Llama causal LM through torch_ext.fuse()")


if __name__ == "__main__":
    main()
