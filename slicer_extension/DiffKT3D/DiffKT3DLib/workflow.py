"""The module's logic: scene <-> server round trips, run as worker jobs.

Split of work per request (the GUI thread never waits on the network):
1. main thread: export the CT and segments to a case folder (MRML work);
2. worker job: upload the folder as a session, run the task, fetch every candidate's dose;
3. main thread (`on_done` from `Runner.poll`): load doses, Scorecard tables, DVH and isodose.

`Workflow` holds the state of the panel (server info, current candidates, active candidate,
preview toggle). Dependencies are injected (scene, client, runner, clock) so pytest drives it
on a slicer-core scene against a real server, and Slicer's module wraps it in a few lines.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import roles as roles_mod
from .candidates import CandidateSet
from .client import DiffKT3DClient, normalize_server_url
from .client_jobs import new_job_id
from .constants import (
    DOSE_TASK,
    IMPUTE_TASKS,
    KEEP_REQUEST_DIRS,
    PREVIEW_DEBOUNCE_S,
    PREVIEW_STEPS,
    PREVIEW_TIMEOUT_S,
)
from .imputation_quality import warnings_text
from .parameters import ParameterNode
from .preview import Debouncer, SegmentEditWatcher
from .scene import SceneLogic
from .scene_case import place_in_study_of
from .scene_inputs import ExportedCase
from .slicerrt import SlicerRTDisplay
from .worker import Job, JobContext, Runner
from .workflow_cases import CasesAndTraining

logger = logging.getLogger(__name__)


@dataclass
class DoseRequest:
    """Inputs of a dose request as chosen in the panel."""

    ct_node: Any
    segmentation_node: Any
    structure_roles: list[roles_mod.StructureRole]
    candidates: int = 1
    steps: int | None = None  # None: the server's default
    seed: int = 0
    template: str | None = None
    reference_dose_node: Any = None  # compare the candidates with this dose (on the CT grid)

    @property
    def prescription_gy(self) -> float | None:
        rx = [r.prescription_gy for r in self.structure_roles
              if r.role == "target" and r.prescription_gy is not None]
        return max(rx) if rx else None

    def params(self, preview: bool) -> dict[str, Any]:
        if self.candidates < 1:
            raise ValueError(f"number of candidates must be >= 1, got {self.candidates}")
        out: dict[str, Any] = {"seed": int(self.seed)}
        if preview:
            out.update(preview=True, steps=PREVIEW_STEPS, candidates=1)
        elif self.reference_dose_node is not None:
            out["compare"] = True
        else:
            out["candidates"] = int(self.candidates)
            if self.steps is not None:
                out["steps"] = int(self.steps)
        if self.template:
            out["template"] = self.template
        return out


class Workflow(CasesAndTraining):
    """State and actions of the DiffKT3D panel.

    Args:
        scene: the vtkMRMLScene.
        client: server client (its URL can be changed with `set_server`).
        runner: job runner (ThreadRunner in Slicer).
        work_dir: folder for request/result files (default: a new temp folder, removed by close()).
        clock: monotonic seconds, for the preview debouncer.
        on_status: called on the main thread with short status lines for the panel.
        slicerrt: SlicerRT's isodose and DVH display (None: SlicerRT is not installed; the module's
            own isodose segmentation and DVH tables are used).
    """

    def __init__(self, scene, client: DiffKT3DClient, runner: Runner, work_dir: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_status: Callable[[str], None] | None = None, slicerrt: SlicerRTDisplay | None = None):
        self.scene_logic = SceneLogic(scene)
        self.slicerrt = slicerrt
        self.client = client
        self.runner = runner
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="DiffKT3D-"))
        self.on_status = on_status or (lambda text: logger.info("%s", text))
        self.info: dict[str, Any] | None = None
        self.tasks: dict[str, list[str]] = {}
        self.candidate_set: CandidateSet | None = None
        self.last_request: DoseRequest | None = None
        self.last_export: ExportedCase | None = None
        self.last_job_id: str | None = None  # the server job of the latest dose or imputation request
        self.last_job_states: list[dict[str, Any]] = []  # its states as read while it ran
        self.dose_nodes: dict[str, Any] = {}
        self.scorecard_tables: dict[str, Any] = {}
        self.isodose_node = None
        self.preview_node = None
        self.preview_set: CandidateSet | None = None
        self._preview_request: DoseRequest | None = None
        self._request_counter = 0
        self._preview_job: Job | None = None
        self._preview_again = False
        self.debouncer = Debouncer(self._on_preview_due, PREVIEW_DEBOUNCE_S, clock)
        self.debouncer.enabled = False
        self._watcher: SegmentEditWatcher | None = None
        self.parameters = ParameterNode(scene)
        # A closed scene takes our result nodes with it: forget them (Slicer's File > Close Scene).
        self._close_observer = scene.AddObserver(scene.EndCloseEvent, lambda *_: self.on_scene_closed())

    # -- plumbing ----------------------------------------------------------------------------------
    def poll(self) -> None:
        """Main-thread tick (QTimer): run finished-job callbacks and a due preview."""
        self.runner.poll()
        self.debouncer.poll()

    def set_server(self, url: str) -> str:
        """Change the server URL (normalised); forgets the previous server's task list."""
        self.client.server_url = normalize_server_url(url)
        self.info, self.tasks = None, {}
        return self.client.server_url

    def login(self, username: str = "", password: str = "", token: str = "",
              on_done: Callable[[str], None] | None = None,
              on_error: Callable[[BaseException], None] | None = None) -> Job:
        """Log in to a server that requires it (job): a pasted `token`, else user name + password.

        `on_done` gets the logged-in user name, which is also the rater the server records.
        """
        if token.strip():
            return self.runner.submit(lambda ctx: self._check_token(token), description="log in",
                                      on_done=on_done, on_error=on_error)
        if not username.strip() or not password:
            raise ValueError("enter a user name and password, or paste a token")
        return self.runner.submit(lambda ctx: self.client.login(username, password), description="log in",
                                  on_done=on_done, on_error=on_error)

    def _check_token(self, token: str) -> str:
        self.client.set_token(token)
        self.client.info()  # a bad or expired token fails here (AuthenticationRequired), not later
        return self.client.username or ""

    def rater(self, typed: str) -> str:
        """The rater to send: the logged-in user when there is one (the server uses it anyway)."""
        return getattr(self.client, "username", None) or typed  # test fakes may have no login

    def on_scene_closed(self) -> None:
        """Forget every node of the closed scene and stop the preview (its segmentation is gone)."""
        self.enable_preview(None, False)
        self.candidate_set = self.preview_set = None
        self.last_request, self.last_export = None, None
        self.dose_nodes, self.scorecard_tables = {}, {}
        self.isodose_node = self.preview_node = None
        self.on_status("scene closed")

    def close(self) -> None:
        self.scene_logic.scene.RemoveObserver(self._close_observer)
        self.enable_preview(None, False)
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()
        elif hasattr(self.runner, "cancel_all"):
            self.runner.cancel_all()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _new_request_dir(self, kind: str) -> Path:
        """A fresh folder per request; only the last KEEP_REQUEST_DIRS are kept on disk (a live
        preview makes one per edit; results are in the scene once loaded)."""
        self._request_counter += 1
        folder = self.work_dir / f"{self._request_counter:04d}-{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        old = sorted(p for p in self.work_dir.iterdir() if p.is_dir())[:-KEEP_REQUEST_DIRS]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return folder

    # -- connect -------------------------------------------------------------------------------------
    def connect(self, on_done: Callable[[dict], None] | None = None,
                on_error: Callable[[BaseException], None] | None = None) -> Job:
        """Fetch /info/ and the task list (job)."""
        def work(ctx: JobContext) -> dict[str, Any]:
            ctx.progress(None, f"connecting to {self.client.server_url}")
            info = self.client.info(cancel=ctx)
            return {"info": info, "tasks": self.client.available_tasks(info)}

        def done(result: dict[str, Any]) -> None:
            self.info, self.tasks = result["info"], result["tasks"]
            self.on_status(f"connected to {self.client.server_url}: tasks {self.tasks['dose'] + self.tasks['impute']}")
            if on_done:
                on_done(result)

        return self.runner.submit(work, description="connect", on_done=done, on_error=on_error)

    # -- dose -------------------------------------------------------------------------------------------
    def request_dose(self, request: DoseRequest, *, preview: bool = False,
                     on_done: Callable[[CandidateSet], None] | None = None,
                     on_error: Callable[[BaseException], None] | None = None,
                     on_progress: Callable[[float | None, str], None] | None = None) -> Job:
        """Export the inputs (now), then upload + predict + fetch candidates in a job.

        Raises:
            ValueError: unusable inputs (no CT, no target with a prescription, empty target ...),
                raised here on the main thread before any network call.
        """
        if request.ct_node is None:
            raise ValueError("select a CT volume")
        if request.segmentation_node is None:
            raise ValueError("select a segmentation with the structures")
        if request.prescription_gy is None:
            raise ValueError("no target segment with a prescription: set a target role and its dose "
                             "(e.g. name a segment PTV70)")
        params = request.params(preview)
        folder = self._new_request_dir("preview" if preview else "dose")
        exported = self.scene_logic.export_case(request.ct_node, request.segmentation_node,
                                                request.structure_roles, folder / "case")
        if params.get("compare"):
            self.scene_logic.export_reference_dose(request.reference_dose_node, request.ct_node, exported)
        client = self.client
        result_dir = folder / "result"

        def work(ctx: JobContext) -> dict[str, Any]:
            ctx.progress(0.05, "uploading the case")
            session_id = client.upload_case(exported.files, cancel=ctx)
            ctx.check_cancelled()
            ctx.progress(0.2, "predicting the dose" + (" (preview)" if preview else ""))
            timeout = PREVIEW_TIMEOUT_S if preview else None
            main = self._infer_as_job(ctx, DOSE_TASK, result_dir, session_id, params, "sampling",
                                      read_timeout_s=timeout)
            if preview:  # a preview is never re-fetched: free the server's copy of the case now
                try:
                    client.delete_session(session_id)
                except Exception as exc:  # noqa: BLE001 - best effort; sessions also expire
                    logger.info("could not delete preview session %s: %s", session_id, exc)
            cand = main.params.get("candidates") or []
            best = str(main.params.get("chosen_id") or (cand[0]["id"] if cand else "c0"))
            doses = {best: main.image_path}
            others = [str(c["id"]) for c in cand if str(c["id"]) != best]
            for i, cid in enumerate(others):
                ctx.check_cancelled()
                ctx.progress(0.6 + 0.35 * i / max(1, len(others)), f"fetching candidate {cid}")
                extra = client.infer(DOSE_TASK, result_dir / cid, session_id=session_id, output="image",
                                     params={"request_id": main.params.get("request_id"), "candidate_id": cid},
                                     cancel=ctx)
                doses[cid] = extra.image_path
            return {"params": main.params, "doses": doses, "session_id": session_id}

        def done(result: dict[str, Any]) -> None:
            cset = self._show_dose_result(result, request, exported, preview)
            if on_done:
                on_done(cset)

        self.last_request, self.last_export = request, exported
        return self.runner.submit(work, description="preview" if preview else "dose prediction",
                                  on_done=done, on_error=on_error, on_progress=on_progress)

    def _infer_as_job(self, ctx: JobContext, task: str, result_dir: Path, session_id: str, params: dict[str, Any],
                      label: str, span: tuple[float, float] = (0.2, 0.6), read_timeout_s: float | None = None):
        """`client.infer` as a server job (worker thread): the server reports the sampling step of a
        fresh job id, shown on `ctx` over `span`, and stops it when Cancel is pressed, so the model is
        free for the next request instead of finishing work nobody waits for."""
        job_params = {**params, "job_id": new_job_id()}
        self.last_job_id = job_params["job_id"]
        with self.client.follow_job(job_params["job_id"], ctx, span=span, label=label) as self.last_job_states:
            return self.client.infer(task, result_dir, session_id=session_id, params=job_params,
                                     read_timeout_s=read_timeout_s, cancel=ctx)

    def _show_dose_result(self, result: dict[str, Any], request: DoseRequest, exported: ExportedCase,
                          preview: bool) -> CandidateSet:
        """Main thread: doses, Scorecard tables, DVH, isodose of a finished request."""
        cset = CandidateSet.from_response(result["params"])
        cset.session_id = result["session_id"]
        rx = request.prescription_gy
        segment_ids = [r.segment_id for r in request.structure_roles if r.role in ("target", "oar")]
        anchor = request.ct_node or request.segmentation_node  # results go into its study
        if preview:
            best = cset.active
            self.preview_node = self.scene_logic.load_dose(result["doses"][best.id], "DiffKT3D preview dose",
                                                           rx, "preview", node=self.preview_node)
            best.dose_path, best.dose_node_id = result["doses"][best.id], self.preview_node.GetID()
            table = self.scene_logic.scorecard_table("preview", best.scorecard)
            best.table_node_id = table.GetID()
            self._dvh("preview", 0, self.preview_node, request.segmentation_node, segment_ids)
            self.isodose_node = self._isodose(self.preview_node, rx)
            for node in (self.preview_node, self.isodose_node):
                place_in_study_of(self.scene_logic.scene, node, anchor)
            self.scene_logic.show_in_slice_views(request.ct_node, self.preview_node)
            self.preview_set = cset
            self.on_status(f"preview: Scorecard {best.total:.1f}")
            return cset
        self.candidate_set = cset
        self.dose_nodes, self.scorecard_tables = {}, {}
        for i, cand in enumerate(cset.candidates):
            cand.dose_path = result["doses"].get(cand.id)
            if cand.dose_path is None:
                raise ValueError(f"the server sent no dose for candidate {cand.id}")
            node = self.scene_logic.load_dose(cand.dose_path, f"DiffKT3D dose {cand.id}", rx, cand.id)
            place_in_study_of(self.scene_logic.scene, node, anchor)
            cand.dose_node_id = node.GetID()
            self.dose_nodes[cand.id] = node
            table = self.scene_logic.scorecard_table(cand.id, cand.scorecard)
            cand.table_node_id = table.GetID()
            self.scorecard_tables[cand.id] = table
            self._dvh(cand.id, i, node, request.segmentation_node, segment_ids)
        comparison = result["params"].get("comparison")
        scorecards = cset.scorecards()
        if comparison:
            self.scene_logic.reference_comparison_table(comparison)
            scorecards["reference"] = comparison["reference"]["scorecard"]
        if len(scorecards) > 1:
            self.scene_logic.comparison_table(scorecards)
        self.set_active_candidate(cset.active_id)
        self.on_status(f"{len(cset.candidates)} candidate(s); best {cset.best_id}: "
                       f"Scorecard {cset.get(cset.best_id).total:.1f}")
        return cset

    def _isodose(self, dose_node, prescription_gy: float):
        """Isodose lines: SlicerRT's when it is installed, else the module's own segmentation."""
        if self.slicerrt is not None:
            return self.slicerrt.isodose(dose_node, prescription_gy, node=self.isodose_node)
        return self.scene_logic.update_isodose(dose_node, prescription_gy, node=self.isodose_node)

    def _dvh(self, candidate_id: str, index: int, dose_node, segmentation_node, segment_ids: list[str]) -> None:
        """DVH: SlicerRT's (metrics, CSV export) when installed, else the module's tables and chart."""
        if self.slicerrt is not None:
            self.slicerrt.dvh(dose_node, segmentation_node, segment_ids)
        else:
            self.scene_logic.update_dvh(candidate_id, index, dose_node, segmentation_node, segment_ids)

    def set_active_candidate(self, candidate_id: str):
        """Show one candidate: its dose over the CT, its isodose lines, its Scorecard table.

        Returns:
            the candidate's Scorecard table node (the panel's table view shows it).
        """
        if self.candidate_set is None:
            raise ValueError("no candidates yet: request a dose first")
        cand = self.candidate_set.set_active(candidate_id)
        dose_node = self.dose_nodes[cand.id]
        rx = self.last_request.prescription_gy if self.last_request else None
        if rx:
            self.isodose_node = self._isodose(dose_node, rx)
            place_in_study_of(self.scene_logic.scene, self.isodose_node, dose_node)
        self.scene_logic.show_in_slice_views(self.last_request.ct_node if self.last_request else None, dose_node)
        return self.scorecard_tables[cand.id]

    # -- preferences and active learning -----------------------------------------------------------------
    def send_preference(self, chosen_id: str, rater: str, comment: str = "",
                        on_done: Callable[[dict], None] | None = None,
                        on_error: Callable[[BaseException], None] | None = None) -> Job:
        """Record the planner's choice among the current candidates (job)."""
        if self.candidate_set is None:
            raise ValueError("no candidates to rate: request a dose with 2 or more candidates")
        record = self.candidate_set.preference_record(chosen_id, self.rater(rater), comment)
        return self.runner.submit(lambda ctx: self.client.record_preference(record),
                                  description="send preference", on_done=on_done, on_error=on_error)

    # -- imputation ------------------------------------------------------------------------------------
    def request_imputation(self, target: str, ct_node, segmentation_node,
                           structure_roles: list[roles_mod.StructureRole],
                           on_done: Callable[[dict], None] | None = None,
                           on_error: Callable[[BaseException], None] | None = None,
                           on_progress: Callable[[float | None, str], None] | None = None,
                           steps: int | None = None, structures: Sequence[str] | None = None) -> Job:
        """Impute the CT ("ct") or target / OAR masks ("ptv" / "oar") and load the result.

        The CT result becomes a new volume; masks become segments "<name> (imputed)" added to
        `segmentation_node`. `on_done` receives {"params", "volume_node"} or {"params", "segments"}.
        Like a dose request, the imputation runs as a server job: its sampling steps reach
        `on_progress` and Cancel stops it on the server. `steps`: None for the server's default.
        `structures`: the names of the masks to impute (None or empty: all the model imputes); the
        server refuses a name it does not know, naming those it does.
        """
        if target not in IMPUTE_TASKS:
            raise ValueError(f"unknown imputation target {target!r} (expected one of {sorted(IMPUTE_TASKS)})")
        structures = [str(n).strip() for n in (structures or []) if str(n).strip()]
        if structures and target == "ct":
            raise ValueError("structures select masks of a PTV or OAR imputation; a CT imputation has none")
        if segmentation_node is None:
            raise ValueError("select a segmentation (it also gives the grid when the CT is missing)")
        task = IMPUTE_TASKS[target]
        folder = self._new_request_dir(task)
        exported = self.scene_logic.export_case(None if target == "ct" else ct_node, segmentation_node,
                                                structure_roles, folder / "case")
        reference = ct_node if (ct_node is not None and target != "ct") else \
            self.scene_logic.reference_volume(segmentation_node)
        client = self.client

        def work(ctx: JobContext) -> dict[str, Any]:
            ctx.progress(0.05, "uploading the case")
            session_id = client.upload_case(exported.files, cancel=ctx)
            ctx.check_cancelled()
            ctx.progress(0.2, f"imputing {target}")
            params: dict[str, Any] = {} if steps is None else {"steps": int(steps)}
            if structures:
                params["structures"] = structures
            res = self._infer_as_job(ctx, task, folder / "result", session_id, params, f"imputing {target}",
                                     span=(0.2, 0.95))
            return {"params": res.params, "image": res.image_path}

        def done(result: dict[str, Any]) -> None:
            out: dict[str, Any] = {"params": result["params"]}
            if result["image"] is None:
                raise ValueError(f"the server sent no image for {task}")
            if target == "ct":
                out["volume_node"] = self.scene_logic.load_imputed_volume(result["image"], "DiffKT3D imputed CT")
                place_in_study_of(self.scene_logic.scene, out["volume_node"], segmentation_node)
            else:
                labels = result["params"].get("labels") or {}
                if not labels:
                    raise ValueError(f"the {task} answer has no 'labels' mapping")
                out["segments"] = self.scene_logic.add_imputed_labelmap(
                    segmentation_node, result["image"], labels, reference or ct_node)
            out["warnings"] = list(result["params"].get("warnings") or [])
            self.on_status(warnings_text(task, result["params"]))
            if on_done:
                on_done(out)

        return self.runner.submit(work, description=task, on_done=done, on_error=on_error, on_progress=on_progress)

    # -- segment-to-dose preview -------------------------------------------------------------------------
    def enable_preview(self, request: DoseRequest | None, enabled: bool) -> None:
        """Toggle the live preview: edits of target/OAR segments of `request` trigger 1-step doses."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        self.debouncer.enabled = bool(enabled and request is not None)
        if not self.debouncer.enabled:
            return
        self._preview_request = request
        used = {r.segment_id for r in request.structure_roles if r.role in ("target", "oar")}
        self._watcher = SegmentEditWatcher(request.segmentation_node, self.debouncer, lambda sid: sid in used)
        self._watcher.start()

    @property
    def preview_job(self) -> Job | None:
        """The latest preview job (None before the first preview)."""
        return self._preview_job

    @property
    def preview_running(self) -> bool:
        return self._preview_job is not None and not self._preview_job.finished

    def _on_preview_due(self, segment_ids: set[str]) -> None:
        if self.preview_running:  # coalesce: one more preview when the running one ends
            self._preview_again = True
            return
        self._preview_again = False

        def finished(*_args) -> None:
            if self._preview_again and self.debouncer.enabled:
                self._on_preview_due(set())

        def failed(exc: BaseException) -> None:
            self.on_status(f"preview failed: {exc}")
            finished()

        try:
            self._preview_job = self.request_dose(self._preview_request, preview=True,
                                                  on_done=finished, on_error=failed)
        except ValueError as exc:  # e.g. the user emptied the target: say so, keep watching
            self.on_status(f"preview not possible: {exc}")
