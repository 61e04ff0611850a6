"""Human-facing outputs: Scorecard as a text table, DVH plot and dose-overlay slice as PNG.

Used by the quick-start demo and the CLI; the Slicer panel shows the same figures natively.
matplotlib runs with the non-interactive Agg backend (servers and CI have no display).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffkt3d.data.case import Case
from diffkt3d.metrics.dvh import cumulative_dvh

# Eclipse-like isodose colours as % of the prescription (what Slicer users of SlicerRT ask for).
ISODOSE_LEVELS_PCT: tuple[tuple[float, str], ...] = (
    (50.0, "#00a000"), (80.0, "#0050ff"), (90.0, "#00d0ff"), (95.0, "#00ff80"),
    (100.0, "#ffff00"), (105.0, "#ff9900"), (110.0, "#ff0000"),
)


def scorecard_table(scorecard: dict[str, Any]) -> str:
    """Fixed-width table of a Scorecard JSON (diffkt3d.scorecard to_dict form)."""
    rows = [("structure", "metric", "value", "score", "weight", "hard")]
    for it in scorecard.get("items", []):
        hard = it.get("hard")
        hard_s = "" if not hard else ("pass" if hard["passed"] else f"FAIL (-{hard['penalty']:.1f})")
        value = it["value"]
        rows.append((it["structure"], it["metric"], f"{value:.2f} {it['unit']}",
                     f"{it['score']:.1f}/{it['max_score']:.0f}", f"{it['weight']:g}", hard_s))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total, max_total = scorecard.get("total", float("nan")), scorecard.get("max_total", float("nan"))
    lines.append(f"TOTAL {total:.2f} / {max_total:.2f}"
                 + (f"   hard-constraint penalty {scorecard['penalty_total']:.2f}" if scorecard.get("penalty_total") else ""))
    for s in scorecard.get("skipped", []):
        lines.append(f"skipped: {s['structure']} {s['metric']} ({s['reason']})")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dvh_plot(case: Case, doses: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Cumulative DVH per structure; one line style per dose (e.g. predicted solid, reference dashed)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    styles = ["-", "--", ":", "-."]
    cmap = plt.get_cmap("tab10")
    max_gy = max(float(d.max()) for d in doses.values()) * 1.02 + 1e-6
    for j, dose in enumerate(doses.values()):
        for i, (name, s) in enumerate(sorted(case.structures.items())):
            if not s.mask.any():
                continue
            edges, vol = cumulative_dvh(dose, s.mask, bin_width_gy=0.2, max_dose_gy=max_gy)
            ax.plot(edges, vol, styles[j % len(styles)], color=cmap(i % 10), lw=1.4,
                    label=name if j == 0 else None)
    ax.set_xlabel("Dose (Gy)")
    ax.set_ylabel("Volume (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(0, max_gy)
    ax.grid(alpha=0.3)
    names = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}
    ax.set_title(title or f"DVH, case {case.case_id}  (" + ", ".join(
        f"{lab}: {names[styles[j % len(styles)]]}" for j, lab in enumerate(doses)) + ")")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def dose_overlay(case: Case, dose_gy: np.ndarray, path: str | Path, axis: int = 2,
                 index: int | None = None, title: str = "") -> Path:
    """CT slice (or body if no CT) with the dose colour-wash, isodose lines (% Rx) and target outlines.

    Args:
        axis: slicing axis of the case arrays (OpenKBP: 2 is axial).
        index: slice index (default: through the target centroid).
    """
    plt = _plt()
    if index is None:
        union = case.target_union()
        index = int(np.argwhere(union)[:, axis].mean()) if union.any() else case.grid.shape[axis] // 2
    # Rows = the lower remaining array axis. For OpenKBP (axis 0 anterior->posterior, axis 1
    # right->left) an axial slice then shows anterior up and patient right on the viewer's left.
    take = lambda a: np.take(a, index, axis=axis)  # noqa: E731
    rx = case.max_prescription_gy() or float(dose_gy.max()) or 1.0
    base = take(case.ct_hu) if case.ct_hu is not None else take(case.body.astype(np.float32) * 100 - 1000) \
        if case.body is not None else np.zeros_like(take(dose_gy))
    d = take(dose_gy)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
    ax.imshow(base, cmap="gray", vmin=-400, vmax=400)
    wash = np.ma.masked_less(d, 0.1 * rx)
    im = ax.imshow(wash, cmap="jet", alpha=0.35, vmin=0, vmax=1.1 * rx)
    levels = [(p, c) for p, c in ISODOSE_LEVELS_PCT if d.max() >= p / 100 * rx]
    if levels:
        ax.contour(d, levels=[p / 100 * rx for p, _ in levels], colors=[c for _, c in levels], linewidths=1.0)
    for s in case.targets.values():
        m = take(s.mask)
        if m.any():
            ax.contour(m.astype(float), levels=[0.5], colors="white", linewidths=0.8, linestyles="--")
    if case.body is not None and take(case.body).any():  # crop to the body with a margin
        rows, cols = np.nonzero(take(case.body))
        pad = 5
        ax.set_xlim(max(cols.min() - pad, 0) - 0.5, min(cols.max() + pad, d.shape[1] - 1) + 0.5)
        ax.set_ylim(min(rows.max() + pad, d.shape[0] - 1) + 0.5, max(rows.min() - pad, 0) - 0.5)
    fig.colorbar(im, ax=ax, fraction=0.046, label="Dose (Gy)")
    ax.set_title(title or f"{case.case_id}: dose, slice {index} (isodoses " +
                 "/".join(f"{p:g}" for p, _ in levels) + f" % of {rx:g} Gy)", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
