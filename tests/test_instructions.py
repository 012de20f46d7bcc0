"""OFASys-style instruction templates: parsing, errors with positions, sampling, BOX quantisation."""

from __future__ import annotations

import random

import pytest

from one_peace.train.instructions import Instruction, InstructionError, dequantize_box, quantize_box

pytestmark = pytest.mark.core


def test_caption_and_grounding_templates_parse_and_render():
    ins = Instruction("[IMAGE:img] what does the image describe? -> [TEXT:caption]")
    out = ins.render({"img": "a.png", "caption": "a dog"}, random.Random(0))
    assert out["inputs"] == {"image": "a.png"} and out["prompt"] == [" what does the image describe? "]
    assert out["target"] == [("a dog", True)]
    g = Instruction('[IMAGE:img] which region does the text " [TEXT:cap] " describe? -> [BOX:region]')
    out = g.render(
        {"img": "a.png", "cap": "the dog", "region": [10, 20, 110, 220]}, random.Random(0), image_size=(200, 400)
    )
    assert out["prompt"] == [' which region does the text " ', "the dog", ' " describe? ']
    assert out["target"] == [([50, 50, 549, 549], True)]
    gc = Instruction("[IMAGE:img] what does the region [BOX:region] describe? -> [TEXT:cap,closed_set]")
    out = gc.render({"img": "a", "cap": "dog", "region": [0, 0, 200, 400]}, random.Random(0), image_size=(200, 400))
    assert out["prompt"][1] == [0, 0, 999, 999] and out["closed_set"]


def test_attributes_and_sampling_between_templates():
    ins = Instruction(
        "[IMAGE:img,mask_ratio=0.5] caption: -> [TEXT:cap] ||| [AUDIO:wav] [TEXT:q] -> [TEXT:pre,no_loss] [TEXT:a]"
    )
    assert ins.fields() == {"img", "cap", "wav", "q", "pre", "a"}
    row = {"img": "i", "cap": "c", "wav": "w", "q": "q?", "pre": "answer:", "a": "yes"}
    picked = {ins.render(row, random.Random(s))["template"] for s in range(20)}
    assert picked == {0, 1}
    second = next(
        ins.render(row, random.Random(s)) for s in range(20) if ins.render(row, random.Random(s))["template"] == 1
    )
    assert second["target"] == [("answer:", False), ("yes", True)] and second["inputs"] == {"audio": "w"}
    first = next(
        ins.render(row, random.Random(s)) for s in range(20) if ins.render(row, random.Random(s))["template"] == 0
    )
    assert first["mask_ratio"] == {"image": 0.5}


@pytest.mark.parametrize(
    ("spec", "pos", "what"),
    [
        ("[IMAGE:img] caption", 19, "missing '->'"),
        ("[IMAGE:img caption -> [TEXT:c]", 0, "unclosed '\\['"),
        ("[IMAGE:a b] x -> [TEXT:c]", 0, "malformed slot"),
        ("[IMAGE:img] x -> [TEXT:c", 17, "unclosed '\\['"),
        ("[SMELL:s] x -> [TEXT:c]", 1, "unknown slot type 'SMELL'"),
        ("[IMAGE:] x -> [TEXT:c]", 7, "empty field name"),
        ("[IMAGE:i,loud=1] x -> [TEXT:c]", 9, "unknown attribute 'loud'"),
        ("[IMAGE:i,mask_ratio=2] x -> [TEXT:c]", 9, "mask_ratio must be"),
        ("[IMAGE:i] x -> y", 14, "the target needs at least one slot"),
        ("[IMAGE:i] x -> [IMAGE:j]", 15, "target slots must be TEXT or BOX"),
        ("[IMAGE:i] x -> [TEXT:c] -> [TEXT:d]", 24, "more than one '->'"),
        ("[IMAGE:i] x] -> [TEXT:c]", 11, "']' without"),
    ],
)
def test_malformed_templates_fail_with_the_position(spec, pos, what):
    with pytest.raises(InstructionError, match=rf"position {pos}: {what}"):
        Instruction(spec, modalities=["text", "image", "audio"])


def test_error_in_second_template_names_it():
    with pytest.raises(InstructionError, match=r"template 2"):
        Instruction("[IMAGE:i] a -> [TEXT:c] ||| [IMAGE:i] b ->", modalities=["text", "image"])


def test_box_quantisation_round_trips_within_a_bin():
    box = [12.0, 30.5, 180.0, 299.0]
    q = quantize_box(box, (200, 300))
    assert all(0 <= b < 1000 for b in q)
    back = dequantize_box(q, (200, 300))
    assert all(abs(a - b) <= 0.5 * 300 / 999 for a, b in zip(back, box))
    with pytest.raises(ValueError, match="original image size"):
        quantize_box(box, None)
