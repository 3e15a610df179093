"""The tune report: one self-contained HTML page with the latency/quality plot and the candidates table."""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import jinja2

PAGE = jinja2.Template("""<!doctype html><html><head><meta charset="utf-8"><title>sdcn_trt tune</title><style>
body{font-family:sans-serif;margin:24px;color:#222} table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right} th{background:#f2f2f2}
td.l{text-align:left} tr.front td{background:#eef7ee} tr.best td{background:#cfe9cf;font-weight:bold}
.warn{background:#fff3cd;padding:8px;border:1px solid #e0c36a}</style></head><body>
<h1>sdcn_trt tune</h1>
<p>backend <b>{{ backend.backend }}</b> ({{ backend.precision }}, {{ backend.device }}, CUDA graph {{ backend.cuda_graph }}),
{{ generation.ddim_steps }} DDIM steps, guidance {{ generation.scale }}; quality against the full-schedule torch fp32 reference.</p>
{% if quality == "ssim" %}<p class="warn">No FID Inception weights: quality is SSIM/PSNR/|diff|, not PD, and the best schedule is the
fastest with mean SSIM &ge; {{ bound.ssim }} (give --fid-weights to choose by the contest score).</p>
{% else %}<p>PD with FID weights {{ fid_weights }}; best = highest contest score; greedy bound: mean PD &le; {{ bound.pd }}.</p>{% endif %}
<p>Best: <b>{{ best.schedule }}</b> with sampler <b>{{ best.sampler }}</b> — {{ "%.1f"|format(best.latency_ms.mean) }} ms/image, {{ quality }} {{ "%.3f"|format(best[quality]) }}.
Use it with <code>--schedule-file best_schedule.json</code>.</p>
<img src="{{ plot }}" alt="latency against quality">
<h2>Candidates ({{ candidates|length }}; frontier shaded)</h2>
<table><tr><th>sampler</th><th>schedule</th><th>mean ms</th><th>p90 ms</th>{% if quality == "pd" %}<th>PD</th><th>score</th>{% endif %}
<th>SSIM</th><th>PSNR</th><th>mean |diff|</th><th>max |diff|</th><th>ControlNet</th><th>UNet</th><th>shallow</th></tr>
{% for r in candidates %}<tr class="{{ 'best' if r.key == best.key else ('front' if r.key in frontier_keys else '') }}">
<td class="l">{{ r.sampler }}</td><td class="l">{{ r.schedule }}</td><td>{{ "%.1f"|format(r.latency_ms.mean) }}</td><td>{{ "%.1f"|format(r.latency_ms.p90) }}</td>
{% if quality == "pd" %}<td>{{ "%.3f"|format(r.pd) }}</td><td>{{ "%.0f"|format(r.objective) }}</td>{% endif %}
<td>{{ "%.4f"|format(r.ssim) }}</td><td>{{ fmt(r.psnr) }}</td><td>{{ "%.3f"|format(r.mean_abs_diff) }}</td><td>{{ r.max_abs_diff }}</td>
<td>{{ r.evaluations.controlnet }}</td><td>{{ r.evaluations.unet }}</td><td>{{ r.evaluations.shallow }}</td></tr>
{% endfor %}</table></body></html>""", autoescape=True)


def _plot(summary: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = summary["quality"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    records = summary["candidates"]
    ax.scatter([r["latency_ms"]["mean"] for r in records], [r[q] for r in records], s=18, color="#999",
               label="candidates")
    front = summary["frontier"]
    ax.plot([r["latency_ms"]["mean"] for r in front], [r[q] for r in front], "o-", color="#2a7", label="frontier")
    best = summary["best"]
    ax.scatter([best["latency_ms"]["mean"]], [best[q]], s=80, marker="*", color="#c30", label="best", zorder=3)
    for r in front:
        ax.annotate(f"{r['sampler']} {r['schedule']}"[:28], (r["latency_ms"]["mean"], r[q]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel("mean latency per image (ms)")
    ax.set_ylabel("mean PD (lower is better)" if q == "pd" else "mean SSIM (higher is better)")
    ax.set_title("latency against quality, per schedule")
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_tune_report(out: Path, summary: dict[str, Any]) -> Path:
    page = out / "report.html"
    page.write_text(PAGE.render(**summary, plot=_plot(summary), frontier_keys={r["key"] for r in summary["frontier"]},
                                fmt=lambda v: "inf" if math.isinf(v) else f"{v:.1f}"))
    return page
