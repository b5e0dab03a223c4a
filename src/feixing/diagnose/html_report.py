"""`feixing doctor --html OUT`: one self-contained HTML page with inline SVG plots (no scripts, no network)."""

from __future__ import annotations

import html as _html

import numpy as np

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]
PHASE_ORDER = ["data", "forward", "backward", "comm", "optimizer", "checkpoint", "gc"]


def _downsample(x: np.ndarray, y: np.ndarray, n: int = 600):
    """Block medians so a plot has at most n points (a million steps stay a small page)."""
    if x.size <= n:
        return x, y
    b = int(np.ceil(x.size / n))
    m = x.size // b
    with np.errstate(all="ignore"):
        return x[: m * b].reshape(m, b)[:, -1], np.nanmedian(y[..., : m * b].reshape(*y.shape[:-1], m, b), -1)


def line_plot(title: str, x: np.ndarray, ys: dict[str, np.ndarray], unit: str = "ms", scale: float = 1e3,
              marks: list[tuple[int, str]] = (), w: int = 760, h: int = 220) -> str:
    """An SVG line chart; ys maps a legend label to a series aligned with x."""
    pad_l, pad_r, pad_t, pad_b = 60, 130, 24, 28
    if x.size == 0 or not ys:
        return f"<p><b>{_html.escape(title)}</b>: no data</p>"
    series = {k: _downsample(x, np.asarray(v, float) * scale) for k, v in ys.items()}
    allv = np.concatenate([v for _, v in series.values()])
    allv = allv[np.isfinite(allv)]
    if allv.size == 0:
        return f"<p><b>{_html.escape(title)}</b>: no data</p>"
    lo, hi = 0.0, float(np.percentile(allv, 99.5)) * 1.1 or 1.0
    x0, x1 = float(x[0]), float(x[-1]) if x[-1] > x[0] else float(x[0]) + 1

    def px(v):
        return pad_l + (v - x0) / (x1 - x0) * (w - pad_l - pad_r)

    def py(v):
        return pad_t + (1 - (min(v, hi) - lo) / (hi - lo)) * (h - pad_t - pad_b)

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11"><text x="{pad_l}" y="14" font-weight="bold">{_html.escape(title)}</text>'),
           (f'<rect x="{pad_l}" y="{pad_t}" width="{w - pad_l - pad_r}" height="{h - pad_t - pad_b}" '
           f'fill="none" stroke="#ccc"/>')]
    for frac in (0, 0.5, 1):
        v = lo + frac * (hi - lo)
        out.append(f'<text x="{pad_l - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.3g} {unit}</text>')
    out.append(f'<text x="{pad_l}" y="{h - 8}">step {int(x0)}</text>'
               f'<text x="{w - pad_r}" y="{h - 8}" text-anchor="end">step {int(x1)}</text>')
    for step, label in marks:
        if x0 <= step <= x1:
            out.append(f'<line x1="{px(step):.1f}" x2="{px(step):.1f}" y1="{pad_t}" y2="{h - pad_b}" '
                       f'stroke="#999" stroke-dasharray="4,3"><title>{_html.escape(label)}</title></line>')
    for i, (label, (sx, sy)) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(sx, sy) if np.isfinite(b))
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.2" points="{pts}"/>')
        out.append(f'<text x="{w - pad_r + 8}" y="{pad_t + 12 + 13 * i}" fill="{c}">{_html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def phase_bars(sig: dict, w: int = 760) -> str:
    """Stacked bar per rank of median time per phase."""
    phases = [p for p in PHASE_ORDER if p in sig] + sorted(set(sig) - set(PHASE_ORDER) - {"step", "compute"})
    n = sig["step"].shape[0]
    med = {p: np.nan_to_num(np.nanmedian(sig[p], axis=1)) for p in phases}
    total = max(float(sum(med[p][r] for p in phases)) for r in range(n)) or 1.0
    bh, pad_l, pad_r = 16, 60, 130
    h = 30 + n * (bh + 4)
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11"><text x="{pad_l}" y="14" font-weight="bold">Median phase time per rank '
           f'(full bar = {total * 1e3:.2f} ms)</text>')]
    for r in range(n):
        x, y = pad_l, 24 + r * (bh + 4)
        out.append(f'<text x="{pad_l - 4}" y="{y + 12}" text-anchor="end">rank {r}</text>')
        for i, p in enumerate(phases):
            wd = med[p][r] / total * (w - pad_l - pad_r)
            if wd > 0:
                out.append(f'<rect x="{x:.1f}" y="{y}" width="{wd:.1f}" height="{bh}" fill="{COLORS[i % 10]}">'
                           f'<title>{p}: {med[p][r] * 1e3:.3f} ms</title></rect>')
            x += wd
    for i, p in enumerate(phases):
        out.append(f'<text x="{w - pad_r + 8}" y="{24 + 13 * i}" fill="{COLORS[i % 10]}">{p}</text>')
    out.append("</svg>")
    return "".join(out)


def render_html(findings: list, data) -> str:
    """The whole page: verdict, evidence, step time per rank, phase breakdown, phases and canaries over time."""
    marks = [(f.first_step, f.summary) for f in findings]
    parts = [("<!DOCTYPE html><html><head><meta charset='utf-8'><title>feixing doctor</title>"
             "<style>body{font-family:sans-serif;max-width:900px;margin:1em auto}li{margin:.3em 0}"
             "small{color:#555}</style></head><body><h1>feixing doctor</h1><h2>Verdict</h2>")]
    if findings:
        parts.append("<ol>" + "".join(
            f"<li><b>{_html.escape(f.summary)}</b><br><small>{f.kind} · layer {f.layer} · ranks "
            f"{f.ranks or 'all'} · from step {f.first_step} · detected at step {f.detected_step}</small>"
            f"<ul>{''.join(f'<li><small>{_html.escape(e)}</small></li>' for e in f.evidence)}</ul></li>"
            for f in findings) + "</ol>")
    else:
        parts.append("<p>No straggler, drift, event spike or hang found.</p>")
    if data.steps.size:
        x = data.steps
        parts.append("<h2>Step time per rank</h2>")
        parts.append(line_plot("step time", x, {f"rank {r}": data.sig["step"][r] for r in range(data.world_size)},
                               marks=marks))
        parts.append("<h2>Phase breakdown</h2>" + phase_bars(data.sig))
        for p in ("compute", "data", "comm", "gc", "checkpoint"):
            if p in data.sig and np.nansum(data.sig[p]) > 0:
                parts.append(line_plot(f"{p} per rank", x, {f"rank {r}": data.sig[p][r]
                                                            for r in range(data.world_size)}, marks=marks))
    if data.can_steps.size:
        parts.append("<h2>Canaries</h2>")
        for k, unit, scale in (("dispatch_s", "ms", 1e3), ("reference_s", "ms", 1e3), ("link_lat_s", "ms", 1e3),
                               ("link_bw_gbs", "GB/s", 1), ("rss_mb", "MB", 1)):
            if k in data.can:
                ys = {f"rank {r}": data.can[k][r] for r in range(data.world_size)}
                parts.append(line_plot(k, data.can_steps, ys, unit=unit, scale=scale, marks=marks))
        for k in sorted(data.can):
            if k.startswith("ar_") and k.endswith("_lat_s"):
                parts.append(line_plot(k, data.can_steps, {f"rank {r}": data.can[k][r]
                                                           for r in range(data.world_size)}, marks=marks))
    parts.append("</body></html>")
    return "\n".join(parts)
