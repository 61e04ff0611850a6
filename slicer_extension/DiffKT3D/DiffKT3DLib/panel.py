"""Qt side of the module panel: widgets <-> Workflow. Runs only inside Slicer (imports qt).

Thin by design: every decision lives in workflow.py / scene*.py (tested on slicer-core); this file
reads widgets, calls the workflow, and shows results, progress and the server's error messages.
A QTimer polls the worker queue and the preview debouncer on the GUI thread.
"""

from __future__ import annotations

import logging

import qt
import slicer

from .client import ClientError, DiffKT3DClient
from .constants import (
    DEFAULT_TEMPLATE,
    IGNORE_ROLE,
    IMPUTE_TASKS,
    POLL_INTERVAL_MS,
    ROLES,
    TRAIN_POLL_INTERVAL_S,
)
from .imputation_quality import experimental_text
from .parameters import CT_REFERENCE, REFERENCE_DOSE_REFERENCE, SEGMENTATION_REFERENCE, ModuleSettings
from .roles import StructureRole
from .scene import COMPARISON_TABLE_NAME, REFERENCE_TABLE_NAME
from .served_model import served_model_text
from .worker import ThreadRunner
from .workflow import DoseRequest, Workflow

logger = logging.getLogger(__name__)
_SETTINGS_URL = "DiffKT3D/ServerURL"
_ROLE_CHOICES = (*ROLES, IGNORE_ROLE)
# Every widget this file uses, with the Qt / MRML class it must have in Resources/UI/DiffKT3D.ui
# (tests/slicer_extension/test_extension_files.py checks both against the .ui file).
WIDGET_CLASSES = {
    "serverUrlLineEdit": "QLineEdit", "connectButton": "QPushButton", "loginUserLineEdit": "QLineEdit",
    "loginPasswordLineEdit": "QLineEdit", "tokenLineEdit": "QLineEdit", "loginButton": "QPushButton",
    "ctSelector": "qMRMLNodeComboBox", "segmentationSelector": "qMRMLNodeComboBox",
    "referenceDoseSelector": "qMRMLNodeComboBox", "rolesTable": "QTableWidget",
    "candidatesSpinBox": "QSpinBox", "stepsSpinBox": "QSpinBox", "seedSpinBox": "QSpinBox",
    "templateComboBox": "QComboBox", "predictButton": "QPushButton", "cancelButton": "QPushButton",
    "progressBar": "QProgressBar", "previewCheckBox": "QCheckBox", "candidateComboBox": "QComboBox",
    "totalLabel": "QLabel", "scorecardTableView": "qMRMLTableView", "compareButton": "QPushButton",
    "doseComparisonButton": "QPushButton", "raterLineEdit": "QLineEdit", "commentLineEdit": "QLineEdit",
    "sendPreferenceButton": "QPushButton", "nextCaseButton": "QPushButton", "nextCaseLabel": "QLabel",
    "trainTaskComboBox": "QComboBox", "startTrainingButton": "QPushButton", "stopTrainingButton": "QPushButton",
    "trainingProgressBar": "QProgressBar", "trainingStatusLabel": "QLabel", "imputeTargetComboBox": "QComboBox",
    "imputeStructuresLineEdit": "QLineEdit", "imputeButton": "QPushButton", "statusLabel": "QLabel",
}


class Panel:
    """Connects the widgets of Resources/UI/DiffKT3D.ui (`ui` = childWidgetVariables) to a Workflow."""

    def __init__(self, ui, workflow: Workflow | None = None):
        self.ui = ui
        url = str(qt.QSettings().value(_SETTINGS_URL, "") or "")
        self.workflow = workflow or Workflow(slicer.mrmlScene, DiffKT3DClient(url), ThreadRunner(),
                                             on_status=self.status)
        self.workflow.on_status = self.status
        self.job = None
        ui.serverUrlLineEdit.text = self.workflow.client.server_url
        ui.imputeTargetComboBox.addItems(sorted(IMPUTE_TASKS))
        self.restore_settings()
        ui.progressBar.hide()
        ui.trainingProgressBar.hide()
        ui.connectButton.clicked.connect(self.on_connect)
        ui.loginButton.clicked.connect(self.on_login)
        ui.segmentationSelector.currentNodeChanged.connect(lambda node: self.fill_roles())
        ui.predictButton.clicked.connect(self.on_predict)
        ui.cancelButton.clicked.connect(self.on_cancel)
        ui.candidateComboBox.currentTextChanged.connect(self.on_candidate)
        ui.compareButton.clicked.connect(lambda: self.show_table(COMPARISON_TABLE_NAME))
        ui.doseComparisonButton.clicked.connect(lambda: self.show_table(REFERENCE_TABLE_NAME))
        ui.startTrainingButton.clicked.connect(self.on_start_training)
        ui.stopTrainingButton.clicked.connect(self.on_stop_training)
        ui.sendPreferenceButton.clicked.connect(self.on_send_preference)
        ui.nextCaseButton.clicked.connect(self.on_next_case)
        ui.imputeButton.clicked.connect(self.on_impute)
        ui.previewCheckBox.toggled.connect(self.on_preview_toggled)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.timeout.connect(self.workflow.poll)
        self.timer.start()
        self.train_timer = qt.QTimer()  # reads the training run's status while one runs
        self.train_timer.setInterval(int(TRAIN_POLL_INTERVAL_S * 1000))
        self.train_timer.timeout.connect(self.poll_training)
        # a loaded scene (.mrb / .mrml) brings its parameter node: show its settings and inputs
        self._import_observer = slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndImportEvent,
                                                             lambda *_: self.restore_settings())

    def cleanup(self) -> None:
        slicer.mrmlScene.RemoveObserver(self._import_observer)
        self.timer.stop()
        self.train_timer.stop()
        self.workflow.close()

    # -- parameter node ------------------------------------------------------------------------
    def restore_settings(self) -> None:
        params, ui = self.workflow.parameters, self.ui
        settings = params.settings()
        ui.stepsSpinBox.value, ui.candidatesSpinBox.value = settings.steps, settings.candidates
        ui.seedSpinBox.value, ui.raterLineEdit.text = settings.seed, settings.rater
        if settings.template and ui.templateComboBox.findText(settings.template) >= 0:
            ui.templateComboBox.currentText = settings.template
        for selector, role in ((ui.ctSelector, CT_REFERENCE), (ui.segmentationSelector, SEGMENTATION_REFERENCE),
                               (ui.referenceDoseSelector, REFERENCE_DOSE_REFERENCE)):
            if params.get_node(role) is not None:
                selector.setCurrentNode(params.get_node(role))

    def save_settings(self) -> None:
        params, ui = self.workflow.parameters, self.ui
        params.save_settings(ModuleSettings(
            steps=ui.stepsSpinBox.value, candidates=ui.candidatesSpinBox.value, seed=ui.seedSpinBox.value,
            template=ui.templateComboBox.currentText, rater=ui.raterLineEdit.text, preview=ui.previewCheckBox.checked))
        params.set_node(CT_REFERENCE, ui.ctSelector.currentNode())
        params.set_node(SEGMENTATION_REFERENCE, ui.segmentationSelector.currentNode())
        params.set_node(REFERENCE_DOSE_REFERENCE, ui.referenceDoseSelector.currentNode())

    # -- feedback ----------------------------------------------------------------------------
    def status(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def error(self, exc: BaseException) -> None:
        self.busy(False)
        message = str(exc) if isinstance(exc, (ClientError, ValueError)) else f"{type(exc).__name__}: {exc}"
        self.status(f"Error: {message}")
        slicer.util.errorDisplay(message, windowTitle="DiffKT3D")

    def busy(self, on: bool) -> None:
        self.ui.progressBar.setVisible(on)
        self.ui.cancelButton.enabled = on
        self.ui.predictButton.enabled = not on
        if on:
            self.ui.progressBar.setRange(0, 0)

    def progress(self, fraction, message: str) -> None:
        if fraction is not None:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.value = int(100 * fraction)
        self.status(message)

    # -- server ------------------------------------------------------------------------------
    def on_connect(self) -> None:
        try:
            url = self.workflow.set_server(self.ui.serverUrlLineEdit.text)
        except ValueError as exc:
            return self.error(exc)
        self.ui.serverUrlLineEdit.text = url
        qt.QSettings().setValue(_SETTINGS_URL, url)
        self.workflow.connect(on_done=self.on_connected, on_error=self.error)
        self.status(f"connecting to {url} ...")

    def on_login(self) -> None:
        def done(username: str) -> None:
            self.ui.loginPasswordLineEdit.text = ""
            self.ui.tokenLineEdit.text = ""
            self.ui.raterLineEdit.text = username  # the server records the logged-in user as rater
            self.status(f"logged in as {username}")

        try:
            self.workflow.login(self.ui.loginUserLineEdit.text, self.ui.loginPasswordLineEdit.text,
                                self.ui.tokenLineEdit.text, on_done=done, on_error=self.error)
        except ValueError as exc:
            self.error(exc)

    def on_connected(self, result) -> None:
        templates = (result["info"].get("diffkt3d") or {}).get("templates") or []
        self.ui.templateComboBox.clear()
        self.ui.templateComboBox.addItems(list(templates))
        stored = self.workflow.parameters.settings().template
        if stored in templates or DEFAULT_TEMPLATE in templates:
            self.ui.templateComboBox.currentText = stored if stored in templates else DEFAULT_TEMPLATE
        self.ui.imputeButton.enabled = bool(result["tasks"]["impute"])
        self.ui.trainTaskComboBox.clear()
        self.ui.trainTaskComboBox.addItems(result["tasks"]["trainers"])
        self.poll_training()
        experimental = experimental_text(result["info"])
        self.ui.imputeTargetComboBox.toolTip = experimental
        self.status(served_model_text(result["info"]) + (f"; {experimental}" if experimental else ""))

    # -- inputs --------------------------------------------------------------------------------
    def fill_roles(self) -> None:
        seg = self.ui.segmentationSelector.currentNode()
        table = self.ui.rolesTable
        table.setRowCount(0)
        if seg is None:
            return
        for row, r in enumerate(self.workflow.scene_logic.segment_roles(seg)):
            table.insertRow(row)
            item = qt.QTableWidgetItem(r.name)
            item.setData(qt.Qt.UserRole, r.segment_id)
            table.setItem(row, 0, item)
            combo = qt.QComboBox()
            combo.addItems(list(_ROLE_CHOICES))
            combo.currentText = r.role
            table.setCellWidget(row, 1, combo)
            spin = qt.QDoubleSpinBox()
            spin.setRange(0.0, 200.0)
            spin.setSuffix(" Gy")
            spin.value = r.prescription_gy or 0.0
            table.setCellWidget(row, 2, spin)

    def roles(self) -> list[StructureRole]:
        table, out = self.ui.rolesTable, []
        for row in range(table.rowCount):
            rx = table.cellWidget(row, 2).value
            role = table.cellWidget(row, 1).currentText
            out.append(StructureRole(table.item(row, 0).data(qt.Qt.UserRole), table.item(row, 0).text(), role,
                                     rx if (role == "target" and rx > 0) else None))
        seg = self.ui.segmentationSelector.currentNode()
        if seg is not None:
            self.workflow.scene_logic.store_roles(seg, out)
        return out

    def request(self) -> DoseRequest:
        self.save_settings()
        return DoseRequest(self.ui.ctSelector.currentNode(), self.ui.segmentationSelector.currentNode(),
                           self.roles(), candidates=self.ui.candidatesSpinBox.value,
                           steps=self.ui.stepsSpinBox.value, seed=self.ui.seedSpinBox.value,
                           template=self.ui.templateComboBox.currentText or None,
                           reference_dose_node=self.ui.referenceDoseSelector.currentNode())

    # -- dose and candidates ---------------------------------------------------------------------
    def on_predict(self) -> None:
        try:
            self.job = self.workflow.request_dose(self.request(), on_done=self.on_dose, on_error=self.error,
                                                  on_progress=self.progress)
        except ValueError as exc:
            return self.error(exc)
        self.busy(True)

    def on_cancel(self) -> None:
        if self.job is not None:  # the job's watcher then cancels it on the server (DELETE /diffkt3d/jobs/{id})
            self.workflow.runner.cancel(self.job)
        self.busy(False)
        self.status("cancelled")

    def on_dose(self, cset) -> None:
        self.busy(False)
        combo = self.ui.candidateComboBox
        combo.blockSignals(True)
        combo.clear()
        combo.addItems([c.id for c in cset.candidates])
        combo.currentText = cset.active_id
        combo.blockSignals(False)
        self.on_candidate(cset.active_id)
        plots = slicer.modules.plots.logic()
        plots.ShowChartInLayout(self.workflow.scene_logic.dvh_chart())

    def on_candidate(self, candidate_id: str) -> None:
        if not candidate_id or self.workflow.candidate_set is None:
            return
        table = self.workflow.set_active_candidate(candidate_id)
        self.ui.scorecardTableView.setMRMLTableNode(table)
        total = self.workflow.candidate_set.get(candidate_id).total
        self.ui.totalLabel.text = f"Scorecard total: {total:.2f}" if total is not None else ""

    def show_table(self, name: str) -> None:
        node = slicer.mrmlScene.GetFirstNodeByName(name)
        if node is None:
            return self.status(f"no table {name!r} yet: predict a dose first"
                               + (" with a reference dose selected" if name == REFERENCE_TABLE_NAME else ""))
        self.ui.scorecardTableView.setMRMLTableNode(node)

    # -- preferences, active learning, imputation, preview ---------------------------------------------
    def on_send_preference(self) -> None:
        try:
            self.workflow.send_preference(self.ui.candidateComboBox.currentText, self.ui.raterLineEdit.text,
                                          self.ui.commentLineEdit.text, on_error=self.error,
                                          on_done=lambda rec: self.status(f"preference saved ({rec.get('record_id', '')})"))
        except ValueError as exc:
            self.error(exc)

    def on_next_case(self) -> None:
        def done(result) -> None:
            self.ui.nextCaseLabel.text = str(result.get("id") or "no case left to label")
            case = result.get("case")
            if case is not None:  # loaded into the scene: make it the input
                if case.ct_node is not None:
                    self.ui.ctSelector.setCurrentNode(case.ct_node)
                self.ui.segmentationSelector.setCurrentNode(case.segmentation_node)
                self.ui.referenceDoseSelector.setCurrentNode(case.reference_dose_node)
                self.fill_roles()

        try:
            self.workflow.next_case(self.ui.raterLineEdit.text, on_done=done, on_error=self.error)
        except ValueError as exc:
            self.error(exc)

    def on_impute(self) -> None:
        target = self.ui.imputeTargetComboBox.currentText
        structures = [n.strip() for n in self.ui.imputeStructuresLineEdit.text.split(",") if n.strip()]
        try:
            self.job = self.workflow.request_imputation(
                target, self.ui.ctSelector.currentNode(), self.ui.segmentationSelector.currentNode(), self.roles(),
                on_done=lambda out: (self.busy(False), self.fill_roles()), on_error=self.error,
                on_progress=self.progress, structures=structures if target != "ct" else None)
        except ValueError as exc:
            return self.error(exc)
        self.busy(True)

    def on_preview_toggled(self, on: bool) -> None:
        try:
            self.workflow.enable_preview(self.request() if on else None, on)
        except ValueError as exc:
            self.ui.previewCheckBox.checked = False
            self.error(exc)

    # -- training -------------------------------------------------------------------------------
    def on_start_training(self) -> None:
        def started(_answer) -> None:
            self.status(f"training {task} started")
            self.train_timer.start()
            self.poll_training()

        task = self.ui.trainTaskComboBox.currentText
        try:
            self.workflow.start_training(task, on_done=started, on_error=self.error)
        except ValueError as exc:
            self.error(exc)

    def on_stop_training(self) -> None:
        self.workflow.stop_training(on_done=lambda _a: self.poll_training(), on_error=self.error)

    def poll_training(self) -> None:
        self.workflow.training_status(on_done=self.on_training_status,
                                      on_error=lambda exc: self.ui.trainingStatusLabel.setText(str(exc)))

    def on_training_status(self, status) -> None:
        bar = self.ui.trainingProgressBar
        bar.setVisible(status.running)
        if status.progress is not None:
            bar.setRange(0, 100)
            bar.value = int(100 * status.progress)
        self.ui.trainingStatusLabel.text = status.summary()
        self.ui.stopTrainingButton.enabled = status.running
        if status.running and not self.train_timer.isActive():
            self.train_timer.start()
        elif not status.running:
            self.train_timer.stop()
