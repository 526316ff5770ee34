"""What the benchmark scripts share: the prompt and the single-process mlx_lm reference."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from node.blas import openblas_env

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def prompt_ids(model: str, layers: int = 0) -> list[int]:
    from node.models import resolve
    from node.tokenizers import prompt_tokenizer

    return prompt_tokenizer(resolve(model, layers=layers)).encode(PROMPT, chat=True)


def add_model_arguments(parser: argparse.ArgumentParser, default: str = "smollm2-135m") -> None:
    """--model (any spec: `mlx-cluster models`), --layers and --dtype, as `load` takes them."""
    parser.add_argument("--model", default=default,
                        help="any model spec, e.g. synthetic:qwen3-1.7b or a model directory")
    parser.add_argument("--layers", type=int, default=0,
                        help="layer count override (synthetic models)")
    parser.add_argument("--dtype", default="", help="compute dtype (default: the nodes')")


def single_process(model: str, ids: list[int], tokens: int, layers: int = 0,
                   dtype: str = "") -> dict:
    """One mlx_lm generation in a fresh process with the nodes' BLAS, EOS ignored:
    token_ids, logprobs, itl_s, ttft_s, decode_tokens_per_s (node/reference.py)."""
    cmd = [sys.executable, "-m", "node.reference", "--model", model, "--prompt-ids",
           ",".join(map(str, ids)), "--max-tokens", str(tokens), "--ignore-eos",
           "--layers", str(layers), "--dtype", dtype]
    res = subprocess.run(cmd, capture_output=True, text=True, env=openblas_env(), cwd=ROOT)
    if res.returncode:
        sys.exit(f"reference failed:\n{res.stderr}")
    return json.loads(res.stdout.splitlines()[-1])
