"""The panel's actions on the server's cases and training runs: "Next case" that loads the case,
and starting, following and stopping a training run.

A mixin of `Workflow` (workflow.py), split off to keep both files readable; it uses the workflow's
client, runner, scene logic, parameter node and status callback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .parameters import CT_REFERENCE, REFERENCE_DOSE_REFERENCE, SEGMENTATION_REFERENCE
from .scene_case import LoadedCase, load_case_folder
from .training import TrainingStatus
from .worker import Job, JobContext


class CasesAndTraining:
    """Next case and training (needs `client`, `runner`, `scene_logic`, `parameters`, `tasks`,
    `on_status`, `rater()` and `_new_request_dir()` from `Workflow`)."""

    def next_case(self, rater: str, strategy: str = "preference", load: bool = True,
                  on_done: Callable[[dict], None] | None = None,
                  on_error: Callable[[BaseException], None] | None = None) -> Job:
        """Ask the active-learning strategy for the next case to label and load it (job).

        With `load`, the case's files are downloaded (`GET /diffkt3d/cases/{id}`) and loaded as a
        CT, a segmentation with the plan's roles and the case's dose as the reference dose, all in
        one study, and the parameter node points at them. `on_done` gets the strategy's answer plus
        `"case"`: the `LoadedCase` (absent when no case is left or `load` is False).
        """
        rater = self.rater(rater)
        if not rater.strip():
            raise ValueError("enter a rater name: the strategy skips cases this rater labelled")
        client = self.client
        folder = self._new_request_dir("case")

        def work(ctx: JobContext) -> dict[str, Any]:
            answer = client.next_case(rater.strip(), strategy)
            if load and answer.get("id"):
                ctx.progress(None, f"downloading case {answer['id']}")
                answer = {**answer, "folder": client.download_case(str(answer["id"]), folder)}
            return answer

        def done(answer: dict[str, Any]) -> None:
            if answer.get("folder") is not None:
                answer["case"] = self.load_case(answer.pop("folder"))
            if on_done:
                on_done(answer)

        return self.runner.submit(work, description="next case", on_done=done, on_error=on_error)

    def load_case(self, folder: str | Path) -> LoadedCase:
        """Load a downloaded case folder into the scene (main thread) and select it as the input."""
        case = load_case_folder(self.scene_logic.scene, folder, as_case=True)
        self.parameters.set_node(CT_REFERENCE, case.ct_node)
        self.parameters.set_node(SEGMENTATION_REFERENCE, case.segmentation_node)
        self.parameters.set_node(REFERENCE_DOSE_REFERENCE, case.reference_dose_node)
        self.on_status(f"case {case.case_id} loaded")
        return case

    # -- training ------------------------------------------------------------------------------------
    def start_training(self, task: str, params: dict[str, Any] | None = None,
                       on_done: Callable[[dict], None] | None = None,
                       on_error: Callable[[BaseException], None] | None = None) -> Job:
        """Start a training run on the server (job); physicist or admin when logins are on."""
        if task not in self.tasks.get("trainers", []):
            raise ValueError(f"the server has no training task {task!r} (it has {self.tasks.get('trainers', [])}); "
                             "connect first")
        return self.runner.submit(lambda ctx: self.client.start_training(task, params), description="start training",
                                  on_done=on_done, on_error=on_error)

    def training_status(self, on_done: Callable[[TrainingStatus], None] | None = None,
                        on_error: Callable[[BaseException], None] | None = None) -> Job:
        """Read the latest training run (job): state, epoch progress, loss, validation figure."""
        return self.runner.submit(lambda ctx: TrainingStatus.from_server(self.client.training_status()),
                                  description="training status", on_done=on_done, on_error=on_error)

    def stop_training(self, on_done: Callable[[dict], None] | None = None,
                      on_error: Callable[[BaseException], None] | None = None) -> Job:
        return self.runner.submit(lambda ctx: self.client.stop_training(), description="stop training",
                                  on_done=on_done, on_error=on_error)
