"""The ONE-PEACE encoder: modality adapters, a shared stack with routed FFNs, per-modality norms and heads."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from one_peace.config import OFFICIAL_MODALITIES, ModelConfig
from one_peace.models.adapter import AdapterOutput
from one_peace.models.attention import BACKENDS, FlexBias, compute_dtype
from one_peace.models.layers import SharedLayer
from one_peace.registry import ModalityPlugin, get_plugin


@dataclass
class EncoderOutput:
    """Token states of a (possibly fused) forward.

    Attributes:
        hidden: Modality -> ``(B, T_m, D)`` states after the modality's final LayerNorm (CLS at 0).
        padding_mask: Modality -> ``(B, T_m)`` bool padding mask, or ``None`` when unpadded.
        layer_states: With ``return_layer_states``: one dict per layer, modality -> states before the final LN.
        adapter_states: With ``return_layer_states``: modality -> adapter output tokens.
    """

    hidden: dict[str, torch.Tensor]
    padding_mask: dict[str, torch.Tensor | None]
    layer_states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    adapter_states: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PackedOutput:
    """Result of :meth:`OnePeaceModel.forward_packed`.

    Attributes:
        hidden: ``(B, T, D)`` per-sample states unpacked to the padded layout (zeros on padding).
        padding_mask: ``(B, T)`` padding mask of the input batch (or ``None``).
        rows: Number of packed rows the samples were placed in.
        fill: Fraction of packed positions holding a real token.
    """

    hidden: torch.Tensor
    padding_mask: torch.Tensor | None
    rows: int
    fill: float


def resolve_modalities(names: Sequence[str]) -> list[ModalityPlugin]:
    """Plugins for ``names`` plus whatever they require, required ones first, without duplicates."""
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in chain:
            raise ValueError(f"modality requirements form a cycle: {' -> '.join((*chain, name))}")
        plugin = get_plugin(name)
        for req in plugin.requires:
            visit(req, (*chain, name))
        order.append(name)

    for n in names:
        visit(n, ())
    return [get_plugin(n) for n in order]


class OnePeaceModel(nn.Module):
    """Any-modality ONE-PEACE encoder.

    Routing is stateless: :meth:`forward_features` takes a dict ``modality -> batch`` and fuses the modalities
    in the dict's order; each token goes through its own modality's FFN only, relative bias applies inside
    each modality block and is zero across blocks, and padded keys are masked.

    Args:
        config: Model hyper-parameters; ``config.modalities`` is expanded with required modalities.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        plugins = resolve_modalities(config.modalities)
        # the model's own copy: the caller's config is never rewritten (here or by the official_padding setter)
        config = dataclasses.replace(
            config,
            modalities=tuple(p.name for p in plugins),
            modality_options=copy.deepcopy(config.modality_options),
        )
        self.config = config
        #: what the training run that wrote its checkpoint trained it for (``{"recipe", "uses"}``), or None
        self.trained_with: dict[str, Any] | None = None
        self.plugins: dict[str, ModalityPlugin] = {p.name: p for p in plugins}
        self.groups: dict[str, str] = {p.name: p.shares or p.name for p in plugins}
        for name, group in self.groups.items():
            if group not in self.plugins:
                raise ValueError(f"modality {name!r} shares FFNs with {group!r}, which is not in the model")
        group_names = list(dict.fromkeys(self.groups.values()))
        self.adapters = nn.ModuleDict()
        for p in plugins:
            self.adapters[p.name] = p.build_adapter(config, dict(self.adapters.items()))
        d = config.embed_dim
        rates = [config.drop_path_rate * i / max(1, config.layers - 1) for i in range(config.layers)]
        self.layers = nn.ModuleList(
            SharedLayer(
                d,
                config.heads,
                {g: self.plugins[g].build_ffn(config) for g in group_names},
                config.layer_scale_init,
                rates[i],
                config.attn_backend,
            )
            for i in range(config.layers)
        )
        self.final_norms = nn.ModuleDict({g: nn.LayerNorm(d, eps=1e-5) for g in group_names})
        self.heads = nn.ModuleDict({g: nn.Linear(d, d) for g in group_names})
        # a log, as in the official model; shape (1,) rather than () because FSDP2 cannot shard 0-d parameters
        # (official checkpoints store a scalar; the loader reshapes it)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.grad_checkpointing = False
        self._preprocessors: dict[str, Any] = {}
        self._tokenizer: Any = None

    # ----------------------------------------------------------------------------------------------- setup
    def set_attn_backend(self, backend: str) -> None:
        """Switch the attention kernel at run time: ``sdpa``, ``flex`` or ``xformers`` (see
        :mod:`one_peace.models.attention`); a runtime choice, not saved with the weights."""
        if backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.config.attn_backend = backend
        for layer in self.layers:
            layer.attn.backend = backend  # type: ignore[union-attr]

    @property
    def official_padding(self) -> bool:
        """Whether the official padding leaks are reproduced (see :class:`ModelConfig`)."""
        return self.config.official_padding

    @official_padding.setter
    def official_padding(self, value: bool) -> None:
        self.config.official_padding = bool(value)
        for adapter in self.adapters.values():
            if hasattr(adapter, "official_padding"):
                setattr(adapter, "official_padding", bool(value))  # noqa: B010 - plugin adapters may opt in

    @property
    def tokenizer(self) -> Any:
        """The text tokenizer used by :meth:`encode` on raw strings (``None`` until set or loaded)."""
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer = value
        self._preprocessors.clear()  # preprocessors capture the tokenizer: rebuild them lazily

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each shared layer in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that should not get weight decay (norms, biases, embeddings, tables, scales)."""
        skip = set()
        for name, p in self.named_parameters():
            if p.dim() <= 1 or any(k in name for k in ("embed", "rel_pos_table", "cls_", "logit_scale")):
                skip.add(name)
        return skip

    def parameter_groups(self, modality: str) -> list[str]:
        """Names of the parameters specific to ``modality`` (adapter, its FFNs, final LN, head)."""
        group = self.groups[modality]
        prefixes = [f"adapters.{modality}."]
        if group == modality:
            prefixes += [f"final_norms.{group}.", f"heads.{group}."]
        names = []
        for name, _ in self.named_parameters():
            if any(name.startswith(p) for p in prefixes) or (group == modality and f".ffns.{group}." in name):
                names.append(name)
        return names

    def named_parameter_groups(self) -> dict[str, list[str]]:
        """Named groups of parameter names, for recipes' ``trainable``/``frozen`` sets.

        Per modality ``m``: ``adapters.m``, ``ffn.m`` (its FFN in every layer), ``norm.m`` (final LN), ``head.m``
        and ``modality.m`` (all of these that belong to ``m`` alone; a modality sharing another's FFNs, like video
        with image, owns only its adapter); plus ``backbone`` (the shared attention stack without FFNs) and
        ``logit_scale``.
        """
        names = [name for name, _ in self.named_parameters()]
        groups: dict[str, list[str]] = {}
        for m, group in self.groups.items():
            own = group == m
            groups[f"adapters.{m}"] = [n for n in names if n.startswith(f"adapters.{m}.")]
            groups[f"ffn.{m}"] = [n for n in names if own and n.startswith("layers.") and f".ffns.{m}." in n]
            groups[f"norm.{m}"] = [n for n in names if own and n.startswith(f"final_norms.{m}.")]
            groups[f"head.{m}"] = [n for n in names if own and n.startswith(f"heads.{m}.")]
            groups[f"modality.{m}"] = self.parameter_groups(m)
        groups["backbone"] = [n for n in names if n.startswith("layers.") and ".ffns." not in n]
        groups["logit_scale"] = [n for n in names if n == "logit_scale"]
        return groups

    # --------------------------------------------------------------------------------------------- forward
    def _attention_bias(self, outs: list[AdapterOutput], pad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask ``(1|B, H, S, S)``: relative bias inside each block, 0 across, -inf on padded keys."""
        b = outs[0].tokens.shape[0]
        per_sample = pad is not None or any(o.rel_index.dim() == 3 for o in outs)
        lengths = [o.tokens.shape[1] for o in outs]
        s = sum(lengths)
        h = self.config.heads
        device = outs[0].tokens.device
        blocks = [o.rel_table.to(dtype)[o.rel_index].movedim(-1, -3) for o in outs]  # (..., H, T, T)
        if len(outs) == 1:
            bias = blocks[0] if blocks[0].dim() == 4 else blocks[0].unsqueeze(0)
            if per_sample:
                bias = bias.expand(b, h, s, s)
        else:
            bias = torch.zeros(b if per_sample else 1, h, s, s, dtype=dtype, device=device)
            start = 0
            for block, n in zip(blocks, lengths):
                bias[:, :, start : start + n, start : start + n] = block
                start += n
        if pad is not None:
            bias = bias.masked_fill(pad[:, None, None, :], float("-inf"))
        return bias

    def _flex_bias(self, outs: list[AdapterOutput], pad: torch.Tensor | None) -> FlexBias:
        """The same bias as :meth:`_attention_bias` for FlexAttention: the blocks' tables stacked with a zero row
        (pairs across blocks), a ``(1|B, S, S)`` index into them, and the padding as the block mask."""
        h = self.config.heads
        tables = [o.rel_table for o in outs]
        table = torch.cat([*tables, tables[0].new_zeros(1, h)])
        if len(outs) == 1:
            idx = outs[0].rel_index
            return FlexBias(table, idx if idx.dim() == 3 else idx[None], key_padding=pad)
        per_sample = any(o.rel_index.dim() == 3 for o in outs)
        lengths = [o.tokens.shape[1] for o in outs]
        s = sum(lengths)
        b = outs[0].tokens.shape[0] if per_sample else 1
        index = torch.full((b, s, s), table.shape[0] - 1, dtype=torch.long, device=outs[0].tokens.device)
        start = offset = 0
        for o, n in zip(outs, lengths):
            index[:, start : start + n, start : start + n] = o.rel_index + offset
            start += n
            offset += o.rel_table.shape[0]
        return FlexBias(table, index, key_padding=pad)

    def _check_inputs(self, inputs: Mapping[str, Any]) -> None:
        if not isinstance(inputs, Mapping) or not inputs:
            raise ValueError("forward_features expects a non-empty dict {modality: batch}")
        for name in inputs:
            if name not in self.adapters:
                raise KeyError(f"modality {name!r} is not in this model (it has {list(self.adapters)})")

    def forward_features(
        self,
        inputs: Mapping[str, dict[str, Any]],
        keep_ids: Mapping[str, torch.Tensor] | None = None,
        return_layer_states: bool = False,
    ) -> EncoderOutput:
        """Encode one or several modalities as one fused sequence (in the dict's order).

        Args:
            inputs: Modality -> ready batch (as produced by the plugin's collator); batch sizes must agree.
            keep_ids: Optional modality -> ``(B, K)`` positions to keep (token dropping; -1 pads a row).
            return_layer_states: Also return adapter outputs and every layer's output.
        """
        self._check_inputs(inputs)
        keep_ids = keep_ids or {}
        names = list(inputs)
        outs = [self.adapters[m](inputs[m], keep_ids.get(m)) for m in names]
        sizes = {m: o.tokens.shape[0] for m, o in zip(names, outs)}
        if any(n != sizes[names[0]] for n in sizes.values()):  # (not a set: sizes may be symbolic when traced)
            raise ValueError(f"fused modalities must have the same batch size, got {sizes}")
        x = torch.cat([o.tokens for o in outs], dim=1) if len(outs) > 1 else outs[0].tokens
        masks = [o.padding_mask for o in outs]
        pad = None
        if any(mk is not None for mk in masks):
            pad = torch.cat(
                [
                    mk if mk is not None else torch.zeros(o.tokens.shape[:2], dtype=torch.bool, device=x.device)
                    for mk, o in zip(masks, outs)
                ],
                dim=1,
            )
            x = x * (~pad).unsqueeze(-1).to(x.dtype)
        bias: torch.Tensor | FlexBias
        if self.config.attn_backend == "flex":
            bias = self._flex_bias(outs, pad)
        else:
            bias = self._attention_bias(outs, pad, compute_dtype(x))  # once per forward, in the dtype SDPA runs in
        segments = [(self.groups[m], o.tokens.shape[1]) for m, o in zip(names, outs)]
        result = EncoderOutput({}, {})
        if return_layer_states:
            result.adapter_states = {m: o.tokens for m, o in zip(names, outs)}
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, bias, segments=segments, use_reentrant=False)
            else:
                x = layer(x, bias, segments=segments)
            if return_layer_states:
                result.layer_states.append(self._split(x, names, outs))
        for (m, part), o in zip(self._split(x, names, outs).items(), outs):
            result.hidden[m] = self.final_norms[self.groups[m]](part)
            result.padding_mask[m] = o.padding_mask
        return result

    @staticmethod
    def _split(x: torch.Tensor, names: list[str], outs: list[AdapterOutput]) -> dict[str, torch.Tensor]:
        parts = torch.split(x, [o.tokens.shape[1] for o in outs], dim=1)
        return dict(zip(names, parts))

    def forward(
        self, inputs: Mapping[str, dict[str, Any]], keep_ids: Mapping[str, torch.Tensor] | None = None
    ) -> EncoderOutput:
        """Alias of :meth:`forward_features`."""
        return self.forward_features(inputs, keep_ids)

    def embed(self, modality: str, hidden: torch.Tensor) -> torch.Tensor:
        """Project the CLS state of ``hidden (B, T, D)`` with the modality's head and L2-normalise."""
        return F.normalize(self.heads[self.groups[modality]](hidden[:, 0]), dim=-1, eps=1e-12)

    def encode(
        self,
        modality: str,
        items: Any,
        batch_size: int = 64,
        normalize: bool = True,
        output: str = "torch",
        progress: bool = False,
        long_text: str = "truncate",
        compile: bool = False,
        precision: str | None = None,
        segments: Any = None,
    ) -> Any:
        """``(N, D)`` embeddings of one modality in input order, L2-normalised unless ``normalize=False``.

        ``items``: raw inputs (paths, bytes, PIL images, arrays, ``(waveform, rate)`` pairs, videos...) batched by
        length under inference mode, or a ready batch dict (one plain forward). ``precision``: ``"fp32"``,
        ``"bf16"``, ``"fp16"``, ``"int8"`` (ONNX Runtime) or ``"auto"``. ``segments`` (seconds, or ``{window, hop,
        min_length}``): long audio/video as timed windows, one row each (a ``SegmentEmbeddings``). Every option is
        described in
        :func:`one_peace.models.encoding.encode`.
        """
        from one_peace.models.encoding import encode

        return encode(
            self, modality, items, batch_size, normalize, output, progress, long_text, compile, precision, segments
        )

    def encode_multimodal(
        self,
        inputs: Mapping[str, Any],
        fuse: str = "joint",
        weights: Mapping[str, float] | None = None,
        batch_size: int = 64,
        output: str = "torch",
    ) -> Any:
        """One ``(N, D)`` embedding per composed query, e.g. ``{"image": [img], "text": ["in the snow"]}``.

        ``fuse="mean"`` or ``"joint"`` (one fused forward), as :func:`one_peace.models.encoding.encode_multimodal`
        defines them.
        """
        from one_peace.models.encoding import encode_multimodal

        return encode_multimodal(self, inputs, fuse, weights, batch_size, output)

    def generate(
        self,
        inputs: Any,
        instruction: str | None = None,
        beams: int | None = None,
        max_tokens: int | None = None,
        constraints: Sequence[str] | None = None,
        generator: str | None = None,
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[Any]:
        """Captions, answers, closed-set labels or boxes from a seq2seq checkpoint's decoder: one
        :class:`one_peace.generation.Generated` (``.text``, ``.score``, ``.box``) per input.

        ``inputs``: rows (``{"image": "cat.png", ...}``) or bare items when the instruction reads one field;
        ``instruction`` (default: the trained one; a source side alone keeps the trained target), ``beams`` and
        ``max_tokens`` (default: the run's validation settings), ``constraints`` (allowed outputs; default: the
        training labels of a ``closed_set`` target). A model without a decoder raises, naming the recipe that
        trained it. See :mod:`one_peace.generation`.
        """
        from one_peace.generation import get_generator

        return get_generator(self, generator).generate(  # type: ignore[return-value]
            inputs, instruction, beams, max_tokens, constraints, batch_size=batch_size, progress=progress
        )

    def prepare(self, modality: str, items: Any) -> dict[str, torch.Tensor]:
        """Preprocess and collate raw inputs of ``modality`` into one batch on the model's device."""
        from one_peace.models.encoding import as_item_list, preprocessor, to_device

        items = as_item_list(items)
        if len(items) == 0:
            raise ValueError(f"no {modality} inputs given")
        prep = preprocessor(self, modality)
        return to_device(self, self.plugins[modality].collate([prep(item) for item in items]))

    # ---------------------------------------------------------------------------------------------- packing
    def forward_packed(
        self, modality: str, batch: dict[str, Any], row_length: int | None = None, rows: list[list[int]] | None = None
    ) -> PackedOutput:
        """Encode a batch with several samples packed per row (block-diagonal attention, one CLS per sample).

        Padding is removed, samples are placed into rows of ``row_length`` tokens (default: the longest sample)
        first-fit, or as given by ``rows`` (a plan from the data loader's ``batch["pack"]``); each sample
        attends only to itself with its own relative bias, and the results are unpacked to the batch layout.
        Output equals the unpacked forward on every real token.
        """
        from one_peace.models.packing import plan_packing

        out = self.adapters[modality](batch)
        b, t, d = out.tokens.shape
        if out.padding_mask is not None:
            valid = t - out.padding_mask.sum(1)
        else:
            valid = torch.full((b,), t, device=out.tokens.device)
        lengths = [int(n) for n in valid]
        row_length = row_length or max(lengths)
        if rows is None:
            rows = plan_packing(lengths, row_length)
        elif sorted(i for r in rows for i in r) != list(range(b)):
            raise ValueError("packing plan must place every sample of the batch exactly once")
        elif max(sum(lengths[i] for i in r) for r in rows) > row_length:
            raise ValueError(f"packing plan overflows row_length {row_length}")
        h = self.config.heads
        dtype = compute_dtype(out.tokens)
        flex = self.config.attn_backend == "flex"
        x = out.tokens.new_zeros(len(rows), row_length, d)
        table = out.rel_table.to(dtype)
        if flex:  # rel index per row (a zero row of the table for the unused tail) and a segment id per token
            zero = table.shape[0]
            table = torch.cat([table, table.new_zeros(1, h)])
            index = torch.full((len(rows), row_length, row_length), zero, dtype=torch.long, device=x.device)
            seg = (torch.arange(row_length, device=x.device) + b).repeat(len(rows), 1)  # tail tokens: alone
        else:
            dense = torch.full((len(rows), h, row_length, row_length), float("-inf"), dtype=dtype, device=x.device)
            dense.diagonal(dim1=-2, dim2=-1).fill_(0.0)  # unused tail rows attend to themselves only
        place: list[tuple[int, int, int]] = []
        for r, members in enumerate(rows):
            start = 0
            for i in members:
                n = lengths[i]
                idx = out.rel_index[i] if out.rel_index.dim() == 3 else out.rel_index
                x[r, start : start + n] = out.tokens[i, :n]
                if flex:
                    index[r, start : start + n, start : start + n] = idx[:n, :n]
                    seg[r, start : start + n] = i
                else:
                    dense[r, :, start : start + n, start : start + n] = table[idx[:n, :n]].movedim(-1, 0)
                place.append((i, r, start))
                start += n
        bias = FlexBias(table, index, segments=seg) if flex else dense
        segments = [(self.groups[modality], row_length)]
        for layer in self.layers:
            x = layer(x, bias, segments=segments)
        x = self.final_norms[self.groups[modality]](x)
        hidden = x.new_zeros(b, t, d)
        for i, r, start in place:
            hidden[i, : lengths[i]] = x[r, start : start + lengths[i]]
        return PackedOutput(hidden, out.padding_mask, len(rows), sum(lengths) / (len(rows) * row_length))


def build_model(
    size: str | ModelConfig = "tiny",
    modalities: Sequence[str] = OFFICIAL_MODALITIES,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> OnePeaceModel:
    """Build a ONE-PEACE encoder of a named size (``tiny``, ``base``, ``large``, ``one_peace_4b``) or a config.

    ``device="meta"`` builds without allocating memory (e.g. to count the 4B model's parameters).
    """
    from one_peace.config import model_config

    config = size if isinstance(size, ModelConfig) else model_config(size, tuple(modalities), **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = OnePeaceModel(config)
    if dtype is not None:
        model = model.to(dtype)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())
