"""SegmentEditWatcher + Debouncer on a real segmentation node (slicer-core), fake clock, no server."""

from __future__ import annotations

import pytest

pytest.importorskip("slicer_core", reason="slicer-core (headless MRML) is not installed")
from DiffKT3DLib.preview import Debouncer, SegmentEditWatcher
from DiffKT3DLib.scene import SceneLogic


def test_edits_of_request_segments_trigger_one_debounced_preview(scene, loaded_case, set_segment):
    ct, seg = loaded_case
    logic = SceneLogic(scene)
    segmentation = seg.GetSegmentation()
    ptv = segmentation.GetSegmentIdBySegmentName("PTV70")
    body = segmentation.GetSegmentIdBySegmentName("possible_dose_mask")
    now = [100.0]
    fired: list[set[str]] = []
    deb = Debouncer(fired.append, delay_s=1.0, clock=lambda: now[0])
    watcher = SegmentEditWatcher(seg, deb, should_trigger=lambda sid: sid != body)
    watcher.start()

    body_mask = logic.segment_mask(seg, body, ct)
    body_mask[0] = 0
    set_segment(seg, body, body_mask, ct)  # an edit outside the request's targets/OARs
    assert not deb.pending

    ptv_mask = logic.segment_mask(seg, ptv, ct)
    for _ in range(3):  # three paint strokes 0.3 s apart
        ptv_mask[:, :-1, :] |= ptv_mask[:, 1:, :]
        set_segment(seg, ptv, ptv_mask, ct)
        now[0] += 0.3
        assert not deb.poll()
    now[0] += 0.75
    assert deb.poll() and fired == [{ptv}]
    assert not deb.poll()  # once

    watcher.stop()
    ptv_mask[:, 1:, :] |= ptv_mask[:, :-1, :]
    set_segment(seg, ptv, ptv_mask, ct)
    now[0] += 5
    assert not deb.poll() and len(fired) == 1
