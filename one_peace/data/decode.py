"""The worker side of the loader: reading, decoding and collating one batch plan.

:class:`BatchDecoder` is what ``DataLoader`` worker processes (or fairseq2's threads) run: it turns a
:class:`~one_peace.data.sampler.Plan` into a collated batch plus a report of the samples it read and the bad ones,
which the training process counts when it receives the batch. It is picklable: workers started by ``spawn`` or
``forkserver`` rebuild the preprocessors from the plugins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from one_peace.config import ModelConfig
from one_peace.data.rows import RowSource
from one_peace.data.sampler import Plan
from one_peace.errors import DataError, MissingField, NonFiniteData, UndecodableMedia, detail, reason_label
from one_peace.registry import ModalityPlugin, get_plugin


@dataclass
class _Bad:
    sid: str
    reason: str
    detail: str


#: key of the per-batch report (samples read, bad rows) a decoded batch carries to the training process
REPORT_KEY = "_report"


class BatchDecoder(torch.utils.data.Dataset):
    """Decodes and collates one :class:`~one_peace.data.sampler.Plan` (the ``DataLoader``'s "dataset": its items
    are plans). Picklable: worker processes started by ``spawn`` rebuild the preprocessors from the plugins.

    A decoded batch has ``ids``, ``valid`` (False for masked slots: bad samples, fillers, padded remainder), one
    collated batch per modality, ``raw`` (passthrough fields), ``pack`` (with ``pack_length``) and
    ``_report``: ``{"seen": samples read, "bad": [(id, reason, detail), ...]}`` for the training process's counts.
    """

    def __init__(
        self,
        rows: RowSource,
        fields: Mapping[str, str],
        model_config: ModelConfig,
        tokenizer: Any,
        passthrough: Sequence[str],
        slots: int | None,
        pack_length: int | None,
        bucket_by: str,
    ) -> None:
        self.rows = rows
        self.fields = dict(fields)
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.passthrough = tuple(passthrough)
        self.slots = slots
        self.pack_length = pack_length
        self.bucket_by = bucket_by
        self.plugins: dict[str, ModalityPlugin] = {}
        self.preprocessors: dict[str, Any] = {}
        self._build()

    def _build(self) -> None:
        self.plugins = {m: get_plugin(m) for m in self.fields}
        for m, plugin in self.plugins.items():
            if m not in self.preprocessors:
                self.preprocessors[m] = plugin.build_preprocessor(self.model_config, self.tokenizer)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["plugins"], state["preprocessors"] = {}, {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build()  # plugins come from the registry of this process (entry points load here too)

    def __len__(self) -> int:
        return len(self.rows)

    def decode(self, index: int) -> dict[str, Any] | _Bad:
        """One row as a sample dict, or the reason it is bad (a plugin bug raises)."""
        line_no, row = self.rows[index]
        sid = str(row.get("id", f"line {line_no}")) if isinstance(row, Mapping) else f"line {line_no}"
        modality = "row"
        try:
            if "__error__" in row:  # a row that could not be read (a damaged line, a broken shard)
                raise UndecodableMedia(row["__error__"])
            sample: dict[str, Any] = {"id": sid}
            for modality, fld in self.fields.items():
                value = self.plugins[modality].read_field(row, fld, self.rows.base_dir)
                out = self.preprocessors[modality](value)
                for k, v in out.items():
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                        raise NonFiniteData(f"decoded {modality} {k} contains NaN or infinity")
                sample[modality] = out
            for fld in self.passthrough:
                if fld not in row:
                    raise MissingField(f"missing field {fld!r}")
                sample.setdefault("raw", {})[fld] = row[fld]
            return sample
        except DataError as exc:  # a bad sample; anything else is a bug (of ours or a plugin's) and stops the run
            return _Bad(sid, reason_label(exc, modality), detail(exc))

    def __getitem__(self, plan: Plan) -> dict[str, Any]:  # type: ignore[override]
        decoded = [self.decode(i) for i in plan.rows]
        real = decoded[: plan.real]
        good = [s for s in real if not isinstance(s, _Bad)]
        fillers = [s for s in decoded[plan.real :] if not isinstance(s, _Bad)]
        report = {"seen": plan.real, "bad": [(b.sid, b.reason, b.detail) for b in real if isinstance(b, _Bad)]}
        batch = self.collate(good, fillers, max(plan.real, self.slots or 0))
        batch[REPORT_KEY] = report
        return batch

    def collate(self, samples: list[dict[str, Any]], fillers: list[dict[str, Any]], slots: int) -> dict[str, Any]:
        """Collate ``samples``; empty slots (bad samples, padded remainder) are masked copies (``valid`` False)."""
        target = max(slots, len(samples), 1)
        valid = [True] * len(samples) + [False] * (target - len(samples))
        pool = samples or fillers
        if not pool:
            return {"ids": [], "valid": torch.zeros(target, dtype=torch.bool), "empty": True}
        filled = samples + [pool[0]] * (target - len(samples))
        batch: dict[str, Any] = {"ids": [s["id"] for s in filled], "valid": torch.tensor(valid)}
        for m in self.fields:
            batch[m] = self.plugins[m].collate([s[m] for s in filled])
        if self.passthrough:
            batch["raw"] = {f: [s["raw"][f] for s in filled] for f in self.passthrough}
        if self.pack_length:
            from one_peace.models.packing import plan_packing

            lengths = self.plugins[self.bucket_by].token_lengths(batch[self.bucket_by])
            batch["pack"] = {
                "modality": self.bucket_by,
                "row_length": self.pack_length,
                "rows": plan_packing(lengths, self.pack_length),
            }
        return batch

    def length(self, index: int) -> int:
        """A cheap token-count estimate of a row's ``bucket_by`` value (no media decoding); 1 for a bad row."""
        _, row = self.rows[index]
        plugin = self.plugins[self.bucket_by]
        try:
            value = plugin.resolve(row[self.fields[self.bucket_by]], self.rows.base_dir)
            return max(1, int(plugin.estimate_length(value, self.model_config, self.preprocessors[self.bucket_by])))
        except Exception:  # a bad sample: decoding will skip and count it
            return 1
