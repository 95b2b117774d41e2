"""The README's "What the model almost said" example runs, and what it prints is true."""

from __future__ import annotations

import torch

from tests.helpers.readme_blocks import block_starting_with


def test_the_readme_example_runs_and_its_replay_is_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    source = block_starting_with("# what-the-model-almost-said")
    exec(compile(source, "README.md:what-the-model-almost-said", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "detections instead of" in printed
    result, model, images = namespace["result"], namespace["model"], namespace["images"]
    assert len(result.image_near_misses(0)["scores"]) > 0
    replayed = namespace["replayed"]
    assert replayed.exact.all()
    model.score_thresh, model.nms_thresh, model.detections_per_img = 0.0101, 0.6, 100
    with torch.no_grad():
        want = model(images)
    for i, w in enumerate(want):
        assert torch.equal(replayed[i].labels, w["labels"])
        assert torch.equal(replayed[i].scores, w["scores"])
        assert torch.equal(replayed[i].boxes, w["boxes"])
    assert int(namespace["table"]["detections"].sum()) > 0
