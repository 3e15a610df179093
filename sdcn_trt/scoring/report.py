"""The score report: rows (JSON, CSV), summary, and one self-contained HTML page with pictures."""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import cv2
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
    if isinstance(value, float):
        return "inf" if np.isinf(value) else f"{value:.3f}"
    return html.escape(str(value))


def render_html(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>sdcn_trt score</title><style>",
             "body{font-family:sans-serif;margin:24px;color:#222} table{border-collapse:collapse;margin:8px 0}",
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right} th{background:#f2f2f2}",
             "td.l{text-align:left} img{display:block} .warn{background:#fff3cd;padding:8px;border:1px solid #e0c36a}",
             ".fail{color:#b00020}</style></head><body>", "<h1>sdcn_trt score report</h1>"]
    backend = summary["backend"]
    parts.append(f"<p>backend <b>{e(backend['backend'])}</b> ({e(backend['precision'])}, {e(backend['device'])}, "
                 f"CUDA graph {e(backend['cuda_graph'])}) against the torch fp32 reference; FID weights: "
                 f"{e(summary['fid_weights'])}</p>")
    if summary["fid_weights"].startswith("random"):
        parts.append("<p class='warn'>Random Inception weights: PD values test the plumbing and are not "
                     "comparable to the contest's (pass --fid-weights for real ones).</p>")
    parts.append("<h2>Summary</h2><table><tr><th>schedule</th><th>images</th><th>errors</th><th>mean ms</th>"
                 "<th>p50 ms</th><th>p90 ms</th><th>max ms</th><th>mean PD</th><th>max PD</th><th>PD &gt; 12</th>"
                 "<th>mean SSIM</th><th>contest score</th></tr>")
    for schedule, s in summary["schedules"].items():
        lat = s["latency_ms"]
        parts.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in (
            schedule, s["images"], s["errors"], lat.get("mean", "-"), lat.get("p50", "-"), lat.get("p90", "-"),
            lat.get("max", "-"), s["mean_pd"], s["max_pd"], s["pd_failures"], s["mean_ssim"], s["score"])) + "</tr>")
    parts.append("</table>")
    for label, uri in _plots(rows, summary):
        parts.append(f"<h3>{e(label)}</h3><img src='{uri}' alt='{e(label)}'>")
    failures = [r for r in rows if "error" in r]
    if failures:
        parts.append("<h2 class='fail'>Not scored</h2><table><tr><th>image</th><th>schedule</th><th>error</th></tr>")
        parts += [f"<tr><td class='l'>{e(r['image'])}</td><td class='l'>{e(r['schedule'])}</td>"
                  f"<td class='l'>{e(r['error'])}</td></tr>" for r in failures]
        parts.append("</table>")
    parts.append("<h2>Images</h2><table><tr><th>image</th><th>input</th><th>canny</th><th>reference</th>"
                 "<th>accelerated</th><th>|diff| x10</th><th>numbers</th></tr>")
    for r in rows:
        if "error" in r:
            continue
        source = cv2.imread(r["input_path"], cv2.IMREAD_COLOR)
        ref = cv2.imread(str(out / r["reference_path"]), cv2.IMREAD_COLOR)
        acc = cv2.imread(str(out / r["path"]), cv2.IMREAD_COLOR)
        diff = np.clip(np.abs(ref.astype(np.int16) - acc) * 10, 0, 255).astype(np.uint8)
        numbers = (f"{e(r['schedule'])}<br>{r['latency_ms']:.1f} ms<br>PD {r['pd']:.3f}"
                   f"<br>SSIM {r['ssim']:.4f}<br>max |diff| {r['max_abs_diff']}")
        cls = "" if r["passed"] else " class='fail'"
        parts.append(f"<tr><td class='l'>{e(r['image'])}</td>" + "".join(
            f"<td><img src='{_png_uri(im)}'></td>" for im in (source, r["canny"], ref, acc, diff))
            + f"<td class='l'{cls}>{numbers}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


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
    return "\n".join(lines)
