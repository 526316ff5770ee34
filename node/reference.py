"""Single-process reference: the whole model in this process, mlx-lm's own generation loop.

The pipeline must produce exactly these tokens. Tests and benchmarks run it in a
subprocess (`python -m node.reference ...`) with the same BLAS the nodes use, because
different BLAS libraries round differently and greedy decoding would notice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from node.blas import blas_in_use, reexec_with_openblas


def load_whole(spec: str, dtype: str = "", layers: int = 0):
    """(model, tokenizer) for a spec, all layers in this process."""
    from node.models import load_shard, resolve

    source = resolve(spec, dtype, layers)
    shard = load_shard(source, 0, source.n_layers - 1)
    return shard.model, shard.tokenizer


def reference_generate(spec: str, prompt_ids: list[int], max_tokens: int, dtype: str = "",
                       layers: int = 0, stop_at_eos: bool = True) -> dict:
    """Greedy tokens (and their log-probabilities) from mlx_lm.generate_step, with timing."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, tokenizer = load_whole(spec, dtype, layers)
    eos = tokenizer.eos_ids if tokenizer else set()
    tokens: list[int] = []
    logprobs: list[float] = []
    t0 = time.perf_counter()
    t_first = t0
    itl: list[float] = []
    t_prev = t0
    for token, lp in generate_step(mx.array(prompt_ids), model, max_tokens=max_tokens):
        now = time.perf_counter()
        if not tokens:
            t_first = now
        else:
            itl.append(now - t_prev)
        t_prev = now
        if stop_at_eos and token in eos:
            break
        tokens.append(int(token))
        logprobs.append(float(lp[token].item()))
    t_end = time.perf_counter()
    decode = (len(tokens) - 1) / (t_end - t_first) if len(tokens) > 1 else 0.0
    return {"token_ids": tokens, "logprobs": logprobs, "itl_s": itl, "ttft_s": t_first - t0,
            "decode_tokens_per_s": decode,
            "blas": blas_in_use()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="single-process reference generation")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true")
    args = parser.parse_args(argv)
    reexec_with_openblas()
    ids = [int(t) for t in args.prompt_ids.split(",")]
    result = reference_generate(args.model, ids, args.max_tokens, args.dtype, args.layers,
                                stop_at_eos=not args.ignore_eos)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
