"""#29: generation from a seq2seq checkpoint (API, ``python -m one_peace.generate``, ``eval task=generation``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import one_peace
from one_peace.run import run

SMALL = [
    "data.demo_train=32",
    "data.demo_valid=16",
    "data.image_size=32",
    "trainer.batch_size=8",
    "trainer.log_every=10",
    "data.vocab_size=300",
]


def _run(recipe: str, out: Path, steps: int) -> dict:
    with initialize_config_module(config_module="one_peace.recipes", version_base=None):
        cfg = compose(
            config_name="config",
            overrides=[f"recipe={recipe}", f"output_dir={out}", f"trainer.max_steps={steps}", *SMALL],
        )
    return run(cfg)


def _valid_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "demo_data" / "valid.jsonl").read_text().splitlines()]
    return [{**r, "image": str(out / "demo_data" / r["image"])} for r in rows]


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    out = tmp_path_factory.mktemp("vl_seq2seq")
    return out, _run("vl_seq2seq", out, 20)


def _cli_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_cli_and_eval_reproduce_the_runs_validation(captioner, tmp_path, capsys):
    """Done-when of #29: the CLI's captions are the ones the run printed, and eval reports the run's token F1."""
    from one_peace.eval.__main__ import main as eval_main
    from one_peace.generate import main as generate_main

    out, results = captioner
    valid = out / "demo_data" / "valid.jsonl"
    assert generate_main([f"checkpoint={out}", f"data={valid}", f"out={tmp_path / 'caps.jsonl'}", "batch_size=5"]) == 0
    lines = _cli_lines(tmp_path / "caps.jsonl")
    assert [x["id"] for x in lines] == [f"valid{i:05d}" for i in range(16)] and [x["row"] for x in lines] == list(
        range(16)
    )
    printed = [e["generated"] for e in results["examples"]]
    assert [x["output"] for x in lines[: len(printed)]] == printed
    assert all(x["score"] < 0 for x in lines)
    info = json.loads((tmp_path / "caps.info.json").read_text())
    assert info["status"] == "complete" and info["generated"] == 16 and info["bad"] == 0 and info["beams"] == 2

    capsys.readouterr()
    assert (
        eval_main(["task=generation", f"checkpoint={results['checkpoint']}", f"data={valid}", f"out={tmp_path}/e.json"])
        == 0
    )
    assert "generation: token F1" in capsys.readouterr().err
    evaluated = json.loads((tmp_path / "e.json").read_text())
    for key in ("token_f1", "exact_match", "baseline_token_f1", "samples"):
        assert evaluated[key] == results[key], key
    assert evaluated["baseline_source"] == "checkpoint"

    # the Python API gives the same captions, from bare paths and from rows
    model = one_peace.load(results["checkpoint"])
    rows = _valid_rows(out)
    assert [g.text for g in model.generate([r["image"] for r in rows], batch_size=7)] == [x["output"] for x in lines]
    greedy = model.generate(rows[:4], beams=1, max_tokens=3)
    assert all(len(g.tokens) <= 4 and g.tokens[-1] == 2 for g in greedy)  # at most 3 tokens, then EOS
    constrained = model.generate(rows[:4], constraints=["a red circle", "a blue square"])
    assert {g.text for g in constrained} <= {"a red circle", "a blue square"}


def test_generate_cli_resumes_a_killed_run_and_lists_bad_rows(captioner, tmp_path, monkeypatch):
    import one_peace.generate as gen

    out, results = captioner
    rows = [json.loads(line) for line in (out / "demo_data" / "valid.jsonl").read_text().splitlines()][:10]
    rows[3]["image"] = "img/missing.png"
    rows[6] = {"id": "no-image"}
    manifest = out / "demo_data" / "mixed.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [f"checkpoint={results['checkpoint']}", f"data={manifest}", "batch_size=4", "progress=false"]
    assert gen.main([*args, f"out={tmp_path / 'full.jsonl'}"]) == 0
    full = _cli_lines(tmp_path / "full.jsonl")
    bad = _cli_lines(tmp_path / "full.bad.jsonl")
    assert [b["row"] for b in bad] == [3, 6] and "missing" in bad[0]["reason"] and bad[1]["id"] == "no-image"
    assert len(full) == 8

    def crash(count: int) -> None:
        if count >= 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(gen, "BATCH_DONE_HOOK", crash)
    part = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        gen.main([*args, f"out={part}"])
    monkeypatch.setattr(gen, "BATCH_DONE_HOOK", None)
    with open(part, "a") as fh:
        fh.write('{"id": "torn", "ro')  # a kill mid-line
    with pytest.raises(SystemExit, match="exists; mode=resume"):
        gen.main([*args, f"out={part}"])
    with pytest.raises(SystemExit, match=r"other settings.*beams"):
        gen.main([*args, f"out={part}", "mode=resume", "beams=1"])
    assert gen.main([*args, f"out={part}", "mode=resume"]) == 0
    assert _cli_lines(part) == full and _cli_lines(tmp_path / "part.bad.jsonl") == bad
    info = json.loads((tmp_path / "part.info.json").read_text())
    assert info["generated"] == 8 and info["bad"] == 2 and info["this_run"]["generated"] < 8


def test_saved_and_shared_captioners_keep_their_decoder(captioner, tmp_path):
    from one_peace.hub import save_pretrained

    out, results = captioner
    images = [r["image"] for r in _valid_rows(out)[:6]]
    model = one_peace.load(results["checkpoint"])
    expected = [g.text for g in model.generate(images)]
    one_peace.save(model, tmp_path / "saved")
    assert [g.text for g in one_peace.load(tmp_path / "saved").generate(images)] == expected
    shared = save_pretrained(out, tmp_path / "shared", shard_size="256KB")
    assert [g.text for g in one_peace.load_generator(shared).generate(images)] == expected
    card = (shared / "README.md").read_text()
    assert "## Generate (vl_seq2seq)" in card and "what does the image describe?" in card
    from safetensors import safe_open

    with safe_open(str(shared / "task.safetensors"), framework="pt") as fh:
        assert all(k.startswith("decoder.") for k in fh.keys())  # noqa: SIM118


def test_grounding_boxes_and_classification_labels_through_the_same_api(tmp_path):
    """Tiny grounding and closed-set runs: boxes in pixels of each image (its size read from the file when the row
    has no width/height), labels from the training set; eval task=generation reports the runs' own metrics."""
    from one_peace.data.manifest import iter_manifest
    from one_peace.eval.__main__ import EvalConfig, evaluate

    grounding = _run("vl_grounding", tmp_path / "g", 4)
    rows = _valid_rows(tmp_path / "g")
    model = one_peace.load(grounding["checkpoint"])
    bare = [{k: v for k, v in r.items() if k not in ("width", "height")} for r in rows[:4]]
    boxes = model.generate(bare)
    assert all(g.kind == "box" and g.image_size == (32, 32) for g in boxes)
    assert all(g.box is None or (len(g.box) == 4 and all(0 <= v <= 32 for v in g.box)) for g in boxes)
    assert [g.box for g in boxes] == [g.box for g in model.generate(rows[:4])]
    valid = str(tmp_path / "g" / "demo_data" / "valid.jsonl")
    ev = evaluate(
        EvalConfig(task="generation", checkpoint=grounding["checkpoint"], data=valid, out=str(tmp_path / "g.json"))
    )
    assert (ev["mean_iou"], ev["acc@0.5"], ev["baseline_mean_iou"]) == (
        grounding["mean_iou"],
        grounding["acc@0.5"],
        grounding["baseline_mean_iou"],
    )
    with pytest.raises(ValueError, match="not for BOX targets"):
        model.generate(bare, constraints=["x"])

    closed = _run("vl_classify", tmp_path / "c", 4)
    allowed = {row["caption"] for _, row in iter_manifest(tmp_path / "c" / "demo_data" / "train.jsonl")}
    labels = one_peace.load(closed["checkpoint"]).generate([r["image"] for r in _valid_rows(tmp_path / "c")])
    assert all(g.text in allowed for g in labels)
    valid = str(tmp_path / "c" / "demo_data" / "valid.jsonl")
    ev = evaluate(
        EvalConfig(task="generation", checkpoint=closed["checkpoint"], data=valid, out=str(tmp_path / "c.json"))
    )
    assert ev["token_f1"] == closed["token_f1"] and ev["accuracy"] == closed["exact_match"]
    assert ev["classes"] == len(allowed) and 0 <= ev["baseline_accuracy"] <= 1


def test_a_retrieval_checkpoint_is_not_a_captioner(tmp_path, capsys):
    from one_peace.generate import main as generate_main
    from one_peace.generation import GenerationError

    model = one_peace.build_model("tiny", modalities=("image", "text"))
    model.trained_with = {"recipe": "vl_contrastive", "uses": ["retrieval"]}
    folder = one_peace.save(model, tmp_path / "ck")
    with pytest.raises(GenerationError, match="trained by recipe 'vl_contrastive' for retrieval, not for generation"):
        one_peace.load(folder).generate(["x.png"])
    with pytest.raises(SystemExit, match="recipe 'vl_contrastive'"):
        generate_main([f"checkpoint={folder}", f"data={tmp_path}", f"out={tmp_path / 'o.jsonl'}"])
    with pytest.raises(GenerationError, match="no text decoder"):
        one_peace.build_model("tiny", modalities=("text",)).generate(["a"])


def test_multitask_checkpoint_generates_with_its_caption_task(tmp_path):
    results = _run("multitask_demo", tmp_path, 2)
    model = one_peace.load(results["checkpoint"])
    assert model.trained_with["uses"] == ["generation", "retrieval"]
    from one_peace.generation import generator_names

    assert generator_names(model) == ["caption"]
    rows = _valid_rows(tmp_path)
    printed = [e["generated"] for e in results["caption"]["examples"]]
    assert [g.text for g in model.generate(rows[: len(printed)])] == printed
    with pytest.raises(ValueError, match=r"feeds \[\], but this decoder was trained on \['image'\]"):
        model.generate([{"caption": "x"}], instruction="[TEXT:caption] say it again")


def test_a_hostile_generator_record_is_refused_at_load(captioner, tmp_path):
    import shutil

    from one_peace.checkpoint import CheckpointError

    _, results = captioner
    folder = tmp_path / "ck"
    shutil.copytree(results["checkpoint"], folder)
    doc = json.loads((folder / "config.json").read_text())
    record = doc["trained"]["generators"]["vl_seq2seq"]
    for key, value, message in [
        ("weights", "../../etc/passwd", "generators.vl_seq2seq.weights"),
        ("beam", "2", r"generators.vl_seq2seq.beam: expected int"),
        ("target", "audio", "expected 'text' or 'box'"),
    ]:
        (folder / "config.json").write_text(
            json.dumps({**doc, "trained": {**doc["trained"], "generators": {"vl_seq2seq": {**record, key: value}}}})
        )
        with pytest.raises(CheckpointError, match=message):
            one_peace.load(folder)
    (folder / "config.json").write_text(
        json.dumps(
            {**doc, "trained": {**doc["trained"], "generators": {"vl_seq2seq": {**record, "prefix": "nothing."}}}}
        )
    )
    with pytest.raises(CheckpointError, match=r"holds no tensor under 'nothing\.'"):
        one_peace.load(folder).generate(["x.png"])
