"""Prompt tokenizers: the synthetic models' byte tokenizer and mlx-lm's own, behind the
small interface the entry node and the benchmarks use (encode a prompt or a conversation,
stream text back)."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Protocol


class Detokenizer(Protocol):
    def add_token(self, token: int) -> None: ...
    def finalize(self) -> None: ...
    @property
    def last_segment(self) -> str: ...


class PromptTokenizer(Protocol):
    eos_ids: set[int]

    def encode(self, text: str, chat: bool) -> list[int]: ...
    def encode_messages(self, messages: list[dict]) -> list[int]: ...
    def detokenizer(self) -> Detokenizer: ...


class ByteDetokenizer:
    """Streams UTF-8 text out of byte tokens, holding back partial characters."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def add_token(self, token: int) -> None:
        if token < 256:
            self._pending += self._decoder.decode(bytes([token]))

    def finalize(self) -> None:
        self._pending += self._decoder.decode(b"", final=True)

    @property
    def last_segment(self) -> str:
        out, self._pending = self._pending, ""
        return out


class ByteTokenizer:
    """The synthetic models' tokenizer: one token per UTF-8 byte, plus BOS/EOS/PAD.

    Hand-written because it is four lines of logic; a `tokenizers` BPE would need a
    vocabulary file for no gain on random-weight models.
    """

    BOS, EOS, PAD = 256, 257, 258

    def __init__(self) -> None:
        self.eos_ids = {self.EOS}

    def encode(self, text: str, chat: bool) -> list[int]:
        if chat:
            text = f"<|user|>\n{text}\n<|assistant|>\n"
        return [self.BOS, *text.encode("utf-8")]

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A conversation in the same tags `encode(text, chat=True)` uses for one turn."""
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return [self.BOS, *f"{text}<|assistant|>\n".encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def detokenizer(self) -> ByteDetokenizer:
        return ByteDetokenizer()


class MlxLmTokenizer:
    """mlx-lm's TokenizerWrapper behind the small interface the pipeline uses."""

    def __init__(self, wrapper: Any) -> None:
        self._tok = wrapper
        self.eos_ids = set(wrapper.eos_token_ids)

    def encode(self, text: str, chat: bool) -> list[int]:
        if chat and getattr(self._tok, "chat_template", None):
            ids = self._tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True
            )
            return list(ids)
        bos = self._tok.bos_token
        # as mlx_lm.generate does: add BOS unless the text already starts with it
        add_bos = bos is None or not text.startswith(bos)
        return list(self._tok.encode(text, add_special_tokens=add_bos))

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A conversation through the model's chat template, ready for the reply."""
        if getattr(self._tok, "chat_template", None):
            return list(self._tok.apply_chat_template(messages, add_generation_prompt=True))
        return self.encode("\n".join(m["content"] for m in messages), chat=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def detokenizer(self) -> Detokenizer:
        return self._tok.detokenizer


class Resolved(Protocol):
    """What a tokenizer needs of a resolved model (node.models.ModelSource)."""

    kind: str
    path: Path | None


def prompt_tokenizer(source: Resolved) -> PromptTokenizer:
    """The tokenizer of a resolved model, without loading any weights."""
    if source.kind == "synthetic":
        return ByteTokenizer()
    from mlx_lm.utils import load_tokenizer

    return MlxLmTokenizer(load_tokenizer(source.path))
