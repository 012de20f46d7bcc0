"""Correctness fixes of #10 that need no training extra: evaluator baselines from training data, image modes, WAV."""

from __future__ import annotations

import pytest
import torch

from one_peace.eval import BoxIoUEvaluator, EvalContext, TokenF1Evaluator, box_iou

pytestmark = pytest.mark.core


class _Task:
    def __init__(self, outputs):
        self.outputs = outputs

    def eval(self):
        return self

    def generate(self, batch, beam=1, closed_set=None):
        return self.outputs

    def generate_boxes(self, batch, beam=1):
        return self.outputs


def test_most_frequent_caption_baseline_is_the_training_one():
    batch = {"raw": {"caption": ["a blue circle", "a blue circle"]}, "valid": torch.tensor([True, True])}
    train = ["a red square"] * 3 + ["a blue circle"]
    ctx = EvalContext(None, [], task=_Task(["a red square", "a blue circle"]), loader=[batch])
    ctx.train_rows = [{"caption": c} for c in train]
    res = TokenF1Evaluator("caption")(ctx)
    assert res["baseline_caption"] == "a red square"  # the validation split's own mode would be "a blue circle"
    assert res["baseline_token_f1"] == pytest.approx(2 * (1 / 3 * 1 / 3) / (2 / 3))  # "a" of 3 tokens each way
    assert res["token_f1"] == pytest.approx((res["baseline_token_f1"] + 1.0) / 2)


def test_mean_box_baseline_is_the_mean_training_box():
    refs = [[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 20.0, 20.0]]
    batch = {"valid": torch.tensor([True, True])}
    train_boxes = [[0.0, 0.0, 10.0, 10.0]] * 3
    ctx = EvalContext(None, [], task=_Task([(refs[0], refs[0]), (None, refs[1])]), loader=[batch])
    ctx.train_rows = [{"box": b} for b in train_boxes]
    res = BoxIoUEvaluator("box")(ctx)
    assert res["mean_iou"] == pytest.approx(0.5) and res["acc@0.5"] == pytest.approx(0.5)
    assert res["baseline_mean_iou"] == pytest.approx((1.0 + 0.0) / 2)  # the training mean is refs[0]'s box
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)


def test_every_image_mode_decodes_to_the_right_colours(tmp_path):
    """#10.14: a 16-bit PNG used to decode almost white (PIL clips I;16 at 255)."""
    import numpy as np
    from one_peace.adapters.image import load_image
    from PIL import Image

    grey16 = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16  # 0 .. 65520
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    img16 = np.asarray(load_image(tmp_path / "g16.png"))
    expected = np.rint(grey16 / 257.0)
    assert np.abs(img16[..., 0].astype(float) - expected).max() <= 1 and (img16[..., 0] == 255).mean() < 0.01
    red = Image.new("RGB", (8, 8), (200, 30, 40))
    cases = {
        "1": Image.new("1", (8, 8), 1),
        "L": Image.new("L", (8, 8), 77),
        "P": red.convert("P", palette=Image.Palette.ADAPTIVE),
        "RGBA": Image.new("RGBA", (8, 8), (200, 30, 40, 128)),
        "CMYK": red.convert("CMYK"),
        "F": Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)),
    }
    want = {"1": (255,) * 3, "L": (77,) * 3, "P": (200, 30, 40), "RGBA": (200, 30, 40), "F": (128,) * 3}
    for mode, im in cases.items():
        im.save(tmp_path / f"{mode}.png" if mode not in ("CMYK", "F") else tmp_path / f"{mode}.tiff")
        path = tmp_path / (f"{mode}.png" if mode not in ("CMYK", "F") else f"{mode}.tiff")
        px = tuple(int(v) for v in np.asarray(load_image(path))[4, 4])
        if mode == "CMYK":
            assert max(abs(a - b) for a, b in zip(px, (200, 30, 40))) <= 3, px
        else:
            assert px == want[mode], (mode, px)


def test_encode_accepts_huge_finite_wav_samples_without_nan():
    """#10.14: +-3e38 float samples used to give a NaN embedding (float32 overflow in the normalisation)."""
    import numpy as np

    import one_peace

    model = one_peace.build_model("tiny", modalities=("text", "audio")).eval()
    wave = np.where(np.arange(16000) % 2 == 0, 3e38, -3e38).astype(np.float32)
    emb = model.encode("audio", [(wave, 16000)])
    assert torch.isfinite(emb).all()
    with pytest.raises(ValueError, match="NaN or infinity"):
        model.encode("audio", [(np.full(16000, np.inf, dtype=np.float32), 16000)])


def test_building_a_model_never_rewrites_the_callers_config():
    """#10.20: the model used to rewrite config.modalities and the official_padding setter the caller's config."""
    import one_peace

    cfg = one_peace.model_config("tiny", ("video",))  # video requires image: the model adds it
    options = {"video": {"num_frames": 4}}
    cfg.modality_options = options
    model = one_peace.build_model(cfg)
    assert model.config.modalities == ("image", "video") and cfg.modalities == ("video",)
    model.official_padding = True
    model.config.modality_options["video"]["num_frames"] = 2
    assert cfg.official_padding is False and options == {"video": {"num_frames": 4}}


def test_the_gather_group_follows_the_process_group_lifetime(tmp_path):
    """#10.20: the contrastive gather group was cached across process groups (a second run() reused a dead one)."""
    import torch.distributed as dist

    from one_peace.train import objectives

    groups = []
    for i in range(2):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store{i}", rank=0, world_size=1)
        try:
            group = objectives._gather_group()
            assert objectives._gather_group() is group  # cached within one process group
            out = [torch.zeros(2)]
            dist.all_gather(out, torch.ones(2), group=group)  # usable
            assert out[0].tolist() == [1.0, 1.0]
            groups.append(group)
        finally:
            dist.destroy_process_group()
    assert groups[0] is not groups[1]


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_keep_ids_naming_a_padded_position_keeps_it_padding(modality):
    """#10.19: the adapter's padding mask used to be dropped, so kept padding became an attended token."""
    import one_peace

    torch.manual_seed(0)
    model = one_peace.build_model("tiny", modalities=("text", "audio")).eval()
    batch = one_peace.example_inputs(("text", "audio"), batch_size=3, config=model.config)[modality]
    full = model.adapters[modality](batch)
    assert full.padding_mask is not None
    row = int(full.padding_mask.sum(1).argmax())  # the most padded sample
    padded = full.padding_mask[row].nonzero()[:, 0]
    last_real = int((~full.padding_mask[row]).nonzero()[-1])
    keep = torch.tensor([[0, 1, last_real, int(padded[0])]] * 3)
    out = model.adapters[modality](batch, keep_ids=keep)
    assert out.padding_mask is not None and bool(out.padding_mask[row, 3])
    assert not out.padding_mask[row, :3].any()
    # and the encoder's result for the real kept tokens does not depend on the padded one
    with torch.no_grad():
        with_pad = model.forward_features({modality: batch}, keep_ids={modality: keep}).hidden[modality][row, :3]
        without = model.forward_features({modality: batch}, keep_ids={modality: keep[:, :3]}).hidden[modality][row]
    torch.testing.assert_close(with_pad, without, atol=1e-5, rtol=1e-5)


def test_whole_word_masking_masks_every_piece_of_a_word_together(parity):
    """#10.8: nothing built the word-start table, so whole-word text masking was token masking."""
    from one_peace.adapters.text import TextTokenizer

    import one_peace
    from one_peace.train.objectives import DenoiseObjective
    from one_peace.train.task import Task

    tok = TextTokenizer.from_bpe_dir(parity / "bpe")
    model = one_peace.build_model(
        "tiny", modalities=("text",), modality_options={"text": {"vocab_size": tok.vocab_size}}
    )
    model.tokenizer = tok
    task = Task(model, {"t": (DenoiseObjective("text"), 1.0)}, seed=3)
    assert task.tokenizer is tok, "whole-word masking asks the text plugin for word starts with the model's tokenizer"
    table = tok.word_start_table()
    assert table.shape == (tok.vocab_size,)
    sentences = [
        "antidisestablishmentarianism is an extraordinarily long word",
        "the photosynthesising chloroplasts outperformed expectations",
        "unbelievably, the kaleidoscopic hummingbird hovered motionlessly",
    ] * 4
    batch = model.prepare("text", sentences)
    tokens = batch["tokens"]
    starts = table[tokens]
    assert (~starts & tokens.gt(3)).sum() >= 10, "the sentences must hold multi-piece words"
    valid = tokens.ne(1)
    valid = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)  # the CLS position comes first
    mask = task._single_mask("text", valid, {"text": batch})[:, 1:]
    assert mask.any()
    for row in range(tokens.shape[0]):
        word: list[int] = []
        for p in range(tokens.shape[1] + 1):
            at_end = p == tokens.shape[1] or tokens[row, p] <= 3 or bool(starts[row, p])
            if at_end and word:
                assert len({bool(mask[row, q]) for q in word}) == 1, (sentences[row], word)
                word = []
            if p < tokens.shape[1] and tokens[row, p] > 3:
                word.append(p)


def test_raw_errors_now_name_the_file_line_and_field(tmp_path, caplog):
    """#10.15: invalid UTF-8, a lone surrogate, a checkpoint folder without its tokenizer files."""
    import json

    from one_peace.adapters.text import TextTokenizer

    import one_peace
    from one_peace.checkpoint import CheckpointError
    from one_peace.data.manifest import ManifestError, iter_manifest, validate_manifest

    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ManifestError, match=r"latin1.jsonl:2: not valid UTF-8"):
        list(iter_manifest(bad_utf8))
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text(json.dumps({"text": "a"}) + "\n" + '{"text": "broken \\ud800 text"}\n')
    with caplog.at_level("WARNING"):  # one bad row is skipped as 'invalid value', named up front
        assert validate_manifest(surrogate, {"text": "text"}, ["text"]) == 2
    assert "surrogate.jsonl:2: field 'text': character 7 is a lone surrogate" in caplog.text
    surrogate.write_text('{"text": "broken \\ud800 text"}\n')
    with pytest.raises(ManifestError, match=r"surrogate.jsonl:1: field 'text': character 7 is a lone surrogate"):
        validate_manifest(surrogate, {"text": "text"}, ["text"])
    model = one_peace.build_model("tiny", modalities=("text",))
    model.tokenizer = TextTokenizer.train(["a red square", "a blue circle"] * 5, vocab_size=280)
    folder = one_peace.save(model, tmp_path / "ckpt")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer files that are missing: \['tokenizer.json'\]"):
        one_peace.load(folder)


def test_crafted_checkpoints_from_allowed_names_get_one_clear_refusal(tmp_path, monkeypatch):
    """#10.16: allowed pickle names put together wrongly gave raw TypeError/AttributeError/RecursionError."""
    import sys
    import types

    from one_peace.checkpoint import CheckpointError
    from one_peace.checkpoint.safe_pickle import safe_torch_load

    module = types.ModuleType("omegaconf.dictconfig")

    class DictConfig:
        def __init__(self, state):
            self.state = state

        def __reduce__(self):
            return (DictConfig, (), self.state)

    DictConfig.__module__, DictConfig.__qualname__ = "omegaconf.dictconfig", "DictConfig"
    module.DictConfig = DictConfig
    monkeypatch.setitem(sys.modules, "omegaconf.dictconfig", module)
    looped = DictConfig({"_content": {}})
    looped.state["_content"]["self"] = looped  # a config that contains itself
    for name, obj in {"list_state": DictConfig(["not", "a", "dict"]), "loop": looped}.items():
        torch.save({"cfg": obj, "model": {}}, tmp_path / f"{name}.pt")
        expected = "objects nest deeper than 64 levels" if name == "loop" else "config objects are malformed"
        with pytest.raises(CheckpointError, match=f"refused: its {expected}"):  # #23: a loop is a nesting bound
            safe_torch_load(tmp_path / f"{name}.pt")
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError) as err:
        safe_torch_load(tmp_path / "noise.pt")
    assert "weights_only=False" not in str(err.value) and "noise.pt" in str(err.value)


def test_multitask_gradient_is_the_weighted_sum_of_each_tasks_gradient():
    """#10.22: the old check recomputed the production expression from the logs; this one differentiates."""
    import one_peace
    from one_peace.train.multitask import MultiTask
    from one_peace.train.objectives import ContrastiveObjective
    from one_peace.train.task import Task

    torch.manual_seed(0)
    model = one_peace.build_model("tiny", modalities=("text", "image", "audio"))
    tasks = {
        "vl": Task(model, {"c": (ContrastiveObjective(("image", "text")), 1.0)}),
        "al": Task(model, {"c": (ContrastiveObjective(("audio", "text")), 1.0)}),
    }
    weights = {"vl": 1.0, "al": 0.25}
    batches = {}
    for i, (name, mods) in enumerate((("vl", ("image", "text")), ("al", ("audio", "text")))):
        batches[name] = one_peace.example_inputs(mods, batch_size=3, config=model.config, seed=i)
        batches[name]["valid"] = torch.ones(3, dtype=torch.bool)
    multi = MultiTask(model, tasks, weights)
    loss, logs = multi(batches)
    loss.backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    expected = {}
    separate = 0.0
    for name, task in tasks.items():
        part, _ = task(batches[name])
        separate += weights[name] * float(part)
        (weights[name] * part).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                expected[n] = expected.get(n, 0) + p.grad
        model.zero_grad(set_to_none=True)
    assert logs["loss"] == pytest.approx(separate, rel=1e-6)
    assert mixed.keys() == expected.keys() and any(".ffns.audio." in n for n in mixed)
    for n in mixed:
        torch.testing.assert_close(mixed[n], expected[n], atol=1e-6, rtol=1e-5)
