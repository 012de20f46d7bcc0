"""The tokenizer protocol of core, and the language modality the instruction and seq2seq code speak.

A modality whose preprocessor needs a tokenizer (``ModalityPlugin.needs_tokenizer``) builds, trains, saves and
loads one through its plugin (:meth:`~one_peace.registry.ModalityPlugin.train_tokenizer`,
:meth:`~one_peace.registry.ModalityPlugin.load_tokenizer`). Core code holds tokenizers through this protocol
only; it never imports the text plugin.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

#: The modality of instruction prompts, captions, class names and seq2seq targets ("[TEXT:caption]" slots),
#: and the default partner of ``add_modality``-style alignment. One name, here, for the whole of core.
LANGUAGE = "text"


@runtime_checkable
class Tokenizer(Protocol):
    """What core asks of a tokenizer (the text plugin's ``TextTokenizer`` implements it).

    Attributes:
        vocab_size: Size of the id space (embedding rows needed).
        pad_id: Id of padding.
        bos_id: Id that starts a decoder sequence.
        eos_id: Id that ends a sequence.
        max_tokens: Tokens kept before EOS.
    """

    pad_id: int
    bos_id: int
    eos_id: int
    max_tokens: int

    @property
    def vocab_size(self) -> int:
        """Size of the id space."""
        ...

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, truncated to ``max_tokens``, EOS-terminated."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special ids dropped)."""
        ...

    def save(self, folder: str | Path) -> dict[str, Any]:
        """Write the tokenizer's files into ``folder``; returns the entry :func:`load_tokenizer` reads back."""
        ...


def train_tokenizer(texts: Sequence[str], vocab_size: int, modality: str = LANGUAGE) -> Tokenizer:
    """A tokenizer for ``modality`` trained on ``texts`` (by its plugin)."""
    from one_peace.registry import get_plugin

    return get_plugin(modality).train_tokenizer(texts, vocab_size)


def load_tokenizer(path: str | Path, entry: dict[str, Any] | None = None, modality: str = LANGUAGE) -> Tokenizer:
    """The tokenizer of ``modality`` at ``path`` (a file, or a folder plus the ``entry`` :meth:`Tokenizer.save`
    returned; the official BPE folder without an entry)."""
    from one_peace.registry import get_plugin

    return get_plugin(modality).load_tokenizer(path, entry)
