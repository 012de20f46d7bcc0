"""one-peace-pointcloud end to end: conformance, the demo data, alignment to text with a frozen backbone, denoising,
shards, and embedding + search, all through one-peace's public commands and APIs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

import one_peace
from one_peace.errors import InvalidValue, NonFiniteData, UndecodableMedia
from one_peace.testing import check_modality

if (
    importlib.util.find_spec("one_peace_pointcloud") is None and os.environ.get("CI") != "true"
):  # CI installs it: never skipped
    pytest.skip(
        "one-peace-pointcloud is not installed (pip install -e examples/plugins/one-peace-pointcloud)",
        allow_module_level=True,
    )


def _run(out: Path, *overrides: str) -> dict:
    from one_peace.run import run

    with initialize_config_module(config_module="one_peace.recipes", version_base=None):
        return run(compose(config_name="config", overrides=[f"output_dir={out}", *overrides]))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pointcloud-demo")
    subprocess.run([sys.executable, "-m", "one_peace_pointcloud.demo", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def aligned(demo, tmp_path_factory) -> tuple[Path, dict]:
    """The README's command: add_modality with its default steps (200) on the demo data."""
    out = tmp_path_factory.mktemp("pointcloud-run")
    results = _run(
        out,
        "recipe=add_modality",
        "modality=pointcloud",
        f"data.train={demo / 'train.jsonl'}",
        f"data.valid={demo / 'valid.jsonl'}",
        "data.text_field=text",
    )
    return out, results


def test_it_is_registered_from_its_package():
    out = subprocess.run([sys.executable, "-m", "one_peace.modalities"], capture_output=True, text=True, check=True)
    assert "pointcloud" in out.stdout and "one-peace-pointcloud" in out.stdout


def test_conformance():
    report = check_modality("pointcloud")
    assert report.ok and report.results["padding"].startswith("skipped"), str(report)  # clouds are resampled


def test_preprocessing_accepts_files_arrays_and_refuses_bad_input(tmp_path):
    config = one_peace.model_config("tiny", ("pointcloud",))
    prep = one_peace.get_plugin("pointcloud").build_preprocessor(config)
    cloud = np.random.default_rng(0).normal(size=(700, 6)).astype(np.float32) * [1, 1, 1, 0, 0, 0] + [
        0,
        0,
        0,
        9,
        99,
        200,
    ]
    np.save(tmp_path / "a.npy", cloud)
    np.savetxt(tmp_path / "a.xyz", cloud[:, :3])
    for item in (tmp_path / "a.npy", (tmp_path / "a.npy").read_bytes(), cloud, torch.from_numpy(cloud)):
        points = prep(item)["points"]
        assert points.shape == (512, 6) and float(points[:, :3].norm(dim=1).max()) == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(points[0, 3:], torch.tensor([9, 99, 200]) / 255.0)
    xyz_only = prep(tmp_path / "a.xyz")["points"]
    assert xyz_only.shape == (512, 6) and bool((xyz_only[:, 3:] == 0.5).all())  # no colour: mid grey
    with pytest.raises(InvalidValue, match=r"\(N, 3\) or \(N, 6\)"):
        prep(cloud[:, :4])
    with pytest.raises(NonFiniteData):
        prep(np.full((20, 3), np.inf, np.float32))
    with pytest.raises(UndecodableMedia):
        prep(b"\xff\xfe not points")


def test_tokens_do_not_depend_on_the_order_of_the_points():
    config = one_peace.model_config("tiny", ("pointcloud",))
    model = one_peace.build_model("tiny", modalities=("pointcloud",)).eval()
    prep = model.plugins["pointcloud"].build_preprocessor(config)
    cloud = np.random.default_rng(1).uniform(-1, 1, size=(900, 6)).astype(np.float32)
    shuffled = cloud[np.random.default_rng(2).permutation(900)]
    a, b = (model.encode("pointcloud", [prep(c)["points"].numpy()]) for c in (cloud, shuffled))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_demo_writes_learnable_captioned_clouds(demo):
    rows = [json.loads(x) for x in (demo / "valid.jsonl").read_text().splitlines()]
    assert len(rows) == 96 and {"id", "pointcloud", "text"} <= set(rows[0])
    assert len({r["text"] for r in rows}) >= 12
    cloud = np.load(demo / rows[0]["pointcloud"])
    assert cloud.ndim == 2 and cloud.shape[1] == 6 and 600 <= cloud.shape[0] < 1200


def test_add_modality_aligns_to_text_with_the_backbone_frozen(aligned):
    out, results = aligned
    assert results["text->pointcloud/R@1"] >= 3 * results["text->pointcloud/chance@1"], results
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts][-2:] == ["step_0000100", "step_0000200"]
    first, last = (load_file(str(c / "model.safetensors")) for c in ckpts[-2:])
    changed = {k for k in first if not torch.equal(first[k], last[k])}
    assert changed and all(
        k.startswith(("adapters.pointcloud.", "final_norms.pointcloud.", "heads.pointcloud."))
        or ".ffns.pointcloud." in k
        for k in changed
    ), sorted(changed)[:5]
    assert any(k.startswith("layers.0.attn.") for k in first) and not any("attn" in k for k in changed)


def test_denoising_pretraining_runs(demo, tmp_path):
    _run(
        tmp_path,
        "recipe=pretrain_modality",
        "modality=pointcloud",
        f"data.train={demo / 'train.jsonl'}",
        f"data.valid={demo / 'valid.jsonl'}",
        "trainer.max_steps=6",
        "trainer.log_every=3",
    )
    logs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logs and all(np.isfinite(r["denoise/loss"]) and r["denoise/tokens"] > 0 for r in logs)


def test_shards_of_it_train(demo, tmp_path):
    from one_peace.data.shards import write_shards

    shards = write_shards(
        demo / "train.jsonl", tmp_path / "shards", shard_size=100, fields={"pointcloud": "pointcloud"}
    )
    assert len(shards) == 4
    _run(
        tmp_path / "run",
        "recipe=add_modality",
        "modality=pointcloud",
        f"data.train={tmp_path / 'shards'}",
        f"data.valid={demo / 'valid.jsonl'}",
        "data.text_field=text",
        "trainer.max_steps=4",
    )
    from one_peace.data.loader import LoaderConfig, MultimodalLoader
    from one_peace.tokenizer import train_tokenizer

    rows = [json.loads(x) for x in (demo / "train.jsonl").read_text().splitlines()]
    loader = MultimodalLoader(
        tmp_path / "shards",
        fields={"pointcloud": "pointcloud", "text": "text"},
        model_config=one_peace.model_config("tiny", ("pointcloud", "text")),
        tokenizer=train_tokenizer([r["text"] for r in rows], 300),
        config=LoaderConfig(batch_size=32, shuffle_window=0, num_workers=0),
    )
    try:
        batches = list(loader)
    finally:
        loader.close()
    assert loader.stats.samples == 384 and loader.stats.bad_total == 0, loader.stats.report()
    assert batches[0]["pointcloud"]["points"].shape[1:] == (512, 6)


def test_embed_and_search_by_text(aligned, demo, tmp_path):
    from one_peace.embed import EmbedConfig, embed
    from one_peace.retrieval import open_index

    _, results = aligned
    cfg = EmbedConfig(
        checkpoint=results["checkpoint"], data=str(demo / "valid.jsonl"), modality="pointcloud", out=str(tmp_path / "i")
    )
    info = embed(cfg)
    assert info["count"] == 96
    index = open_index(tmp_path / "i")
    captions = sorted({index.store.metadata(i)["text"] for i in range(len(index))})
    first = [index.search(text=c, top_k=1)[0].metadata["text"] == c for c in captions]
    chance = np.mean([np.mean([index.store.metadata(i)["text"] == c for i in range(len(index))]) for c in captions])
    assert np.mean(first) >= 3 * chance, (np.mean(first), chance, dict(zip(captions, first)))
