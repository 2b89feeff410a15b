"""report.md and a self-contained report.html (figures embedded as base64, no external resources)."""
from __future__ import annotations

import base64
import html
import json
import math
import os
from typing import Dict, List

__all__ = ["write_reports", "part_text"]

BADGE = {"supported": "#1a7f37", "not supported": "#cf222e", "inconclusive": "#9a6700"}


def _fmt(x) -> str:
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.3g}" if (abs(x) < 1e-2 and x != 0) or abs(x) >= 1e4 else f"{x:.2f}"
    return str(x)


def part_text(name: str, p: Dict) -> str:
    """One line per decision: the rule and the numbers it used."""
    if p["rule"] in ("effect", "no_worse"):
        d = p["difference"]
        lim = f"min effect {p['min_effect']}" if p["rule"] == "effect" else f"margin {p['margin']}"
        return (f"{name}: {p['verdict']} — mean difference {_fmt(d['mean'])}, 95% t-CI [{_fmt(d['ci95_t'][0])}, "
                f"{_fmt(d['ci95_t'][1])}], bootstrap CI [{_fmt(d['ci95_bootstrap'][0])}, "
                f"{_fmt(d['ci95_bootstrap'][1])}], n={d['n']} seeds ({lim}); per seed {d['values']}")
    if p["rule"] == "checks":
        checks = ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in p["checks"].items())
        return f"{name}: {p['verdict']} — {checks}"
    extra = {k: v for k, v in p.items() if k not in ("verdict", "rule")}
    return f"{name}: {p['verdict']} — {json.dumps(extra)}"


def _md(results: Dict) -> str:
    out: List[str] = [f"# layernorm lab — run `{results['run']}`", ""]
    cfg = results["config"]
    out += [f"Data: {cfg['data']}; seeds: {cfg['seeds']}; mode: {'quick' if cfg['quick'] else 'full'}; "
            f"torch {results['torch_version']}. Verdicts: " + ", ".join(f"{v} {n}" for v, n in
                                                                          results["verdict_counts"].items()), ""]
    out += ["| claim | verdict | experiment |", "|---|---|---|"]
    for c in results["claims"]:
        out.append(f"| `{c['id']}` | **{c['verdict']}** | {c['experiment']} |")
    out.append("")
    claims = {c["id"]: c for c in results["claims"]}
    for name, e in results["experiments"].items():
        out += [f"## {e['title']}", ""]
        for f in e["figures"]:
            out += [f"![{name}]({f})", ""]
        for cid in e["claim_ids"]:
            c = claims[cid]
            out += [f"### `{cid}` — {c['verdict']}", "", f"> {c['claim']}", "",
                    f"**Criterion.** {c['criterion']}", ""]
            out += [f"- {part_text(k, p)}" for k, p in c["parts"].items()]
            if c.get("note"):
                out += ["", f"*Note.* {c['note']}"]
            out.append("")
        if name == "choose" and results["choose"]:
            out += ["| situation | recommended | LN vs BN | measured |", "|---|---|---|---|"]
            out += [f"| {r['situation']} | **{r['recommended']}** | {r.get('ln_vs_bn', '-')} | {r['measured']} |"
                    for r in results["choose"]]
            out.append("")
        out += [f"Per-seed metrics: `{e['metrics_csv']}`", ""]
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1f2328;line-height:1.5;background:#fff}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3em}h2{margin-top:2em;border-bottom:1px solid #d0d7de}
.badge{display:inline-block;padding:.1em .6em;border-radius:1em;color:#fff;font-size:.85em;font-weight:600}
.claim{border:1px solid #d0d7de;border-radius:8px;padding:.8em 1em;margin:1em 0;background:#f6f8fa}
blockquote{margin:.5em 0;padding:.2em 1em;border-left:4px solid #8c959f;color:#57606a;font-style:italic}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #d0d7de;padding:.3em .7em;text-align:left}
th{background:#f6f8fa}img{max-width:100%;border:1px solid #eaeef2;border-radius:6px}
code{background:#eff1f3;padding:.1em .3em;border-radius:4px}ul.parts li{font-size:.92em}
details pre{white-space:pre-wrap;font-size:.8em;background:#fff;border:1px solid #eaeef2;padding:.5em}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-ok', String(ok));
  document.body.setAttribute('data-all-images-loaded', ok === imgs.length ? 'true' : 'false');
});
"""


def _badge(v: str) -> str:
    return f'<span class="badge" style="background:{BADGE[v]}">{html.escape(v)}</span>'


def _html(results: Dict, run_dir: str) -> str:
    e = html.escape
    claims = {c["id"]: c for c in results["claims"]}
    cfg = results["config"]
    h: List[str] = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
                    f"<title>layernorm lab — {e(results['run'])}</title><style>{CSS}</style>",
                    f"<script>{SCRIPT}</script></head><body>",
                    f"<h1>layernorm lab — run <code>{e(results['run'])}</code></h1>",
                    f"<p>Claims of <em>{e(results['claims'][0]['source'] if results['claims'] else '')}</em> tested "
                    f"by experiment. Data: {e(str(cfg['data']))}; seeds {e(str(cfg['seeds']))}; "
                    f"{'quick' if cfg['quick'] else 'full'} mode; torch {e(results['torch_version'])}. Every "
                    f"criterion was fixed in code before the run; intervals are 95% Student-t over seeds.</p>",
                    "<table><tr><th>claim</th><th>verdict</th><th>experiment</th></tr>"]
    for c in results["claims"]:
        h.append(f"<tr><td><a href='#{e(c['id'])}'><code>{e(c['id'])}</code></a></td><td>{_badge(c['verdict'])}</td>"
                 f"<td>{e(c['experiment'])}</td></tr>")
    h.append("</table>")
    for name, ex in results["experiments"].items():
        h.append(f"<h2 id='exp-{e(name)}'>{e(ex['title'])}</h2>")
        for f in ex["figures"]:
            with open(os.path.join(run_dir, f), "rb") as fh:
                b64 = base64.b64encode(fh.read()).decode("ascii")
            h.append(f"<p><img alt='{e(name)} figure' src='data:image/png;base64,{b64}'></p>")
        for cid in ex["claim_ids"]:
            c = claims[cid]
            h.append(f"<div class='claim' id='{e(cid)}' data-claim-id='{e(cid)}'><h3><code>{e(cid)}</code> "
                     f"{_badge(c['verdict'])}</h3><blockquote>“{e(c['claim'])}”</blockquote>"
                     f"<p><strong>Criterion.</strong> {e(c['criterion'])}</p><ul class='parts'>")
            h += [f"<li>{e(part_text(k, p))}</li>" for k, p in c["parts"].items()]
            h.append("</ul>")
            if c.get("note"):
                h.append(f"<p><em>Note.</em> {e(c['note'])}</p>")
            h.append(f"<details><summary>evidence (JSON)</summary><pre>{e(json.dumps(c['evidence'], indent=1))}"
                     "</pre></details></div>")
        if name == "choose" and results["choose"]:
            h.append("<table><tr><th>situation</th><th>recommended</th><th>LN vs BN (paired, 95%)</th>"
                     "<th>measured</th></tr>")
            h += [f"<tr><td>{e(r['situation'])}</td><td><strong>{e(r['recommended'])}</strong></td>"
                  f"<td>{e(r.get('ln_vs_bn', '-'))}</td><td>{e(r['measured'])}</td></tr>" for r in results["choose"]]
            h.append("</table>")
        h.append(f"<p>Per-seed metrics: <code>{e(ex['metrics_csv'])}</code></p>")
    h.append("</body></html>")
    return "\n".join(h)


def write_reports(run_dir: str, results: Dict) -> None:
    from .runner import atomic_write

    atomic_write(os.path.join(run_dir, "report.md"), _md(results))
    atomic_write(os.path.join(run_dir, "report.html"), _html(results, run_dir))
