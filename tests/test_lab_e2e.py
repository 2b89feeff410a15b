"""`layernorm lab --quick` end to end, and its report.html opened in headless Chromium."""
import json
import os
import re
import shutil
import subprocess

import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")

from layernorm.lab import ORDER, cli  # noqa: E402
from layernorm.lab.schema import validate  # noqa: E402

SCOPES = ("text", "rows", "pixels", "permuted")
CLAIM_IDS = {"ln-per-sample", "ln-neuron-own-calculation", "bn-small-batch", "ln-any-batch-size",
             "ln-train-test-same", "ln-variable-length", "ln-no-extra-communication", "ln-cnn-downside",
             "bn-faster-better", "bn-small-batch-cnn", "ln-improvement-over-bn",
             *(f"ln-better-for-rnns-{s}" for s in SCOPES), *(f"ln-improves-rnns-{s}" for s in SCOPES)}
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
    assert cli.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    return os.path.join(str(out), "quick-2seeds-mnist")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_end_to_end(quick_run):
    with open(os.path.join(quick_run, "results.json")) as f:
        res = json.load(f)
    assert validate(res) == []
    assert list(res["experiments"]) == ORDER
    assert {c["id"] for c in res["claims"]} == CLAIM_IDS
    for e in res["experiments"].values():
        for fig in e["figures"]:
            assert os.path.getsize(os.path.join(quick_run, fig)) > 10_000
        assert os.path.exists(os.path.join(quick_run, e["metrics_csv"]))
    assert res["choose"], "the closing table must have rows"
    v = {c["id"]: c["verdict"] for c in res["claims"]}
    # exact facts hold even in quick mode
    assert v["ln-per-sample"] == "supported" and v["ln-train-test-same"] == "supported"
    assert v["ln-no-extra-communication"] == "supported"
    # a quick run is a preview, and says so everywhere
    assert res["preview"] is True
    md = open(os.path.join(quick_run, "report.md")).read()
    assert md.count("preview: ") >= len(CLAIM_IDS) and "**Preview.**" in md
    html = open(os.path.join(quick_run, "report.html")).read()
    assert "class='banner'" in html and "preview: supported" in html
    # the lecture is cited by its title, never by a path outside the package
    assert "shared/seed" not in md + html and 'What is Layer Normalization?' in md


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_report_html_in_chromium(quick_run, tmp_path):
    html = os.path.join(quick_run, "report.html")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
           "--dump-dom", "file://" + os.path.abspath(html)]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, "no <body> in Chromium's DOM dump"
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    with open(os.path.join(quick_run, "results.json")) as f:
        n_figs = sum(len(e["figures"]) for e in json.load(f)["experiments"].values())
    assert attrs.get("data-images-total") == str(n_figs) and n_figs >= 8
    assert attrs.get("data-all-images-loaded") == "true", attrs  # every <img> decoded, naturalWidth > 0
    for cid in CLAIM_IDS:
        assert f'data-claim-id="{cid}"' in dom, cid
    assert "src=\"http" not in dom and "href=\"http" not in dom  # self-contained
