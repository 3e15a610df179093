"""The score report: rows (JSON, CSV), summary, and one self-contained HTML page (a jinja2 template) with pictures."""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any

import cv2
import jinja2
import numpy as np


THUMB = 160


def _png_uri(image_bgr: np.ndarray) -> str:
    h, w = image_bgr.shape[:2]
    thumb = cv2.resize(image_bgr, (max(1, round(w * THUMB / h)), THUMB), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".png", thumb)
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode()


def _figure_uri(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _plots(rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    if not ok:
        return []
    schedules = list(summary["schedules"])
    images = sorted({r["image"] for r in ok})
    plots = []
    for metric, label in (("latency_ms", "end-to-end latency per image (ms)"), ("pd", "PD per image")):
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(images)), 3.2))
        width = 0.8 / len(schedules)
        for k, schedule in enumerate(schedules):
            values = {r["image"]: r[metric] for r in ok if r["schedule"] == schedule}
            ax.bar(np.arange(len(images)) + k * width, [values.get(i, np.nan) for i in images], width, label=schedule)
        if metric == "pd":
            ax.axhline(12, color="red", linestyle="--", linewidth=1, label="PD limit (12)")
        ax.set_xticks(np.arange(len(images)) + 0.4 - width / 2, images, rotation=20, fontsize=8)
        ax.set_title(label)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
        plots.append((label, _figure_uri(fig)))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for schedule, s in summary["schedules"].items():
        if s["images"]:
            ax.scatter(s["latency_ms"]["mean"], s["mean_pd"], s=40)
            ax.annotate(schedule, (s["latency_ms"]["mean"], s["mean_pd"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
    ax.set_xlabel("mean latency (ms)")
    ax.set_ylabel("mean PD")
    ax.set_title("latency against PD, per schedule")
    plots.append(("latency against PD", _figure_uri(fig)))
    plt.close(fig)
    return plots


def _cell(value: Any) -> str:
    """A summary number as the table shows it: floats to 3 decimals, infinity as inf."""
    if isinstance(value, float):
        return "inf" if np.isinf(value) else f"{value:.3f}"
    return str(value)


_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("sdcn_trt.scoring", "templates"),
                                autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                                lstrip_blocks=True)
_TEMPLATES.filters["cell"] = _cell


def render_html(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """One self-contained page (templates/report.html.j2): summary table, plots, failures, and per
    image thumbnails of the input, canny map, reference, accelerated image and their |diff| x10."""
    images = []
    for r in rows:
        if "error" in r:
            continue
        source = cv2.imread(r["input_path"], cv2.IMREAD_COLOR)
        ref = cv2.imread(str(out / r["reference_path"]), cv2.IMREAD_COLOR)
        acc = cv2.imread(str(out / r["path"]), cv2.IMREAD_COLOR)
        diff = np.clip(np.abs(ref.astype(np.int16) - acc) * 10, 0, 255).astype(np.uint8)
        images.append({**r, "thumbnails": [_png_uri(im) for im in (source, r["canny"], ref, acc, diff)]})
    return _TEMPLATES.get_template("report.html.j2").render(
        backend=summary["backend"], fid_weights=summary["fid_weights"],
        random_fid=summary["fid_weights"].startswith("random"), schedules=summary["schedules"],
        plots=_plots(rows, summary), failures=[r for r in rows if "error" in r], images=images)


def save_table(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """rows.json, rows.csv and summary.json (the canny arrays stay out of them)."""
    plain = [{k: v for k, v in r.items() if k != "canny"} for r in rows]
    (out / "rows.json").write_text(json.dumps(plain, indent=1, default=str))
    columns = ["image", "schedule", "latency_ms", "pd", "passed", "ssim", "psnr", "mean_abs_diff", "max_abs_diff",
               "path", "error"]
    with open(out / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(plain)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def write_report(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    save_table(out, rows, summary)
    page = out / "report.html"
    page.write_text(render_html(out, rows, summary))
    return page


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as plain text for the terminal."""
    lines = [f"{'schedule':>10} {'images':>6} {'errors':>6} {'mean ms':>9} {'p90 ms':>9} {'mean PD':>8} "
             f"{'max PD':>8} {'PD>12':>5} {'score':>9}"]
    for schedule, s in summary["schedules"].items():
        lat = s["latency_ms"]
        lines.append(f"{schedule:>10} {s['images']:>6} {s['errors']:>6} {lat.get('mean', float('nan')):>9.1f} "
                     f"{lat.get('p90', float('nan')):>9.1f} {s['mean_pd']:>8.3f} {s['max_pd']:>8.3f} "
                     f"{s['pd_failures']:>5} {s['score']:>9.1f}")
    for schedule, s in summary["schedules"].items():
        if "throughput" in s:
            t = s["throughput"]
            lines.append(f"throughput {schedule}: {t['images_per_s']:.2f} images/s ({t['ms_per_image']:.1f} ms/image) "
                         f"at batch size {t['batch_size']}, {t['images']} photos")
    return "\n".join(lines)
