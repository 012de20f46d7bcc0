"""Text modality: GPT-2 byte-level BPE, learned CLS and absolute positions, 1-D bucketed relative bias."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from one_peace.config import ModelConfig
from one_peace.errors import InvalidValue
from one_peace.media import Preview
from one_peace.models.adapter import Adapter, AdapterOutput, host_checks, init_rel_table, padding_or_none, require
from one_peace.models.relpos import bucket_1d, bucket_1d_rows
from one_peace.registry import MaskingPolicy, ModalityPlugin, OfficialKeyRule, PluginOptions, register_modality

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 1, 0, 2, 3
BPE_FILES = ("encoder.json", "vocab.bpe", "dict.txt")


class TextTokenizer:
    """Official ONE-PEACE text tokenisation (``' ' + text.lower()`` -> GPT-2 BPE -> fairseq ids).

    Built either from the official BPE files (``encoder.json``, ``vocab.bpe``, ``dict.txt`` in a folder the
    user points to) or from a ``tokenizer.json`` trained with the ``tokenizers`` library (ids are then used
    directly, shifted past the four special ids).

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` doing byte-level BPE.
        id_map: GPT-2 id -> fairseq dictionary id (official files); ``None`` for trained tokenizers.
        max_tokens: Tokens kept before EOS (official: 70).
        source: Where the files came from (for messages and for :meth:`save`).
    """

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, tokenizer: Any, id_map: dict[int, int] | None, max_tokens: int = 70, source: Path | None = None):
        self.tokenizer = tokenizer
        self.id_map = id_map
        self.max_tokens = max_tokens
        self.source = source

    @property
    def vocab_size(self) -> int:
        """Size of the id space (embedding rows needed)."""
        if self.id_map is not None:
            return max(self.id_map.values()) + 1
        return int(self.tokenizer.get_vocab_size()) + 4

    @classmethod
    def from_bpe_dir(cls, bpe_dir: str | Path, max_tokens: int = 70) -> TextTokenizer:
        """Load the official GPT-2 BPE files from ``bpe_dir``.

        Raises:
            FileNotFoundError: a required file is missing (the message names it).
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        bpe_dir = Path(bpe_dir)
        for name in BPE_FILES:
            if not (bpe_dir / name).is_file():
                raise FileNotFoundError(
                    f"text tokenizer: {bpe_dir / name} not found (bpe_dir needs {', '.join(BPE_FILES)})"
                )
        tok = Tokenizer(models.BPE.from_file(str(bpe_dir / "encoder.json"), str(bpe_dir / "vocab.bpe")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        id_map: dict[int, int] = {}
        with open(bpe_dir / "dict.txt", encoding="utf-8") as fh:
            for line_no, line in enumerate(fh):
                word = line.rsplit(" ", 1)[0].strip()
                if word.lstrip("-").isdigit():
                    id_map[int(word)] = 4 + line_no
        if not id_map:
            raise ValueError(f"text tokenizer: {bpe_dir / 'dict.txt'} holds no 'GPT2-ID COUNT' lines")
        return cls(tok, id_map, max_tokens, bpe_dir)

    @classmethod
    def from_file(cls, path: str | Path, max_tokens: int = 70) -> TextTokenizer:
        """Load a trained ``tokenizer.json`` (from :meth:`train` or the ``tokenizers`` library)."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), None, max_tokens, Path(path))

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int = 2000, max_tokens: int = 70) -> TextTokenizer:
        """Train a byte-level BPE on ``texts`` (for runs from scratch; no outside files needed)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator((" " + t.lower() for t in texts), trainer=trainer)
        return cls(tok, None, max_tokens)

    def ids(self, text: str) -> list[int]:
        """All token ids of one string, without EOS and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text input must be a str, got {type(text).__name__}")
        raw = self.tokenizer.encode(" " + text.lower(), add_special_tokens=False).ids
        return [self.id_map.get(i, UNK_ID) for i in raw] if self.id_map is not None else [i + 4 for i in raw]

    def encode(self, text: str) -> list[int]:
        """Token ids of one string: at most ``max_tokens`` ids followed by EOS."""
        return [*self.ids(text)[: self.max_tokens], EOS_ID]

    def chunks(self, text: str) -> list[list[int]]:
        """The ids of one string cut into consecutive pieces of ``max_tokens``, each followed by EOS."""
        ids = self.ids(text)
        step = self.max_tokens
        return [[*ids[i : i + step], EOS_ID] for i in range(0, max(1, len(ids)), step)]

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`encode` (special ids dropped)."""
        if self.id_map is not None:
            inv = getattr(self, "_inv", None)
            if inv is None:
                inv = {v: k for k, v in self.id_map.items()}
                self._inv = inv
            raw = [inv[i] for i in ids if i in inv]
        else:
            raw = [i - 4 for i in ids if i >= 4]
        return str(self.tokenizer.decode(raw)).strip()

    def word_start_table(self) -> torch.Tensor:
        """``(vocab_size,)`` bool: which ids begin a word (byte-level BPE marks a leading space with ``Ġ``).

        Special ids count as word starts; ids of continuation pieces (no ``Ġ``) are False. Whole-word masking uses
        this to mask every piece of a word together.
        """
        size = self.vocab_size
        starts = [True] * 4 + [False] * (size - 4)
        for piece, raw in self.tokenizer.get_vocab().items():
            ours = self.id_map.get(raw) if self.id_map is not None else raw + 4
            if ours is not None and 4 <= ours < size:
                starts[ours] = piece.startswith("\u0120")
        return torch.tensor(starts, dtype=torch.bool)

    def save(self, folder: str | Path) -> dict[str, Any]:
        """Write the tokenizer files into ``folder``; returns the config entry describing them."""
        folder = Path(folder)
        if self.id_map is not None:
            if self.source is None:
                raise ValueError("cannot save an official BPE tokenizer without its source folder")
            for name in BPE_FILES:
                shutil.copyfile(Path(self.source) / name, folder / name)
            return {"kind": "gpt2_bpe", "files": list(BPE_FILES), "max_tokens": self.max_tokens}
        self.tokenizer.save(str(folder / "tokenizer.json"))
        return {"kind": "tokenizers", "files": ["tokenizer.json"], "max_tokens": self.max_tokens}

    @classmethod
    def from_config(cls, folder: str | Path, entry: dict[str, Any]) -> TextTokenizer:
        """Load what :meth:`save` wrote, given its config entry (``max_tokens``: an integer >= 1)."""
        max_tokens = entry.get("max_tokens", 70)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if entry.get("kind") == "gpt2_bpe":
            return cls.from_bpe_dir(folder, max_tokens)
        if entry.get("kind") == "tokenizers":
            return cls.from_file(Path(folder) / "tokenizer.json", max_tokens)
        raise ValueError(f"{folder}/config.json: unknown tokenizer kind {entry.get('kind')!r}")

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, max_tokens={self.max_tokens}, source={self.source})"


class TextAdapter(Adapter):
    """Token embedding + learned CLS + learned absolute positions; 1-D bucketed relative bias."""

    modality = "text"

    def __init__(
        self, dim: int, heads: int, vocab_size: int, max_positions: int, bucket_size: int, pad_id: int
    ) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.bucket_size = bucket_size
        self.embed_tokens = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        nn.init.normal_(self.embed_tokens.weight, std=dim**-0.5)
        with torch.no_grad():
            self.embed_tokens.weight[pad_id].zero_()
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.embed_positions = nn.Embedding(max_positions, dim)
        nn.init.normal_(self.embed_positions.weight, std=dim**-0.5)
        self.rel_pos_table = init_rel_table(bucket_1d_rows(bucket_size), heads)

    def embed(self, batch: dict[str, Any]) -> AdapterOutput:
        """Embed ``batch["tokens"] (B, L)`` into ``(B, L+1, D)``; padded positions are ``batch["padding_mask"]``
        ``(B, L)`` when given (the collator writes it), else those holding ``pad_id``."""
        tokens = require(batch, "tokens", "text")
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"text batch 'tokens' must be an integer (B, L) tensor, got {tuple(tokens.shape)} {tokens.dtype}"
            )
        b, length = tokens.shape
        if length + 1 > self.embed_positions.num_embeddings:
            raise ValueError(
                f"text batch has {length} tokens (+CLS) but the model has "
                f"{self.embed_positions.num_embeddings} positions"
            )
        if host_checks(tokens) and (int(tokens.max()) >= self.embed_tokens.num_embeddings or int(tokens.min()) < 0):
            raise ValueError(
                f"text token ids must lie in [0, {self.embed_tokens.num_embeddings}), got max {int(tokens.max())}"
            )
        x = torch.cat([self.cls_embedding.expand(b, -1, -1), self.embed_tokens(tokens)], dim=1)
        x = x + self.embed_positions.weight[: length + 1]
        given = batch.get("padding_mask")
        pad = given.bool() if isinstance(given, torch.Tensor) else tokens.eq(self.pad_id)
        mask = padding_or_none(torch.cat([pad.new_zeros(b, 1), pad], dim=1))
        index = bucket_1d(length + 1, self.bucket_size, tokens.device)
        return AdapterOutput(x, mask, index, self.rel_pos_table)


@dataclass
class TextOptions(PluginOptions):
    """Options of the text plugin.

    Attributes:
        vocab_size: Embedding rows (the tokenizer's id space).
        max_positions: Absolute position rows (official: 514).
        bucket_size: Relative-position buckets.
        pad_id: Padding id.
        max_tokens: Tokens kept before EOS.
    """

    vocab_size: int = 50264
    max_positions: int = 514
    bucket_size: int = 256
    pad_id: int = PAD_ID
    max_tokens: int = 70


@register_modality
class TextModality(ModalityPlugin):
    """Text plugin: GPT-2 byte-level BPE tokens (official files or a trained ``tokenizers`` BPE)."""

    name = "text"
    uses_all_parameters = True  # every adapter parameter takes part in every forward
    Options = TextOptions
    masking = MaskingPolicy(kind="whole_word", ratio=0.15, paired_ratio=0.4, paired_from_visible=True)
    media = False
    needs_tokenizer = True

    def build_adapter(self, config: ModelConfig, siblings: dict[str, nn.Module]) -> nn.Module:
        """Build a :class:`TextAdapter`."""
        o = self.options(config)
        return TextAdapter(
            config.embed_dim, config.heads, o["vocab_size"], o["max_positions"], o["bucket_size"], o["pad_id"]
        )

    def build_preprocessor(self, config: ModelConfig, tokenizer: Any = None) -> Any:
        """Return ``str -> {"tokens": LongTensor}`` using ``tokenizer`` (required)."""
        if tokenizer is None:
            raise ValueError(
                "text preprocessing needs a tokenizer: pass bpe_dir=... to one_peace.load, or set model.tokenizer "
                "(one_peace.adapters.text.TextTokenizer.from_bpe_dir / from_file / train)"
            )

        def preprocess(text: Any) -> dict[str, Any]:
            if not isinstance(text, str):
                raise InvalidValue(f"text must be a string, got {type(text).__name__} {str(text)[:60]!r}")
            try:
                self.check_value(text)  # a lone surrogate reached the tokenizer as a raw TypeError
            except ValueError as exc:
                raise InvalidValue(f"text {exc}") from None
            ids = tokenizer.ids(text) if hasattr(tokenizer, "ids") else None
            if ids is None:  # a tokenizer without the full-ids method: its own truncation, nothing to report
                return {"tokens": torch.tensor(tokenizer.encode(text), dtype=torch.long)}
            limit = tokenizer.max_tokens
            sample: dict[str, Any] = {"tokens": torch.tensor([*ids[:limit], EOS_ID], dtype=torch.long)}
            if len(ids) > limit:
                sample["truncated"] = len(ids) - limit
            return sample

        return preprocess

    def build_chunker(self, config: ModelConfig, tokenizer: Any = None) -> Any:
        """Return ``str -> [{"tokens"}, ...]``: the text cut into chunks of the tokenizer's limit."""
        if tokenizer is None or not hasattr(tokenizer, "chunks"):
            return None
        prep = self.build_preprocessor(config, tokenizer)

        def split(text: Any) -> list[dict[str, Any]]:
            prep(text)  # the same type check and error as a plain input
            return [{"tokens": torch.tensor(c, dtype=torch.long)} for c in tokenizer.chunks(text)]

        return split

    def check_value(self, value: Any) -> None:
        """Text values are strings of encodable text (no lone surrogates)."""
        if not isinstance(value, str):
            raise ValueError(f"must be a string (text), got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"character {exc.start} is a lone surrogate ({value[exc.start]!r}), not text; "
                "fix the escape sequence (JSON \\ud800-\\udfff need a pair)"
            ) from None

    def estimate_length(self, value: Any, config: ModelConfig, preprocess: Callable[[Any], dict[str, Any]]) -> int:
        """The token count (tokenising is cheap), CLS included."""
        return len(preprocess(value)["tokens"]) + 1

    def validate_options(self, options: PluginOptions) -> None:
        """Ids inside the vocabulary, room for CLS + ``max_tokens`` + EOS in the position table."""
        if options["vocab_size"] < 4:
            raise ValueError(f"vocab_size must be >= 4 (the special ids), got {options['vocab_size']}")
        if not 0 <= options["pad_id"] < options["vocab_size"]:
            raise ValueError(f"pad_id must be in [0, vocab_size={options['vocab_size']}), got {options['pad_id']}")
        if options["max_tokens"] < 1:
            raise ValueError(f"max_tokens must be >= 1, got {options['max_tokens']}")
        if options["max_tokens"] + 2 > options["max_positions"]:
            raise ValueError(
                f"max_tokens + 2 (CLS, EOS) must fit max_positions={options['max_positions']}, "
                f"got max_tokens={options['max_tokens']}"
            )
        if options["bucket_size"] < 1:
            raise ValueError(f"bucket_size must be >= 1, got {options['bucket_size']}")

    def preview(self, value: Any, config: ModelConfig, max_size: int = 256) -> Preview | None:
        """The text itself (cut at 500 characters)."""
        if not isinstance(value, str):
            raise InvalidValue(f"text must be a string, got {type(value).__name__}")
        return Preview.text(value)

    def describe_preprocessing(self, config: ModelConfig) -> dict[str, Any]:
        """Byte-level BPE, truncation, EOS, padding."""
        o = self.options(config)
        return {
            **super().describe_preprocessing(config),
            "input": "a string (UTF-8)",
            "tokenizer": "GPT-2 byte-level BPE: the model's tokenizer files (saved beside config.json, or the "
            "official encoder.json + vocab.bpe + dict.txt)",
            "max_tokens": o["max_tokens"],
            "eos_id": EOS_ID,
            "pad_id": o["pad_id"],
            "longer_texts": "cut at max_tokens (encode(long_text='chunks') embeds the mean of chunks)",
            "tensor": {"tokens": ["batch", "tokens"], "padding_mask": ["batch", "tokens"]},
        }

    def example_inputs(self, config: ModelConfig, folder: Path, n: int, generator: torch.Generator) -> list[Any]:
        """``n`` sentences of different lengths (text needs no files)."""
        words = ["a", "dog", "runs", "across", "the", "green", "field", "while", "two", "children", "watch"]
        out = []
        for i in range(n):
            count = 3 + 4 * (i % 3)
            picks = torch.randint(0, len(words), (count,), generator=generator).tolist()
            out.append(" ".join(words[j] for j in picks))
        return out

    def padding(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The collator's ``padding_mask`` (else positions holding the default pad id, for hand-made batches)."""
        given = batch.get("padding_mask")
        return given.bool() if isinstance(given, torch.Tensor) else batch["tokens"].eq(PAD_ID)

    def token_lengths(self, batch: Mapping[str, Any]) -> list[int]:
        """Tokens up to EOS, plus the CLS the adapter adds."""
        pad = self.padding(batch)
        assert pad is not None
        return [int(n) + 1 for n in (~pad).sum(1)]

    def position_padding(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The padded positions (:meth:`padding`), after a never-padded CLS."""
        pad = self.padding(batch)
        assert pad is not None
        return torch.cat([torch.zeros_like(pad[:, :1]), pad], dim=1)

    def word_starts(self, batch: Mapping[str, Any], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Word starts from the tokenizer's table (every token without one); EOS protected. CLS comes first."""
        tokens = batch["tokens"]
        eos = torch.cat([torch.zeros_like(tokens[:, :1], dtype=torch.bool), tokens.eq(EOS_ID)], dim=1)
        if tokenizer is not None and hasattr(tokenizer, "word_start_table"):
            table = tokenizer.word_start_table().to(tokens.device)
            starts = torch.cat([torch.ones_like(eos[:, :1]), table[tokens]], dim=1)
        else:
            starts = torch.ones_like(eos)
        return starts, eos

    def decoder_positions(self) -> int:
        """The official decoder's 514 rows."""
        return 514

    def official_key_rules(self) -> list[OfficialKeyRule]:
        """The official token and position embeddings."""
        return [
            OfficialKeyRule(
                r"^encoder_wrapper\.text_adapter\.(embed_tokens|embed_positions)\.weight$",
                lambda m: f"adapters.text.{m[1]}.weight",
                r"^adapters\.text\.(embed_tokens|embed_positions)\.weight$",
                lambda m: f"encoder_wrapper.text_adapter.{m[1]}.weight",
            )
        ]

    def train_tokenizer(self, texts: Sequence[str], vocab_size: int) -> TextTokenizer:
        """A byte-level BPE trained on ``texts``."""
        return TextTokenizer.train(texts, vocab_size=vocab_size)

    def load_tokenizer(self, path: str | Path, entry: Mapping[str, Any] | None = None) -> TextTokenizer:
        """A saved tokenizer (folder + entry), a ``tokenizer.json`` file, or a folder of the official BPE files."""
        path = Path(path)
        if entry is not None:
            return TextTokenizer.from_config(path, dict(entry))
        if path.is_file():
            return TextTokenizer.from_file(path)
        return TextTokenizer.from_bpe_dir(path)

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad token sequences (with id 1) and mark the padding in ``padding_mask``: the mask, not the id,
        says what is padded, so a model with another ``pad_id`` pads the same way."""
        seqs = [s["tokens"] for s in samples]
        longest = max(len(s) for s in seqs)
        out = torch.full((len(seqs), longest), PAD_ID, dtype=torch.long)
        pad = torch.ones(len(seqs), longest, dtype=torch.bool)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = s
            pad[i, : len(s)] = False
        return {"tokens": out, "padding_mask": pad}

    def example_samples(self, config: ModelConfig, n: int, generator: torch.Generator) -> list[dict[str, Any]]:
        """Random EOS-terminated token rows of different lengths."""
        vocab = self.options(config)["vocab_size"]
        longest = 12
        rows = []
        for i in range(n):
            length = max(2, longest - (i % 4) * 3)
            ids = torch.randint(4, vocab, (length - 1,), generator=generator)
            rows.append({"tokens": torch.cat([ids, torch.tensor([EOS_ID])])})
        return rows

    def example_batch(self, config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """Random token rows of different lengths (EOS-terminated, right-padded)."""
        return self.collate(self.example_samples(config, batch_size, generator))
