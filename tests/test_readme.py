"""Guard: every shell command the README (and the docs it links) tells a user to run is exercised by a
named test or by the CI script, so a new command without a test fails CI.

Commands are taken from fenced code blocks (every line of a `bash`/`sh`/`shell`/`console` block; lines
of an untagged block that start with a known program) and, in the README, also from inline code spans
that start with a known program and an argument (`diffkt3d predict`, `scripts/...`, `pip install ...`). Each must be a key of COVERAGE for its file,
mapped to one or more of:

- `tests/<path>.py::<test>`: a test that runs the command (or, where noted, its documented smoke form);
- `.ci/run`: the CI script itself runs it (checked: the command, or its pytest path, is what CI runs);
- `not run: <reason>` (docs only, never the README): a command that cannot run here (GPU, network
  download), with the test of the same code path named in the reason.

To add a command to the README: write the test first, then add the command here with that test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("diffkt3d", "monailabel", "python", "python3", "python3.11", "pip", "torchrun", "nice", "curl",
            "huggingface-cli", "cp", "export", "pytest", "source", "scripts/", "PORT=", ".ci/run")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
# every docs/*.md the README links (found afresh, so a newly linked page is checked too) + docs/scardnft.md
LINKED_DOCS = tuple(sorted(set(re.findall(r"\]\((docs/[\w./-]+\.md)\)", (REPO / "README.md").read_text()))
                           | {"docs/scardnft.md"}))

CLI = "tests/cli/test_readme_commands.py"
SMOKE_TRAIN = f"{CLI}::test_train_cpu_default_recipe_smoke_run"
SMOKE_SCARDNFT = f"{CLI}::test_train_scardnft_recipe_smoke_run"
SERVER = "tests/monailabel_app/test_readme_server_command.py::test_readme_start_server_command_serves_the_sample_cases"
INSTALL = "tests/test_install.py::test_documented_install_steps_are_the_ones_setup_env_runs"
TRANSFER = "tests/test_install.py::test_transfer_extra_declares_and_provides_peft_and_diffusers"
DISTRIBUTED = ("tests/training/test_distributed.py::test_torchrun_gloo_two_ranks",
               "tests/training/test_distributed.py::test_torchrun_command_shapes")
AUTH = "tests/monailabel_app/test_server_auth.py"
AUTH_LOGIN = f"{AUTH}::test_login_through_the_server_gives_a_working_token"
PACS = "tests/monailabel_app/test_server_pacs.py"
PACS_SERVER = f"{PACS}::test_orthanc_needs_credentials_and_the_server_lists_its_ct_series"
AUTH_AUDIT = "test_training_runs_models_and_refusals_are_audited_and_only_admins_read_the_trail"
LIFECYCLE = ("tests/monailabel_app/test_server_model_lifecycle.py::"
             "test_preference_loop_validates_keeps_a_ruined_candidate_promotes_and_rolls_back")
GPU_NOTE = ("not run: needs 8 GPUs; the same entry point runs under torchrun with gloo on 2 CPU ranks in "
            "tests/training/test_distributed.py::test_torchrun_gloo_two_ranks")
LATENT_GPU_NOTE = ("not run: needs a GPU and a trained Wan checkpoint; the same entry point serves a tiny latent "
                   "checkpoint with a tiny Wan VAE on the CPU")
FULL_RES_TRAIN = "tests/cli/test_train_full_res_cmd.py::test_full_res_recipe_smoke_run"
LATENT_CLI = "tests/cli/test_latent_model_cmd.py::test_predict_and_impute_with_a_latent_model"

COVERAGE: dict[str, dict[str, tuple[str, ...]]] = {
    "README.md": {
        "scripts/quickstart.sh": (
            "tests/scripts/test_quickstart.py::test_quickstart_writes_the_documented_outputs_and_stops_its_server",),
        "scripts/quickstart.sh --keep-server": (
            "tests/scripts/test_quickstart.py::test_quickstart_keep_server_leaves_the_server_up_for_slicer",),
        "scripts/test.sh": (".ci/run",),
        ".ci/run": (".ci/run",),
        "diffkt3d predict CASE... --out ROOT [--model PATH] [--steps 10] [--preview] [--candidates N] "
        "[--aggregate best|mean] [--seed S]": (
            f"{CLI}::test_predict_preview_writes_dose_and_scorecard_per_case",
            f"{CLI}::test_predict_model_steps_candidates_aggregate"),
        "diffkt3d predict": (f"{CLI}::test_predict_preview_writes_dose_and_scorecard_per_case",),
        "diffkt3d impute --target ct|ptv|oar CASE... --out ROOT [--steps 10] [--seed S]": (
            f"{CLI}::test_impute_ptv_writes_masks_on_the_case_grid",
            "tests/cli/test_impute_cmd.py::test_prdit_backbone_writes_ct_on_the_case_grid"),
        "diffkt3d impute --target ptv|oar CASE --out ROOT --write-case": (
            "tests/cli/test_impute_cmd.py::test_write_case_then_export_dicom_marks_imputed_rois",),
        "diffkt3d export dicom ROOT/<case>": (
            "tests/cli/test_impute_cmd.py::test_write_case_then_export_dicom_marks_imputed_rois",),
        "diffkt3d evaluate --pred ROOT --ref ROOT [--json FILE] [--template openkbp_hn]": (
            f"{CLI}::test_evaluate_predictions_against_sample_data",),
        "diffkt3d train --config configs/cpu-default.yaml --data-root DIR [--set KEY=VALUE] [--out-dir D] "
        "[--max-steps N] [--max-cases N]": (
            SMOKE_TRAIN, f"{CLI}::test_smoke_options_refuse_bad_values_in_one_line"),
        "diffkt3d train --stage scardnft --config configs/scardnft-cpu.yaml --data-root DIR": (SMOKE_SCARDNFT,),
        "diffkt3d import openkbp|gdp-hmm|dicom SRC... --out ROOT": (
            "tests/cli/test_import_cmd.py::test_import_openkbp_and_refuse_overwrite",
            "tests/cli/test_import_cmd.py::test_import_gdp_hmm_with_ptv_dict",
            f"{CLI}::test_export_then_import_dicom_round_trip"),
        "diffkt3d export dicom CASE... --out ROOT": (f"{CLI}::test_export_then_import_dicom_round_trip",),
        "monailabel start_server --app monailabel_app --studies sample-data": (SERVER,),
        "diffkt3d import openkbp open-kbp/provided-data/train-pats --out data/openkbp/train": (
            "tests/cli/test_import_cmd.py::test_import_openkbp_and_refuse_overwrite",),
        "diffkt3d import openkbp open-kbp/provided-data/validation-pats --out data/openkbp/validation": (
            "tests/cli/test_import_cmd.py::test_import_openkbp_and_refuse_overwrite",),
    },
    "docs/benchmarks.md": {
        "python benchmarks/dose_benchmark.py": ("tests/benchmarks/test_dose_benchmark_cmd.py::"
                                               "test_dose_benchmark_one_case_preview",),
        "python benchmarks/fit_gap.py": ("tests/benchmarks/test_fit_gap.py::"
                                         "test_validation_figure_is_the_one_the_trainer_selected_on",),
        "python benchmarks/full_res.py --target oar --model runs/ship/cascade.pt --peer runs/full-res-oar-peer/final.pt "
        "--variants model peer --threads 2 --record-quality": (
            "tests/benchmarks/test_full_res_benchmark.py::test_record_quality_writes_the_oar_figures_into_the_model",),
    },
    "docs/full-res.md": {
        "diffkt3d train configs/full-res-dose.yaml --stage full-res --data-root DIR": (FULL_RES_TRAIN,),
        "diffkt3d train configs/full-res-dose.yaml --stage full-res --data-root DIR --set stage.coarse_input=false "
        "--out-dir runs/full-res-dose-peer": (FULL_RES_TRAIN,),
        "python benchmarks/full_res.py --target dose --model runs/full-res-dose/final.pt "
        "--peer runs/full-res-dose-peer/final.pt --limit 40": (
            "tests/benchmarks/test_full_res_benchmark.py::test_benchmark_writes_figures_and_paired_tests",),
    },
    "docs/server.md": {
        "python3.11 -m venv .venv && source .venv/bin/activate": (INSTALL, ".ci/run"),
        "pip install -e .": (INSTALL, ".ci/run"),
        "pip install -r requirements-server.txt": (INSTALL, ".ci/run"),
        "pip install --no-deps -r requirements-server-nodeps.txt": (INSTALL, ".ci/run"),
        "export MONAI_LABEL_TRACKING_ENABLED=false": (SERVER,),
        "export MONAI_LABEL_INFER_CONCURRENCY=1": (SERVER,),
        "monailabel start_server --app monailabel_app --studies sample-data --port 8000": (SERVER,),
        # the model lifecycle: trained, validated, kept or promoted, listed, rolled back over HTTP
        "curl -X POST http://HOST:8000/train/scardnft -H 'Content-Type: application/json' "
        "-d '{\"iterations\": 20, \"validation.rule.min_cases\": 5}'": (LIFECYCLE,),
        "curl http://HOST:8000/train/": (LIFECYCLE,),
        "curl http://HOST:8000/diffkt3d/models": (LIFECYCLE,),
        "curl http://HOST:8000/diffkt3d/models/v2-scardnft": (LIFECYCLE,),
        "curl -X POST http://HOST:8000/diffkt3d/models/v2-scardnft/promote -H 'Content-Type: application/json' "
        "-d '{\"reason\": \"accepted by the physics team\"}'": (LIFECYCLE, f"{AUTH}::{AUTH_AUDIT}"),
        "curl -X POST http://HOST:8000/diffkt3d/models/shipped/promote -H 'Content-Type: application/json' "
        "-d '{\"reason\": \"roll back\"}'": (LIFECYCLE,),
    },
    "docs/request-format.md": {
        "curl -X POST \"http://HOST:8000/infer/dose?image=pt_201&output=all\" "
        "-F 'params={\"steps\": 10, \"candidates\": 3, \"seed\": 7, \"template\": \"openkbp_hn\"}'": (
            "tests/monailabel_app/test_server_integration.py::test_dose_on_datastore_case",),
    },
    "docs/slicer.md": {
        "pip install -e \".[dev]\"": (INSTALL, ".ci/run"),
        "pip install -r requirements-server.txt && pip install --no-deps -r requirements-server-nodeps.txt": (
            INSTALL, ".ci/run"),
        "nice -n 15 pytest tests/slicer_extension": (".ci/run",),
        "nice -n 15 pytest tests/slicer_extension -m \"not server\"": (".ci/run",),
    },
    "docs/model-card.md": {
        "diffkt3d train --config configs/cpu-default.yaml --data-root DIR": (SMOKE_TRAIN,),
        # the smoke test loads the run's best.pt as a servable model, which is what this copy ships
        "cp runs/cpu-default/full-res-0/final.pt diffkt3d/weights/cpu-default.pt": (SMOKE_TRAIN,),
    },
    "docs/gpu.md": {
        "pip install \"torch==2.13.0\" --index-url https://download.pytorch.org/whl/cu128": (
            "not run: CUDA wheel download; the CPU build of the same pinned version is what CI installs",),
        "pip install -e \".[transfer]\"": (TRANSFER, ".ci/run"),
        "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --include \"transformer/*\" \"vae/*\" "
        "--local-dir weights/Wan2.1-T2V-1.3B-Diffusers": (
            "not run: 2.6 GB download; the loaders read tiny random checkpoints with the same keys in "
            "tests/models/test_wan_transfer.py and tests/models/test_wan_vae.py",),
        "torchrun --nproc_per_node 8 -m diffkt3d.training.distributed --config configs/wan-1.3b-gpu.yaml": (
            GPU_NOTE, *DISTRIBUTED),
        "torchrun --nproc_per_node 8 -m diffkt3d.training.distributed --config configs/wan-1.3b-gpu.yaml "
        "--wan-checkpoint /data/Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors "
        "--vae-dir /data/Wan2.1-T2V-1.3B-Diffusers/vae --out-dir runs/wan-try1": (GPU_NOTE, *DISTRIBUTED),
        "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29500 "
        "-m diffkt3d.training.distributed --config configs/wan-1.3b-gpu.yaml": (GPU_NOTE, *DISTRIBUTED),
        "diffkt3d predict sample-data/pt_201 --out out/ --model runs/wan-1.3b-gpu/best.pt "
        "--vae-dir weights/Wan2.1-T2V-1.3B-Diffusers/vae --device cuda": (LATENT_GPU_NOTE, LATENT_CLI),
        "diffkt3d impute --target ct sample-data/pt_205 --out out/ --model runs/wan-1.3b-gpu/best.pt "
        "--vae-dir weights/Wan2.1-T2V-1.3B-Diffusers/vae --device cuda": (LATENT_GPU_NOTE, LATENT_CLI),
        "monailabel start_server --app monailabel_app --studies /data/cases --conf model runs/wan-1.3b-gpu/best.pt "
        "--conf vae_dir weights/Wan2.1-T2V-1.3B-Diffusers/vae --conf device cuda": (
            LATENT_GPU_NOTE, "tests/monailabel_app/test_server_latent.py::"
            "test_slicer_client_gets_a_latent_dose_in_gy_and_the_preview_reuses_the_conditions"),
    },
    "docs/scorecard.md": {
        "diffkt3d evaluate --pred ROOT --ref ROOT [--json FILE] [--template NAME|PATH]": (
            "tests/cli/test_evaluate.py::test_evaluate_figures_and_json_match_printed_table",
            "tests/cli/test_evaluate.py::test_allow_missing_skips_and_lists",
            f"{CLI}::test_evaluate_predictions_against_sample_data"),
        "nice -n 15 diffkt3d evaluate --pred $DIFFKT3D_DATA_ROOT/openkbp/validation "
        "--ref $DIFFKT3D_DATA_ROOT/openkbp/validation --json ref_vs_ref.json": (
            "tests/cli/test_evaluate.py::test_reference_against_itself_on_real_validation_cases",),
    },
    "docs/security.md": {
        # the auth tests start a real server with these variables against a real local OIDC provider
        "export MONAI_LABEL_AUTH_ENABLE=true": (AUTH_LOGIN,),
        "export MONAI_LABEL_AUTH_REALM_URI=https://sso.clinic.example/realms/clinic": (AUTH_LOGIN,),
        "export MONAI_LABEL_AUTH_CLIENT_ID=diffkt3d-slicer": (AUTH_LOGIN,),
        "monailabel start_server --app monailabel_app --studies /data/cases --host 127.0.0.1 --port 8000": (
            AUTH_LOGIN, SERVER),
        # (the auth fixture sets max_upload_mb but not auth_audience: that option is not exercised by a server test)
        "MONAI_LABEL_AUTH_ENABLE=true MONAI_LABEL_AUTH_REALM_URI=https://sso.clinic.example/realms/clinic "
        "MONAI_LABEL_AUTH_CLIENT_ID=diffkt3d-slicer monailabel start_server --app monailabel_app --studies "
        "/data/cases --host 127.0.0.1 --port 8000 --conf max_upload_mb 512 --conf auth_audience diffkt3d": (
            AUTH_LOGIN, f"{AUTH}::test_upload_size_limit_holds_with_auth_on"),
    },
    "docs/pacs.md": {
        # the PACS fixture starts Orthanc (basic auth) and the server with these settings
        "export MONAI_LABEL_DICOMWEB_USERNAME=diffkt3d MONAI_LABEL_DICOMWEB_PASSWORD='…'": (PACS_SERVER,),
        "monailabel start_server --app monailabel_app --studies http://127.0.0.1:8042/dicom-web --conf state_dir "
        "/srv/diffkt3d/state --port 8000": (PACS_SERVER, f"{PACS}::test_next_strategy_and_state_folder_over_the_pacs"),
        "sudo apt-get install orthanc orthanc-dicomweb": (
            "not run: system packages; scripts/setup_env.sh test (CI, as root) installs the same two and "
            f"{PACS_SERVER} uses them",),
        "sudo systemctl restart orthanc": (
            "not run: the system service; tests start their own Orthanc (tests/monailabel_app/orthanc_process.py) "
            f"as in {PACS_SERVER}",),
        "curl -u diffkt3d:… http://127.0.0.1:8042/dicom-web/studies": (PACS_SERVER,),
        "curl -u diffkt3d:… -X POST http://127.0.0.1:8042/modalities/pacs/move -d '{\"Level\": \"Study\", "
        "\"Resources\": [{\"StudyInstanceUID\": \"1.2.…\"}], \"TargetAet\": \"DIFFKT3D\"}'": (
            "not run: needs a DIMSE PACS peer; the study it would bring is uploaded over STOW-RS in "
            f"{PACS_SERVER}",),
        "curl -u diffkt3d:… -X POST http://127.0.0.1:8042/modalities/pacs/store -d '<Orthanc series id>'": (
            "not run: needs a DIMSE PACS peer; the series it forwards is read back over DICOMweb in "
            f"{PACS}::test_dose_is_stored_as_a_predicted_rtdose_and_reads_back",),
    },
    "docs/scardnft.md": {
        "diffkt3d train --stage scardnft --config configs/scardnft-cpu.yaml --data-root DIR [--set KEY=VALUE] "
        "[--out-dir D] [--device cpu]": (
            SMOKE_SCARDNFT,
            "tests/training/test_scardnft_run.py::test_cli_stage_scardnft_runs_and_writes_loadable_outputs"),
    },
}


def _is_command(text: str) -> bool:
    """`diffkt3d predict ...` or `scripts/x.sh` is a command; `diffkt3d/weights` or `monailabel_app/` is not."""
    words = text.split()
    if not words:
        return False
    if any(words[0].startswith(p) for p in PROGRAMS if p.endswith(("/", "="))) or words[0] == ".ci/run":
        return True
    return len(words) > 1 and words[0] in PROGRAMS  # a bare `python` or `monailabel` is a name, not a command


def extract_commands(markdown: str, inline: bool = True) -> list[str]:
    """Shell commands of a Markdown text: fenced shell blocks, untagged blocks and (with `inline`) code spans."""
    commands: list[str] = []
    in_block, lang, pending = False, "", ""
    for raw in markdown.splitlines():
        line = raw.strip()
        fence = re.match(r"^(```+|~~~+)\s*([\w-]*)", line)
        if fence:
            in_block, lang, pending = (not in_block), fence.group(2).lower(), ""
            continue
        if in_block:
            if pending:
                line, pending = f"{pending} {line}", ""
            if line.endswith("\\"):
                pending = line[:-1].strip()
                continue
            line = re.sub(r"\s+#\s.*$", "", line).strip()  # trailing comment
            if not line or line.startswith("#"):
                continue
            if lang in SHELL_LANGS or (not lang and _is_command(line)):
                commands.append(re.sub(r"\s+", " ", line))
            continue
        for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", raw) if inline else ():
            if _is_command(span.strip()):
                commands.append(re.sub(r"\s+", " ", span.strip()))
    return list(dict.fromkeys(commands))


def _check_target(target: str, in_readme: bool, command: str) -> str | None:
    if target.startswith("not run:"):
        return "the README promises every command is exercised: 'not run' is not allowed there" if in_readme else None
    if target == ".ci/run":
        ci = (REPO / ".ci" / "run").read_text()
        return None if "scripts/test.sh" in ci else ".ci/run no longer runs scripts/test.sh"
    path, _, name = target.partition("::")
    file = REPO / path
    if not file.is_file():
        return f"{path} does not exist"
    if not re.search(rf"^def {re.escape(name)}\(", file.read_text(), re.MULTILINE):
        return f"{path} has no test named {name}"
    return None


@pytest.mark.parametrize("doc", ["README.md", *LINKED_DOCS])
def test_every_documented_command_maps_to_a_test(doc: str) -> None:
    # README: code blocks and inline commands; linked docs: their code blocks (the commands to run)
    commands = extract_commands((REPO / doc).read_text(), inline=doc == "README.md")
    mapping = COVERAGE.get(doc, {})
    missing = [c for c in commands if c not in mapping]
    assert not missing, (f"{doc}: commands without a test (add one, then map it in tests/test_readme.py "
                         f"COVERAGE[{doc!r}]):\n  " + "\n  ".join(missing))
    stale = [c for c in mapping if c not in commands]
    assert not stale, f"{doc}: COVERAGE lists commands no longer in the file:\n  " + "\n  ".join(stale)
    problems = [f"{c!r} -> {t}: {err}" for c in commands for t in mapping[c]
                if (err := _check_target(t, doc == "README.md", c))]
    assert not problems, "\n".join(problems)


def test_every_covering_test_runs_under_ci() -> None:
    """The covering tests live under tests/ (pytest's testpaths, which scripts/test.sh runs in full)."""
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'testpaths = ["tests"]' in pyproject
    test_sh = (REPO / "scripts" / "test.sh").read_text()
    assert re.search(r"python -m pytest \"\$@\"", test_sh)
    for doc in COVERAGE.values():
        for targets in doc.values():
            assert all(t.startswith(("tests/", ".ci/run", "not run:")) for t in targets), targets


def test_extractor_finds_blocks_spans_and_continuations() -> None:
    text = ("Run `scripts/go.sh --x` or see `diffkt3d/weights`.\n```bash\n# comment\npip install a \\\n"
            "    b   # why\n```\n```\nScorecard table\ndiffkt3d predict X\n```\n```python\nimport os\n```\n")
    assert extract_commands(text) == ["scripts/go.sh --x", "pip install a b", "diffkt3d predict X"]
    assert extract_commands(text, inline=False) == ["pip install a b", "diffkt3d predict X"]
    assert extract_commands("the `monailabel` launcher, `python -m x`") == ["python -m x"]
