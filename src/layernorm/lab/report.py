"""report.md and a self-contained report.html (figures embedded as base64, no external resources).

What a learner reads first is the top table: each claim in plain words, where it was tested, its
verdict, and the one number that decided it. The text uses one interval method, the 95% Student-t
interval over seeds; the bootstrap interval is in the details, with a sentence wherever the same rule
on it would have given another verdict. A run with fewer than 5 seeds (``--quick``) is a *preview*:
its verdicts are labelled as such everywhere.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from typing import Dict, List, Optional, Tuple

from .files import atomic_write

__all__ = ["write_reports", "part_text", "deciding_number", "verdict_label"]

BADGE = {"supported": "#1a7f37", "not supported": "#cf222e", "inconclusive": "#9a6700"}


def _fmt(x, signed: bool = False) -> str:
    if x is None:
        return "undefined"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if (abs(x) < 1e-2 and x != 0) or abs(x) >= 1e4:
            return f"{x:+.2g}" if signed else f"{x:.2g}"
        return f"{x:+.2f}" if signed else f"{x:.2f}"
    return str(x)


def verdict_label(verdict: str, preview: bool) -> str:
    return f"preview: {verdict}" if preview else verdict


def _interval(d: Dict, key: str = "ci95_t") -> str:
    lo, hi = d[key]
    return f"[{_fmt(lo, True)}, {_fmt(hi, True)}]"


def _effect_text(p: Dict) -> str:
    d = p["difference"]
    unit = f" {p['unit']}" if p.get("unit") else ""
    lim = (f"needs >= {_fmt(p['min_effect'])}{unit} with the interval above 0" if p["rule"] == "effect" else
           f"needs the interval above -{_fmt(p['margin'])}{unit}")
    label = f"{p['label']}: " if p.get("label") else ""
    return f"{label}{_fmt(d['mean'], True)}{unit}, 95% t-interval {_interval(d)}, n = {d['n']} seeds ({lim})"


def _pick_measure(p: Dict) -> Tuple[str, Dict]:
    """The measure of an "either" decision that explains its verdict."""
    ms = p["measures"]
    if p["verdict"] == "supported":
        return next((k, m) for k, m in ms.items() if m["verdict"] == "supported")
    if p["verdict"] == "not supported":
        return next(iter(ms.items()))
    rev = [k for k, r in p["reversed"].items() if r]
    if rev:
        return rev[0], ms[rev[0]]
    return next(((k, m) for k, m in ms.items() if m["verdict"] == "inconclusive"), next(iter(ms.items())))


def part_text(name: str, p: Dict) -> str:
    """One line per decision: its verdict, the rule and the numbers (t-interval only)."""
    if p["rule"] in ("effect", "no_worse"):
        return f"{name}: {p['verdict']} — {_effect_text(p)}"
    if p["rule"] == "either":
        inner = "; ".join(f"{k} ({m['verdict']}{', reversed' if p['reversed'][k] else ''}): {_effect_text(m)}"
                          for k, m in p["measures"].items())
        reach = p.get("seeds_reaching_target")
        extra = f"; seeds reaching the target: {reach}" if reach else ""
        return f"{name}: {p['verdict']} — {inner}{extra}"
    if p["rule"] == "checks":
        checks = ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in p["checks"].items())
        return f"{name}: {p['verdict']} — {checks}"
    extra = {k: v for k, v in p.items() if k not in ("verdict", "rule", "label")}
    return f"{name}: {p['verdict']} — {p.get('label', '')} {json.dumps(extra)}".strip()


def _bootstrap_lines(name: str, p: Dict) -> List[str]:
    """The bootstrap interval of every difference, and a sentence where its verdict differs from the t one."""
    out = []
    items = list(p["measures"].items()) if p["rule"] == "either" else [(name, p)] if "difference" in p else []
    for k, m in items:
        d = m["difference"]
        out.append(f"{k}: mean {_fmt(d['mean'], True)}, 95% bootstrap interval {_interval(d, 'ci95_bootstrap')} "
                   f"(t-interval {_interval(d)}); per seed {d['values']}")
        if m is not p and m.get("verdict_bootstrap", m["verdict"]) != m["verdict"]:
            out.append(f"On the {k} measure the two intervals disagree: the bootstrap interval gives "
                       f"'{m['verdict_bootstrap']}' instead of '{m['verdict']}' (the t-interval decides).")
    vb = p.get("verdict_bootstrap")
    if vb is not None and vb != p["verdict"]:
        out.append(f"The two intervals disagree here: the same rule on the bootstrap interval gives '{vb}' instead of "
                   f"'{p['verdict']}'. The verdict uses the t-interval: with this few seeds the percentile bootstrap "
                   f"is too narrow.")
    return out


def _compact(p: Dict) -> str:
    d = p["difference"]
    unit = f" {p['unit']}" if p.get("unit") else ""
    label = f"{p['label']}: " if p.get("label") else ""
    return f"{label}{_fmt(d['mean'], True)}{unit} {_interval(d)}"


def deciding_number(c: Dict) -> str:
    """The one number that decided a claim's verdict, with its 95% t-interval, in a few words."""
    parts = list(c["parts"].items())
    pick: Optional[Tuple[str, Dict]] = None
    if c["verdict"] == "supported":
        pick = next(((k, p) for k, p in parts if p["rule"] in ("effect", "no_worse", "either")), parts[0])
    else:
        pick = next(((k, p) for k, p in parts if p["verdict"] == c["verdict"]), parts[0])
    name, p = pick
    if p["rule"] in ("effect", "no_worse"):
        return _compact(p)
    if p["rule"] == "either":
        k, m = _pick_measure(p)
        return _compact(m) + (" (reversed)" if p["reversed"].get(k) else "")
    if p["rule"] == "checks":
        failed = [k for k, v in p["checks"].items() if not v]
        return "; ".join(failed) + " — fails" if failed else "; ".join(p["checks"])
    return p.get("label", name)


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a literal '|' would end the cell."""
    return str(text).replace("|", "\\|")


def _md(results: Dict) -> str:
    preview = results.get("preview", False)
    cfg = results["config"]
    out: List[str] = [f"# layernorm lab — run `{results['run']}`", ""]
    if preview:
        out += [f"> **Preview.** {len(cfg['seeds'])} seeds and short budgets (`--quick`): the labels below are a "
                f"preview of the verdicts, not verdicts. The criteria were fixed for {cfg['min_seeds_for_verdicts']} "
                "or more seeds and the full budgets; run `layernorm lab` for the verdicts.", ""]
    out += [f"Claims of {results['source']} tested by experiment. Seeds {cfg['seeds']}; images: "
            f"{cfg['data']['images']['name']}" + (f"; text: {cfg['data']['text']['name']}" if "text" in cfg["data"]
                                                  else "") +
            f"; torch {results['torch_version']}. Every criterion was fixed in code before the run. Intervals are "
            "95% Student-t intervals over seeds (bootstrap intervals are in each claim's details).", ""]
    out += ["| claim | tested on | verdict | the number that decided it (95% t-interval) |", "|---|---|---|---|"]
    for c in results["claims"]:
        out.append(f"| {_cell(c['short'])} (`{c['id']}`) | {_cell(c['scope'])} | "
                   f"**{verdict_label(c['verdict'], preview)}** | {_cell(deciding_number(c))} |")
    out.append("")
    claims = {c["id"]: c for c in results["claims"]}
    for name, e in results["experiments"].items():
        out += [f"## {e['title']}", ""]
        for f in e["figures"]:
            out += [f"![{name}]({f})", ""]
        for cid in e["claim_ids"]:
            c = claims[cid]
            out += [f"### {c['short']} — {verdict_label(c['verdict'], preview)} (`{cid}`)", "",
                    f"> “{c['claim']}”", "", f"*Tested on:* {c['scope']}.", "", f"**Criterion.** {c['criterion']}", ""]
            out += [f"- {part_text(k, p)}" for k, p in c["parts"].items()]
            if c.get("note"):
                out += ["", f"*Note.* {c['note']}"]
            boot = [line for k, p in c["parts"].items() for line in _bootstrap_lines(k, p)]
            if boot:
                out += ["", "<details><summary>bootstrap intervals</summary>", ""] + [f"- {b}" for b in boot] + [
                    "", "</details>"]
            out.append("")
        if name == "choose" and results["choose"]:
            out += ["A norm is recommended only where it is significantly better than every other option measured "
                    "(paired per seed, 95% t-interval); options tied with the best are named together (\"A or B "
                    "(tied)\"), and \"no measurable difference\" means all of them are tied.", "",
                    "| situation | recommended | tied with the best | LN vs BN | measured (mean) |",
                    "|---|---|---|---|---|"]
            out += [f"| {_cell(r['situation'])} | **{r['recommended']}** | "
                    f"{', '.join(r.get('tied_with_best', [])) or '-'} | {r.get('ln_vs_bn', '-')} | "
                    f"{_cell(r['measured'])} |" for r in results["choose"]]
            out.append("")
        out += [f"Per-seed metrics: [{e['metrics_csv']}]({e['metrics_csv']})", ""]
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
color:#1f2328;line-height:1.5;background:#fff}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3em}h2{margin-top:2em;border-bottom:1px solid #d0d7de}
.badge{display:inline-block;padding:.1em .6em;border-radius:1em;color:#fff;font-size:.85em;font-weight:600}
.preview{opacity:.75;border:2px dashed #fff;font-style:italic}
.banner{border:2px solid #9a6700;background:#fff8c5;border-radius:8px;padding:.6em 1em}
.claim{border:1px solid #d0d7de;border-radius:8px;padding:.8em 1em;margin:1em 0;background:#f6f8fa}
blockquote{margin:.5em 0;padding:.2em 1em;border-left:4px solid #8c959f;color:#57606a;font-style:italic}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #d0d7de;padding:.3em .7em;text-align:left;
vertical-align:top}th{background:#f6f8fa}img{max-width:100%;border:1px solid #eaeef2;border-radius:6px}
code{background:#eff1f3;padding:.1em .3em;border-radius:4px}ul.parts li{font-size:.92em}
details pre{white-space:pre-wrap;font-size:.8em;background:#fff;border:1px solid #eaeef2;padding:.5em}
td.num{font-size:.9em}
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


def _badge(v: str, preview: bool) -> str:
    cls = "badge preview" if preview else "badge"
    return f'<span class="{cls}" style="background:{BADGE[v]}">{html.escape(verdict_label(v, preview))}</span>'


def _html(results: Dict, run_dir: str) -> str:
    e = html.escape
    preview = results.get("preview", False)
    claims = {c["id"]: c for c in results["claims"]}
    cfg = results["config"]
    h: List[str] = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
                    f"<title>layernorm lab — {e(results['run'])}</title><style>{CSS}</style>",
                    f"<script>{SCRIPT}</script></head><body>",
                    f"<h1>layernorm lab — run <code>{e(results['run'])}</code></h1>"]
    if preview:
        h.append(f"<p class='banner'><strong>Preview.</strong> {len(cfg['seeds'])} seeds and short budgets "
                 f"(<code>--quick</code>): the labels below are a preview of the verdicts, not verdicts. The criteria "
                 f"were fixed for {cfg['min_seeds_for_verdicts']} or more seeds and the full budgets; run "
                 "<code>layernorm lab</code> for the verdicts.</p>")
    text = f"; text: {e(cfg['data']['text']['name'])}" if "text" in cfg["data"] else ""
    h += [f"<p>Claims of <em>{e(results['source'])}</em> tested by experiment. Seeds {e(str(cfg['seeds']))}; images: "
          f"{e(cfg['data']['images']['name'])}{text}; torch {e(results['torch_version'])}. Every criterion was fixed "
          "in code before the run. Intervals are 95% Student-t intervals over seeds (bootstrap intervals are in each "
          "claim's details).</p>",
          "<table><tr><th>claim</th><th>tested on</th><th>verdict</th><th>the number that decided it (95% "
          "t-interval)</th></tr>"]
    for c in results["claims"]:
        h.append(f"<tr><td><a href='#{e(c['id'])}'>{e(c['short'])}</a></td><td>{e(c['scope'])}</td>"
                 f"<td>{_badge(c['verdict'], preview)}</td><td class='num'>{e(deciding_number(c))}</td></tr>")
    h.append("</table>")
    for name, ex in results["experiments"].items():
        h.append(f"<h2 id='exp-{e(name)}'>{e(ex['title'])}</h2>")
        for f in ex["figures"]:
            with open(os.path.join(run_dir, f), "rb") as fh:
                b64 = base64.b64encode(fh.read()).decode("ascii")
            h.append(f"<p><img alt='{e(name)} figure' src='data:image/png;base64,{b64}'></p>")
        for cid in ex["claim_ids"]:
            c = claims[cid]
            h.append(f"<div class='claim' id='{e(cid)}' data-claim-id='{e(cid)}'><h3>{e(c['short'])} "
                     f"{_badge(c['verdict'], preview)} <code>{e(cid)}</code></h3>"
                     f"<blockquote>“{e(c['claim'])}”</blockquote><p><em>Tested on:</em> {e(c['scope'])}.</p>"
                     f"<p><strong>Criterion.</strong> {e(c['criterion'])}</p><ul class='parts'>")
            h += [f"<li>{e(part_text(k, p))}</li>" for k, p in c["parts"].items()]
            h.append("</ul>")
            if c.get("note"):
                h.append(f"<p><em>Note.</em> {e(c['note'])}</p>")
            boot = [line for k, p in c["parts"].items() for line in _bootstrap_lines(k, p)]
            if boot:
                h.append("<details><summary>bootstrap intervals</summary><ul>" +
                         "".join(f"<li>{e(b)}</li>" for b in boot) + "</ul></details>")
            h.append(f"<details><summary>evidence (JSON)</summary><pre>{e(json.dumps(c['evidence'], indent=1))}"
                     "</pre></details></div>")
        if name == "choose" and results["choose"]:
            h.append("<p>A norm is recommended only where it is significantly better than every other option measured "
                     "(paired per seed, 95% t-interval); options tied with the best are named together (“A or B "
                     "(tied)”), and “no measurable difference” means all of them are tied.</p>")
            h.append("<table><tr><th>situation</th><th>recommended</th><th>tied with the best</th><th>LN vs BN</th>"
                     "<th>measured (mean)</th></tr>")
            h += [f"<tr><td>{e(r['situation'])}</td><td><strong>{e(r['recommended'])}</strong></td>"
                  f"<td>{e(', '.join(r.get('tied_with_best', [])) or '-')}</td><td>{e(r.get('ln_vs_bn', '-'))}</td>"
                  f"<td>{e(r['measured'])}</td></tr>" for r in results["choose"]]
            h.append("</table>")
        h.append(f"<p>Per-seed metrics: <a href='{e(ex['metrics_csv'])}'><code>{e(ex['metrics_csv'])}</code></a></p>")
    h.append("</body></html>")
    return "\n".join(h)


def write_reports(run_dir: str, results: Dict) -> None:
    atomic_write(os.path.join(run_dir, "report.md"), _md(results))
    atomic_write(os.path.join(run_dir, "report.html"), _html(results, run_dir))
