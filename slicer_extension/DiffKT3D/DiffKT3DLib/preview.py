"""Segment-to-dose preview: debounce segment edits into one 1-step preview request.

A segment edit in Slicer fires many modified events (every paint stroke). `Debouncer` waits until
the edits pause for `delay_s` and then fires once; it takes its clock as an argument, so tests
drive it with a fake clock and no Qt. `SegmentEditWatcher` connects it to a segmentation node:
only segments whose role is target or OAR trigger a preview, and only while enabled.

Both run on the main thread: the watcher's VTK observer is called by MRML on the main thread and
`Debouncer.poll()` is called from the same QTimer that polls the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .constants import PREVIEW_DEBOUNCE_S

logger = logging.getLogger(__name__)

_VTK_STRING = 13  # vtk.VTK_STRING: lets a Python observer receive the segment id as call data


class Debouncer:
    """Call `callback(keys)` once, `delay_s` after the last `trigger()`.

    Args:
        callback: receives the set of keys (e.g. segment ids) triggered since the last call.
        delay_s: quiet time (s) required before firing.
        clock: monotonic time source in seconds (injected for tests).
    """

    def __init__(self, callback: Callable[[set[str]], None], delay_s: float = PREVIEW_DEBOUNCE_S,
                 clock: Callable[[], float] = time.monotonic):
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.callback = callback
        self.delay_s = delay_s
        self.clock = clock
        self.enabled = True
        self._due_s: float | None = None
        self._keys: set[str] = set()

    @property
    def pending(self) -> bool:
        return self._due_s is not None

    def trigger(self, key: str = "") -> None:
        """Note an edit; (re)starts the quiet period. Ignored while disabled."""
        if not self.enabled:
            return
        self._keys.add(key)
        self._due_s = self.clock() + self.delay_s

    def cancel(self) -> None:
        self._due_s = None
        self._keys = set()

    def poll(self) -> bool:
        """Fire if the quiet period is over. Returns True when the callback ran."""
        if self._due_s is None or not self.enabled or self.clock() < self._due_s:
            return False
        keys, self._keys, self._due_s = self._keys, set(), None
        self.callback(keys)
        return True


class SegmentEditWatcher:
    """Feed a Debouncer from a segmentation node's voxel-edit events.

    Args:
        segmentation_node: vtkMRMLSegmentationNode to watch.
        debouncer: receives the edited segment ids.
        should_trigger: segment_id -> bool (e.g. "is this a target or OAR in the request?").
    """

    def __init__(self, segmentation_node, debouncer: Debouncer, should_trigger: Callable[[str], bool]):
        self.node = segmentation_node
        self.debouncer = debouncer
        self.should_trigger = should_trigger
        self._tag: int | None = None

    def start(self) -> None:
        if self._tag is not None:
            return

        def on_content_modified(caller, event, segment_id):
            # Without a segment id (several segments changed at once) be conservative: preview.
            if not segment_id or self.should_trigger(str(segment_id)):
                logger.debug("segment %s edited: preview scheduled", segment_id)
                self.debouncer.trigger(str(segment_id or ""))

        on_content_modified.CallDataType = _VTK_STRING
        self._callback = on_content_modified  # keep a reference while observed
        # Voxel edits (Segment Editor effects) fire SourceRepresentationModified with the segment
        # id; SegmentModified is for name / colour / tag changes, which do not change the dose.
        self._tag = self.node.AddObserver(self.node.GetSegmentation().SourceRepresentationModified,
                                          on_content_modified)

    def stop(self) -> None:
        if self._tag is not None:
            self.node.RemoveObserver(self._tag)
            self._tag = None
        self.debouncer.cancel()
