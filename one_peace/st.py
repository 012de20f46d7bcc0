"""sentence-transformers integration: a one-peace folder loads as ``SentenceTransformer(folder,
trust_remote_code=True)`` (``pip install one-peace[st]``).

Every folder we write carries ``modules.json`` naming :class:`OnePeaceEncoder` (the whole model: one module, so the
shared attention is held once; sentence-transformers' per-modality ``Router`` would hold a copy per route) followed
by sentence-transformers' ``Normalize``, so ``.encode`` gives the vectors ``one_peace.load(folder).encode`` gives.
The flag is needed because the module is not part of sentence-transformers (which imports it from the installed
``one_peace`` package).

Inputs, per item, each preprocessed by its modality's plugin (sentence-transformers refuses a list that mixes
modalities: one ``.encode`` call per modality):

* text: a string (a prompt is prepended to the inputs of a modality that reads text);
* image: a PIL image, an ``(H, W, C)`` array, or the path of an image file;
* audio: ``{"array": waveform, "sampling_rate": rate}``, a 1-D array (16 kHz), or the path of an audio file;
* video (when the model has it): the path of a video file, or ``{"array": frames, "video_metadata": ...}``;
* any modality by name, plugins included: ``{"motion": sample}`` (a one-key dict naming a modality of the model).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sentence_transformers.base.modality import infer_modality
from sentence_transformers.base.modules import InputModule

from one_peace.models.encoder import OnePeaceModel

#: the feature key our ``preprocess`` fills and ``forward`` reads: ``[(modality, batch, positions), ...]``
GROUPS = "one_peace_groups"


class OnePeaceEncoder(InputModule):
    """A one-peace model as a sentence-transformers input module (preprocessing and the encoder in one)."""

    config_file_name = "sentence_one_peace_config.json"  # config.json is the checkpoint's own
    save_in_root = True

    def __init__(self, model: OnePeaceModel) -> None:
        super().__init__()
        self.model = model

    # ------------------------------------------------------------------------------------------ description
    @property
    def modalities(self) -> list[Any]:
        """The model's modalities (sentence-transformers routes strings, images and arrays by these)."""
        return list(self.model.adapters)

    def get_embedding_dimension(self) -> int:
        """The embedding width."""
        return int(self.model.config.embed_dim)

    def get_sentence_embedding_dimension(self) -> int:
        """The embedding width (the name older sentence-transformers releases call)."""
        return self.get_embedding_dimension()

    # ---------------------------------------------------------------------------------------------- inputs
    def modality_of(self, item: Any) -> tuple[str, Any]:
        """``(modality, raw input for its plugin)`` of one sentence-transformers input (see the module docstring).

        Raises:
            ValueError: an input of no modality this model has, naming what it has.
        """
        have = list(self.model.adapters)
        if isinstance(item, dict) and len(item) == 1 and next(iter(item)) in have:
            name, value = next(iter(item.items()))
            return name, self._unwrap(name, value)
        try:
            kind = infer_modality(item, supported_modalities=self.modalities)
        except ValueError as exc:
            raise ValueError(
                f"one-peace: cannot tell the modality of a {type(item).__name__} input ({exc}); pass "
                f"{{modality: value}} with one of {have}"
            ) from None
        if isinstance(kind, tuple) or kind not in have:
            raise ValueError(f"one-peace: a {kind} input, but this model has the modalities {have}")
        if isinstance(item, dict) and len(item) == 1:
            item = next(iter(item.values()))
        return str(kind), self._unwrap(str(kind), item)

    @staticmethod
    def _unwrap(modality: str, value: Any) -> Any:
        if isinstance(value, dict) and "array" in value:
            if modality == "audio" and "sampling_rate" in value:
                return (value["array"], int(value["sampling_rate"]))
            return value["array"]
        return value

    def preprocess(
        self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor | Any]:
        """Each input's plugin preprocessing, collated per modality (the input order is kept for ``forward``)."""
        from one_peace.models.encoding import preprocessor

        del kwargs
        grouped: dict[str, tuple[list[dict[str, Any]], list[int]]] = {}
        for i, item in enumerate(inputs):
            modality, raw = self.modality_of(item)
            if prompt and self.model.plugins[modality].needs_tokenizer and isinstance(raw, str):
                raw = prompt + raw
            samples, positions = grouped.setdefault(modality, ([], []))
            samples.append(preprocessor(self.model, modality)(raw))
            positions.append(i)
        groups = [(m, self.model.plugins[m].collate(s), pos) for m, (s, pos) in grouped.items()]
        return {GROUPS: groups, "size": len(inputs)}

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """``sentence_embedding``: the model's head output per input, in input order (normalised by the next
        module, ``Normalize``)."""
        from one_peace.models.encoding import forward_batch

        del kwargs
        rows: list[torch.Tensor | None] = [None] * int(features["size"])
        for modality, batch, positions in features[GROUPS]:
            emb = forward_batch(self.model, modality, batch, normalize=False)
            for row, i in zip(emb, positions):
                rows[i] = row
        features["sentence_embedding"] = torch.stack([r for r in rows if r is not None])
        return features

    # ------------------------------------------------------------------------------------------ load / save
    @classmethod
    def load(  # type: ignore[override]
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> OnePeaceEncoder:
        """The model of a local folder or a Hub repository (through sentence-transformers' download helpers), read
        by :func:`one_peace.load` (a folder is validated before anything is built)."""
        import one_peace

        folder = Path(model_name_or_path) / subfolder
        if not folder.is_dir():
            found = cls.load_dir_path(
                model_name_or_path,
                subfolder=subfolder,
                token=token,
                cache_folder=cache_folder,
                revision=revision,
                local_files_only=local_files_only,
            )
            if found is None:
                raise FileNotFoundError(f"one-peace: no model folder at {model_name_or_path!r}")
            folder = Path(found)
        model_kwargs = kwargs.get("model_kwargs") or {}
        dtype = model_kwargs.get("dtype", model_kwargs.get("torch_dtype"))
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        return cls(one_peace.load(folder, dtype=dtype if isinstance(dtype, torch.dtype) else None))

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        """Write the model's weights, ``config.json`` and tokenizer files into ``output_path`` (sentence-transformers
        writes its own files beside them)."""
        from one_peace.checkpoint import write_config
        from one_peace.hub import write_weights

        del args, kwargs
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".one-peace-save-", dir=out))
        try:
            write_weights(tmp, self.model.state_dict().items(), 2 << 30)
            write_config(tmp, self.model.config, self.model.tokenizer, st_files=False)
            for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
                old.unlink()
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
