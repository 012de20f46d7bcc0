"""Batch embedding on Ray Data: the embedding folder ``python -m one_peace.embed`` writes, with the work spread over
Ray actors instead of ``torchrun`` ranks (the ``ray`` extra).

The unit of work is the part (``part_size`` rows), as under ``torchrun``: actor ``r`` of ``N`` embeds the parts
numbered ``r`` modulo ``N`` with the same code as a rank does (decode, skip and count bad rows, embed, write the part
atomically), so the folder holds the same vectors, ids and metadata, and a resumed run (``mode=resume``) embeds only
the parts not yet finished. The driver prepares ``info.json`` first and builds the index last, as rank 0 does.

    from one_peace.embed import EmbedConfig
    from one_peace.retrieval.ray_embed import embed_on_ray

    embed_on_ray(EmbedConfig(checkpoint=CK, data="photos.jsonl", modality="image", out="index/photos"), actors=8)

:class:`PartsEmbedder` is the callable for ``ray.data.Dataset.map_batches`` (``concurrency=N``, ``batch_size=1``)
over a dataset of ``{"rank": r, "world": N}`` rows, for pipelines that build their own.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np


class PartsEmbedder:
    """One Ray actor: loads the model once, then embeds the parts of the rank each batch names.

    Args:
        config: The :class:`~one_peace.embed.EmbedConfig` fields (a dict: it travels to the actor).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import one_peace
        from one_peace.embed import EmbedConfig, _device, _precision
        from one_peace.retrieval.format import model_hash

        self.cfg = EmbedConfig(**config)
        device = _device(self.cfg.device)
        self.precision, dtype = _precision(self.cfg.precision, device)
        self.model = one_peace.load(self.cfg.checkpoint, bpe_dir=self.cfg.bpe_dir, device=device, dtype=dtype).eval()
        self.digest = model_hash(self.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed the unfinished parts of each ``(rank, world)`` in ``batch``; returns rows seen and texts truncated."""
        from one_peace.embed import _Embedder, _run_parts
        from one_peace.retrieval.store import EmbeddingStore

        store = EmbeddingStore(self.cfg.out)
        info = store.info()
        key = str(Path(self.cfg.data).resolve())
        source_no, source = next((i, s) for i, s in enumerate(info["sources"]) if s["data"] == key)
        if info.get("model", {}).get("hash") != self.digest:
            raise ValueError(f"{self.cfg.out}: the folder was prepared for another model than this actor loaded")
        rows, truncated = [], []
        for rank, world in zip(batch["rank"].tolist(), batch["world"].tolist()):
            job = _Embedder(self.cfg, self.model, int(rank), int(world), self.digest, self.precision)
            quiet = dataclasses.replace(self.cfg, progress=False)
            rows.append(_run_parts(quiet, job, source, source_no, store.finished_parts()))
            truncated.append(job.truncated)
        return {"rank": batch["rank"], "rows": np.array(rows), "truncated": np.array(truncated)}


def embed_on_ray(cfg: Any, actors: int = 2, num_cpus: float = 1.0, num_gpus: float = 0.0) -> dict[str, Any]:
    """Embed ``cfg.data`` into ``cfg.out`` with ``actors`` Ray actors (a running cluster, or a local Ray started
    here); returns ``info.json``'s content, as :func:`one_peace.embed.embed` does.

    Args:
        cfg: An :class:`~one_peace.embed.EmbedConfig` (``mode=resume`` continues a folder part by part).
        actors: Ray actors (each loads the model once).
        num_cpus: CPUs per actor.
        num_gpus: GPUs per actor.
    """
    import one_peace
    from one_peace.embed import _check, _device, _finish, _precision, query_vectors
    from one_peace.extras import require
    from one_peace.retrieval.folder import prepare_folder
    from one_peace.retrieval.format import model_hash
    from one_peace.retrieval.store import EmbeddingStore

    require("ray", "ray", feature="embedding on Ray Data")
    import ray

    _check(cfg)
    if actors < 1:
        raise ValueError(f"actors: must be >= 1, got {actors}")
    device = _device(cfg.device)
    precision, dtype = _precision(cfg.precision, device)
    model = one_peace.load(cfg.checkpoint, bpe_dir=cfg.bpe_dir, device=device, dtype=dtype).eval()
    if cfg.modality not in model.adapters:
        raise ValueError(f"modality: {cfg.modality!r} is not in the model (it has {list(model.adapters)})")
    store = EmbeddingStore(cfg.out)
    info = prepare_folder(cfg, store, model, model_hash(model), precision)
    store.save_info(info)
    key = str(Path(cfg.data).resolve())
    source_no = next(i for i, s in enumerate(info["sources"]) if s["data"] == key)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(1, int(actors * num_cpus)), include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    try:
        shares = ray.data.from_items([{"rank": r, "world": actors} for r in range(actors)])
        done = shares.map_batches(
            PartsEmbedder,
            fn_constructor_kwargs={"config": dataclasses.asdict(cfg)},
            batch_size=1,
            concurrency=actors,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
        ).take_all()
    finally:
        if started:
            ray.shutdown()
    rows = {int(d["rows"]) for d in done}
    if len(rows) != 1:
        raise RuntimeError(f"the actors saw different row counts {sorted(rows)} in {cfg.data}: did it change?")
    queries = query_vectors(cfg, model, precision) if cfg.index != "none" else None
    truncated = sum(int(d["truncated"]) for d in done)
    return _finish(cfg, store, store.info(), source_no, rows.pop(), truncated, time.perf_counter() - t0, queries)
