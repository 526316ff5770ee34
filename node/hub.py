"""Which weight files a shard needs, and fetching only those from the hub.

A model directory with a weight index (`model.safetensors.index.json`) says which file
holds each tensor; a shard needs the files of its layers, plus the embedding (first
shard, and the last when the head is tied to it) and the final norm and head (last
shard). A hub node downloads just those: a 70B model's middle shard never fetches the
embedding.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from node.errors import ModelError

log = logging.getLogger(__name__)

LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_files(path: Path, start: int, end: int, n_layers: int) -> list[Path] | None:
    """The weight files that hold layers start..end (and the embedding / head, where the
    shard needs them), from the directory's weight index; None without an index."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return None
    weight_map: dict = json.loads(index.read_text()).get("weight_map", {})
    if not any(LAYER_KEY.search(name) for name in weight_map):  # names we cannot place
        return sorted({path / f for f in weight_map.values()})
    first, last = start == 0, end == n_layers - 1
    tied = not any("lm_head" in name for name in weight_map)  # the head is the embedding
    files: set[str] = set()
    for name, file in weight_map.items():
        m = LAYER_KEY.search(name)
        if m is not None:
            wanted = start <= int(m.group(1)) <= end
        elif "embed" in name:
            wanted = first or (last and tied)
        else:  # final norm, head
            wanted = last
        if wanted:
            files.add(file)
    return sorted(path / f for f in files)



def fetch_layer_files(repo: str, path: Path, start: int, end: int, n_layers: int) -> bool:
    """Download (once) into the snapshot at `path` the weight files of hub model `repo`
    that hold layers start..end; True when that is only some of the model's files."""
    from huggingface_hub import hf_hub_download

    files = layer_files(path, start, end, n_layers)
    names = [f.name for f in files] if files is not None else ["model.safetensors"]
    for n, name in enumerate(names, start=1):
        log.info("%s: downloading %s (%d of %d) for layers %d-%d", repo, name, n,
                 len(names), start, end)
        try:
            hf_hub_download(repo, name)  # into the snapshot `path` is
        except Exception as e:
            raise ModelError(f"could not download {name} of {repo!r}: {e}") from e
    every = {f.name for f in layer_files(path, 0, n_layers - 1,
                                         n_layers) or []}
    return bool(every - set(names))
