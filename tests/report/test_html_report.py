"""The HTML report: what it embeds (checked in Python) and how it behaves (checked in headless Chromium)."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from reprod.diff.result import DiffResult, KeyResult
from reprod.report.html import render_html, write_html

try:
    from browser import Browser, BrowserError, find_chromium
except ImportError:  # collected as the tests package
    from tests.report.browser import Browser, BrowserError, find_chromium

THRESHOLD = 1e-6


# --- results built by hand ------------------------------------------------------------------------


def _layer_names(n: int) -> list[str]:
    roles = ("conv", "bn", "act", "conv_pw", "bn_pw")
    return [f"backbone.blocks.{i // len(roles)}.{roles[i % len(roles)]}" for i in range(n)]


def make_result(n: int = 60, *, first_fail: int | None = 23, seed: int = 0) -> DiffResult:
    """A forward-pass comparison whose error grows along the network and crosses the threshold at
    ``first_fail`` (None: every key passes), plus the odd statuses a real run meets."""
    rng = np.random.default_rng(seed)
    results = []
    for i, name in enumerate(_layer_names(n)):
        if first_fail is None:
            mean = float(THRESHOLD * 10 ** rng.uniform(-4, -1))
        else:
            mean = float(THRESHOLD * 10 ** ((i - first_fail) * 7.0 / n + rng.uniform(0.02, 0.3)))
            if i < first_fail:
                mean = min(mean, THRESHOLD * 0.9)
        ok = mean <= THRESHOLD
        size = 8 * 32 * 14 * 14
        results.append(
            KeyResult(
                key=name,
                passed=ok,
                status="passed" if ok else "failed",
                reason=f"mean_abs {mean:.3e} {'<=' if ok else '>'} threshold {THRESHOLD:g}",
                path=tuple(name.split("/")),
                ref_shape=(8, 32, 14, 14),
                other_shape=(8, 32, 14, 14),
                ref_dtype="float32",
                other_dtype="float32",
                size=size,
                mean_abs=mean,
                max_abs=mean * 7.5,
                min_abs=0.0,
                mean_rel=mean * 3,
                max_rel=mean * 40,
                cosine=1 - mean,
                worst_index=(int(i % 8), 3, 5, 7),
                worst_ref=0.25 + i,
                worst_other=0.25 + i + mean * 7.5,
                mismatched=0 if ok else i,
                methods=("mean",),
                thresholds={"mean": THRESHOLD},
                checks={"mean": ok},
            )
        )
    if first_fail is not None:
        results.append(
            KeyResult(
                key="head.logits",
                passed=False,
                status="nan",
                reason="3 NaN in other, none in ref",
                ref_shape=(8, 1000),
                other_shape=(8, 1000),
                ref_dtype="float32",
                other_dtype="float32",
                size=8000,
                mean_abs=float("nan"),
                max_abs=float("nan"),
                other_nan=3,
                ref_inf=1,
                other_inf=1,
                methods=("mean",),
                thresholds={"mean": THRESHOLD},
                checks={"mean": False},
            )
        )
        results.append(
            KeyResult(
                key="aux.only_in_torch",
                passed=False,
                status="missing",
                reason="in ref only",
                ref_shape=(4,),
                ref_dtype="float32",
                size=4,
            )
        )
    return DiffResult(
        results=tuple(results),
        ref_name="result/forward_torch.npy",
        other_name="result/forward_paddle.npy",
        options={"method": "mean", "threshold": THRESHOLD, "equal_nan": False},
        created="2025-06-01T12:00:00+00:00",
    )


def failed_first(result: DiffResult, keys: list[str] | None = None) -> list[str]:
    """The order the key table opens in: failing keys first, each group in call order."""
    keys = result.keys() if keys is None else keys
    bad = {r.key for r in result.results if not r.passed}
    return [k for k in keys if k in bad] + [k for k in keys if k not in bad]


def embedded(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="reprod-data">(.*?)</script>', page, re.S)
    assert m, "no data blob"
    return json.loads(m.group(1))


def same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# --- the document (no browser) --------------------------------------------------------------------


def test_blob_holds_every_statistic_of_every_key():
    result = make_result()
    data = embedded(render_html(result))
    cols = data["keys"]
    reference = result.to_dict()["keys"]  # the JSON form DiffResult itself defines
    assert cols["key"] == result.keys()
    for field in reference[0]:
        if field == "path":  # stored only where it is more than the key itself
            expect = [None if k["path"] in ([], [k["key"]]) else k["path"] for k in reference]
            assert cols.get("path", [None] * len(reference)) == expect
            continue
        if field not in cols:  # left out only when empty for every key
            assert all(k[field] in (None, {}, [], "") for k in reference), field
            continue
        assert [k[field] for k in reference] == cols[field], field
    assert data["summary"] == result.summary()
    assert (data["ref"], data["other"], data["created"]) == (
        result.ref_name,
        result.other_name,
        result.created,
    )


def test_blob_round_trips_through_diffresult():
    result = make_result()
    data = embedded(render_html(result))
    cols = data["keys"]
    rows = [
        {name: cols[name][i] for name in cols if name != "path"} for i in range(len(cols["key"]))
    ]
    back = DiffResult.from_dict({"keys": rows})
    for a, b in zip(back.results, result.results):
        for name in (
            "key",
            "status",
            "mean_abs",
            "max_abs",
            "worst_index",
            "ref_shape",
            "other_nan",
        ):
            assert same_value(getattr(a, name), getattr(b, name)), (a.key, name)


def test_document_needs_no_network():
    page = render_html(make_result())
    assert page.startswith("<!DOCTYPE html>")
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert "@import" not in page and "url(" not in page
    assert "/*@" not in page  # every placeholder filled


def test_hostile_names_cannot_break_out_of_the_data_blob():
    evil = [
        "</script><script>alert(1)</script>",
        "<!--<script>",
        "]]>&amp;<b>bold</b>",
        "line\u2028sep\u2029",
        "/*@DATA@*/",
    ]
    results = tuple(
        KeyResult(key=k, passed=True, status="passed", reason=k, max_abs=0.0) for k in evil
    )
    result = DiffResult(
        results, ref_name="</script>ref<x>", other_name="/*@HEADER@*/", created="<i>"
    )
    page = render_html(result, title="</title><script>alert(2)</script>")
    # the template's own two scripts are the only ones that close
    assert page.count("</script>") == 2
    assert page.lower().count("<script") == 2
    assert "<b>bold</b>" not in page and "<i>" not in page
    data = embedded(page)
    assert data["keys"]["key"] == evil
    assert data["ref"] == "</script>ref<x>"
    assert data["other"] == "/*@HEADER@*/"
    assert data["title"] == "</title><script>alert(2)</script>"


def test_histograms_in_either_order_and_checked():
    result = make_result(10, first_fail=4)
    counts, edges = np.histogram(np.linspace(0, 1e-6, 101), bins=5)
    data = embedded(render_html(result, histograms={result.keys()[2]: (counts, edges)}))
    h = data["histograms"][result.keys()[2]]
    assert h == {"edges": edges.tolist(), "counts": counts.tolist()}
    data = embedded(render_html(result, histograms={result.keys()[2]: (edges, counts)}))
    assert data["histograms"][result.keys()[2]]["counts"] == counts.tolist()

    with pytest.raises(ValueError, match="not-a-key"):
        render_html(result, histograms={"not-a-key": (edges, counts)})
    with pytest.raises(ValueError, match="bin edges"):
        render_html(result, histograms={result.keys()[0]: ([0.0, 1.0, 2.0], [1, 2, 3])})
    with pytest.raises(ValueError, match="increasing"):
        render_html(result, histograms={result.keys()[0]: ([0.0, 2.0, 1.0], [1, 2])})
    with pytest.raises(ValueError, match="negative"):
        render_html(result, histograms={result.keys()[0]: ([0.0, 1.0, 2.0], [1, -2])})


def test_write_html_is_atomic(tmp_path):
    target = tmp_path / "sub" / "report.html"
    result = make_result(12, first_fail=5)
    assert write_html(result, target) == str(target)
    first = target.read_text(encoding="utf-8")
    assert first == render_html(result)
    with pytest.raises(ValueError):
        write_html(result, target, histograms={"nope": ([0.0, 1.0], [1])})
    assert target.read_text(encoding="utf-8") == first  # the earlier report survives
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html"]  # no temp left
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would make it


def test_template_ships_with_the_package():
    """The page template is package data: an installed reprod must carry it."""
    tomllib = pytest.importorskip("tomllib")
    conf = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    package_data = conf["tool"].get("setuptools", {}).get("package-data", {})
    wanted = "reprod/report/_html_template.html"
    assert any(
        fnmatch.fnmatch(wanted, (pkg.replace(".", "/") + "/" if pkg != "*" else "*/") + pattern)
        for pkg, patterns in package_data.items()
        for pattern in patterns
    ), 'add [tool.setuptools.package-data] "reprod.report" = ["*.html"] to pyproject.toml'


def test_chart_opens_on_the_judged_statistic():
    judged_mean = make_result(5, first_fail=2)
    assert embedded(render_html(judged_mean))["chart_stat"] == "mean_abs"
    plain = DiffResult((KeyResult(key="a", passed=True, status="passed", reason="", max_abs=0.0),))
    assert embedded(render_html(plain))["chart_stat"] == "max_abs"


# --- in a real browser ----------------------------------------------------------------------------

CHROMIUM = find_chromium()
needs_browser = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on PATH (apt-get install chromium, or set REPROD_CHROMIUM)",
)


@pytest.fixture(scope="module")
def browser():
    # a cold Chromium on a loaded CI machine once took over 30 s to answer its first message,
    # and all 16 tests of the module errored: a second, longer try before giving up
    try:
        b = Browser.launch(CHROMIUM, timeout=60)
    except (BrowserError, TimeoutError):
        b = Browser.launch(CHROMIUM, timeout=120)
    with b:
        yield b


@pytest.fixture
def artifacts(tmp_path) -> Path:
    out = os.environ.get("REPROD_ARTIFACTS")
    return Path(out) if out else tmp_path


@pytest.fixture
def open_report(browser, tmp_path):
    pages = []

    def _open(result, *, name="report.html", fragment="", width=1400, height=1000, **kw):
        path = write_html(result, tmp_path / name, **kw)
        page = browser.open(Path(path).as_uri() + fragment, width=width, height=height)
        page.wait_for("document.documentElement.dataset.ready === '1'", timeout=90)
        page.settle(0.3)
        pages.append(page)
        return page

    yield _open
    for p in pages:
        assert not p.errors, p.errors
        assert not p.dialogs, p.dialogs
        # the file itself is the only thing a report ever loads
        assert all(u.startswith("file://") for u in p.requests), p.requests
        p.close()


FAIL_PIXELS = """(() => {
  const c = document.getElementById('chart'), g = c.getContext('2d');
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let k = 0; k < d.length; k += 4)
    if (Math.abs(d[k] - 210) < 24 && Math.abs(d[k + 1] - 58) < 24 && Math.abs(d[k + 2] - 58) < 24 && d[k + 3] > 200) n++;
  return n;
})()"""

ROWS = "[...document.querySelectorAll('#tbody tr.row')]"
ROW_KEYS = f"{ROWS}.map(r => r.querySelector('.c-key').textContent)"

# The table renders only the rows near its scroll position; this scrolls it from top to bottom and
# collects every row once, in table order.
ALL_ROWS = """(async () => {
  const w = document.getElementById('tablewrap'), seen = new Map();
  const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  for (let top = 0; ; top += w.clientHeight) {
    w.scrollTop = top; await frame();
    for (const r of document.querySelectorAll('#tbody tr.row'))
      if (!seen.has(r.dataset.i)) seen.set(r.dataset.i, {
        key: r.querySelector('.c-key').textContent, status: r.querySelector('.c-status').textContent,
        fail: r.classList.contains('fail'), mean: r.querySelector('.c-mean_abs').textContent});
    if (top + w.clientHeight >= w.scrollHeight) break;
  }
  w.scrollTop = 0; await frame();
  return [...seen.values()];
})()"""


def text(page, element_id: str) -> str:
    return page.evaluate(f"document.getElementById({json.dumps(element_id)}).textContent")


def all_keys(page) -> list[str]:
    return [r["key"] for r in page.evaluate(ALL_ROWS)]


def chart_x(page, i: int) -> tuple[float, float]:
    """Page coordinates of key i on the chart, from the geometry the chart publishes."""
    return page.evaluate(
        f"""(() => {{ const c = document.getElementById('chart'); c.scrollIntoView({{block: 'center'}});
        const r = c.getBoundingClientRect(), d = c.dataset;
        const x = +d.plotLeft + ({i} - d.viewStart + 0.5) * d.plotWidth / (d.viewEnd - d.viewStart);
        return [r.left + x, r.top + r.height / 2]; }})()"""
    )


@needs_browser
def test_page_renders_verdict_chart_and_table(open_report, artifacts):
    result = make_result(60, first_fail=23)
    counts, edges = np.histogram(np.abs(np.random.default_rng(1).normal(0, 1e-6, 5000)), bins=24)
    first = result.first_failure.key
    page = open_report(result, histograms={first: (counts, edges)})
    page.screenshot(artifacts / "html_report.png", full_page=True)

    assert text(page, "verdict") == "FAILED"
    assert text(page, "ref-name") == result.ref_name
    assert text(page, "other-name") == result.other_name
    assert text(page, "created") == result.created
    options = text(page, "options")
    assert "method=mean" in options and "threshold=1.000e-06" in options

    # every key is a row, failing ones marked and listed first
    rows = page.evaluate(ALL_ROWS)
    assert [r["key"] for r in rows] == failed_first(result)
    assert [r["key"] for r in rows if r["fail"]] == [r.key for r in result.failed]
    assert [r["status"] for r in rows] == [result[r["key"]].status for r in rows]
    assert text(page, "row-count") == f"{len(result)} keys"
    # a statistic is printed as fmt_num prints it
    by_key = {r["key"]: r for r in rows}
    assert by_key[result.keys()[5]]["mean"] == f"{result.results[5].mean_abs:.3e}"

    # the chart is drawn, names its first failure and paints failures in the failure colour
    label = page.evaluate("document.getElementById('chart').getAttribute('aria-label')")
    assert f"first failure #{result.keys().index(first)} {first}" in label
    assert page.evaluate(FAIL_PIXELS) > 50

    # the first failure is selected on load, with its detail and histogram
    assert text(page, "detail-key") == first
    assert page.evaluate("!!document.getElementById('hist')")
    caption = text(page, "hist-caption")
    assert caption.startswith(f"{int(counts.sum()):,} elements in 24 bins")


@needs_browser
def test_filters_narrow_the_table(open_report, artifacts):
    result = make_result(60, first_fail=23)
    page = open_report(result)
    keys = result.keys()

    page.type_text("#filter-name", "Blocks.1")  # case does not matter
    page.settle()
    assert all_keys(page) == failed_first(result, [k for k in keys if "blocks.1" in k.lower()])
    assert text(page, "row-count") == (f"{sum('blocks.1' in k for k in keys)} of {len(keys)} keys")

    page.type_text("#filter-name", "*blocks.?.bn*")
    page.settle()
    assert all_keys(page) == failed_first(
        result, [k for k in keys if fnmatch.fnmatch(k, "*blocks.?.bn*")]
    )

    page.type_text("#filter-name", "")
    page.click("#filter-failed")
    page.settle()
    assert all_keys(page) == [r.key for r in result.failed]
    page.screenshot(artifacts / "html_report_failed_only.png")

    page.click("#filter-failed")
    page.evaluate(
        "(() => { const s = document.getElementById('filter-status'); s.value = 'nan';"
        " s.dispatchEvent(new Event('change')); })()"
    )
    assert all_keys(page) == ["head.logits"]

    page.type_text("#filter-name", "no such layer")
    page.settle()
    assert page.evaluate(ROWS + ".length") == 0
    assert "no key matches" in text(page, "tbody")


@needs_browser
def test_sorting_by_a_statistic(open_report):
    result = make_result(40, first_fail=15)
    page = open_report(result)
    page.click("th.c-max_abs")
    page.settle()

    def by_max(reverse):
        finite = [r for r in result.results if r.max_abs is not None]
        # NaN ranks as the worst value; keys without the statistic come last either way
        finite.sort(key=lambda r: math.inf if math.isnan(r.max_abs) else r.max_abs, reverse=reverse)
        return [r.key for r in finite] + [r.key for r in result.results if r.max_abs is None]

    assert all_keys(page) == by_max(reverse=True)
    assert (
        page.evaluate("document.querySelector('th.c-max_abs').getAttribute('aria-sort')")
        == "descending"
    )
    page.click("th.c-max_abs")
    page.settle()
    assert all_keys(page) == by_max(reverse=False)
    page.click("th.c-idx")
    page.settle()
    assert all_keys(page) == result.keys()


@needs_browser
def test_selecting_keys_from_table_chart_and_buttons(open_report):
    result = make_result(50, first_fail=20)
    page = open_report(result)
    keys = result.keys()

    page.click("th.c-idx")  # call order, for the arrow keys below
    page.evaluate("document.getElementById('tablewrap').scrollTop = 0")
    page.settle()
    page.click('#tbody tr.row[data-i="7"] .c-key')
    page.settle()
    key = keys[7]
    kr = result[key]
    assert text(page, "detail-key") == key
    detail = page.evaluate("document.getElementById('detail').innerText")
    assert "[8, 32, 14, 14]" in detail and "float32" in detail
    worst = page.evaluate("document.getElementById('detail-worst').innerText")
    assert "[7, 3, 5, 7]" in worst and str(kr.worst_ref) in worst
    assert page.evaluate("location.hash") == "#key=" + key

    page.press("ArrowDown")  # the table has focus after the click
    page.press("ArrowDown")
    assert text(page, "detail-key") == keys[9]

    x, y = chart_x(page, 33)
    page.click_at(x, y)
    page.settle()
    assert text(page, "detail-key") == keys[33]
    assert page.evaluate("document.querySelector('#tbody tr.sel .c-key').textContent") == keys[33]

    page.click("#detail button:last-child")  # next failure
    page.settle()
    nxt = next(r.key for r in result.results[34:] if not r.passed)
    assert text(page, "detail-key") == nxt

    page.click("#first-failure a")
    page.settle()
    assert text(page, "detail-key") == result.first_failure.key

    page.type_text("#filter-name", "head.logits")
    page.settle()
    page.click("#tbody tr.row .c-key")
    assert text(page, "detail-key") == "head.logits"
    detail = page.evaluate("document.getElementById('detail').innerText")
    assert re.search(r"NaN\s+0\s+3", detail) and re.search(r"Inf\s+1\s+1", detail)


@needs_browser
def test_drag_zooms_the_chart(open_report):
    result = make_result(80, first_fail=30)
    page = open_report(result)
    x0, y = chart_x(page, 10)
    x1, _ = chart_x(page, 40)
    page.drag(x0, y, x1, y)
    page.settle()
    view = "(d => [+d.viewStart, +d.viewEnd])(document.getElementById('chart').dataset)"
    start, end = page.evaluate(view)
    assert 9 <= start <= 11 and 39 <= end <= 42
    assert not page.evaluate("document.getElementById('zoom-reset').hidden")
    page.click("#zoom-reset")
    page.settle()
    assert page.evaluate(view) == [0, len(result)]


@needs_browser
def test_fragment_selects_a_key(open_report):
    result = make_result(30, first_fail=10)
    key = result.keys()[4]
    page = open_report(result, fragment="#key=" + key)
    assert text(page, "detail-key") == key


@needs_browser
def test_passing_result_has_no_failure_marks(open_report):
    result = make_result(25, first_fail=None)
    assert result.passed
    page = open_report(result)
    assert text(page, "verdict") == "PASSED"
    assert page.evaluate("document.getElementById('first-failure')") is None
    assert page.evaluate(FAIL_PIXELS) == 0
    assert page.evaluate(f"{ROWS}.filter(r => r.classList.contains('fail')).length") == 0
    assert text(page, "detail-key") == result.keys()[0]


@needs_browser
def test_empty_result(open_report):
    page = open_report(DiffResult(()))
    assert text(page, "verdict") == "PASSED"
    assert "no keys were compared" in text(page, "tbody")


@needs_browser
def test_hostile_names_render_as_text(open_report):
    evil = ["</script><script>alert(1)</script>", "<img src=x onerror=alert(2)>", "a&b<c>"]
    results = tuple(
        KeyResult(key=k, passed=False, status="failed", reason=k, max_abs=1.0) for k in evil
    )
    page = open_report(DiffResult(results, ref_name="<img src=y onerror=alert(3)>"))
    assert all_keys(page) == evil
    assert text(page, "ref-name") == "<img src=y onerror=alert(3)>"
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    # the fixture asserts that no dialog opened and no request left the file


@needs_browser
def test_ten_thousand_keys_stay_small_and_responsive(open_report, tmp_path, artifacts):
    n = 10_000
    result = make_result(n, first_fail=6_000, seed=3)
    page = open_report(result, name="big.html")
    size = (tmp_path / "big.html").stat().st_size
    assert size < 5 * 1024 * 1024, size
    page.screenshot(artifacts / "html_report_10000.png")

    total = len(result)
    order = failed_first(result)
    assert text(page, "row-count") == f"{total:,} keys"
    # rendered virtually: a window of rows, not ten thousand of them
    assert 10 < page.evaluate(ROWS + ".length") < 200
    page.evaluate(
        "(() => { const w = document.getElementById('tablewrap'); w.scrollTop = w.scrollHeight; })()"
    )
    page.wait_for(f"{ROW_KEYS}.includes({json.dumps(order[-1])})", timeout=30)
    page.evaluate(
        "(() => { const w = document.getElementById('tablewrap'); w.scrollTop = 5000 * 28; })()"
    )
    page.wait_for(f"{ROW_KEYS}.includes({json.dumps(order[5000])})", timeout=30)

    page.click("#filter-failed")
    page.wait_for(
        f"document.getElementById('row-count').textContent === '{len(result.failed):,} of {total:,} keys'",
        timeout=30,
    )
    assert (
        page.evaluate(f"{ROWS}[0].querySelector('.c-key').textContent") == result.first_failure.key
    )


@needs_browser
def test_report_of_a_real_comparison(open_report, artifacts):
    """End to end from arrays: the page shows what numpy says about the same arrays."""
    import reprod

    rng = np.random.default_rng(7)
    ref, other = {}, {}
    for i, shape in enumerate([(4, 8, 8), (16, 3, 3), (64,), (2, 5)]):
        a = rng.normal(size=shape).astype(np.float32)
        ref[f"layer{i}"] = a
        other[f"layer{i}"] = (a + rng.normal(scale=10.0 ** (i - 7), size=shape)).astype(np.float32)
    ref["head"] = {"logits": rng.normal(size=(2, 10)).astype(np.float32)}
    bad = ref["head"]["logits"].copy()
    bad[1, 3] = np.nan
    other["head"] = {"logits": bad}
    result = reprod.compare(
        ref, other, method=["mean", "max"], threshold=1e-5, per_key={"layer3": 1e-3}
    )
    flat = {k: (ref[k], other[k]) for k in ref if k != "head"}
    hist = {
        k: np.histogram(np.abs(o.astype(np.float64) - r), bins=16) for k, (r, o) in flat.items()
    }
    page = open_report(result, histograms=hist)
    page.screenshot(artifacts / "html_report_compare.png", full_page=True)

    rows = page.evaluate(ALL_ROWS)
    assert [r["key"] for r in rows] == failed_first(result, [*flat, "head/logits"])
    for row in rows:
        if row["key"] in flat:
            r, o = flat[row["key"]]
            assert row["mean"] == f"{np.abs(o.astype(np.float64) - r).mean():.3e}"
    logits = next(row for row in rows if row["key"] == "head/logits")
    assert logits["status"] == "nan" and logits["fail"]
    assert [row["fail"] for row in rows] == [not result[row["key"]].passed for row in rows]
    assert text(page, "verdict") == "FAILED"

    # the chart opens on max |diff|, which "max" judges, with the per-key thresholds
    assert page.evaluate("document.getElementById('metric').value") == "max_abs"
    page.click("#first-failure a")
    page.settle()
    stats = page.evaluate("document.getElementById('detail-stats').innerText")
    first = result.first_failure
    assert first.key in flat and "failed" in stats
    r, o = flat[first.key]
    assert f"{np.abs(o.astype(np.float64) - r).max():.6e}".split("e")[0] in stats
    assert text(page, "hist-caption").startswith(f"{r.size:,} elements in 16 bins")


# --- where it diverges, per step, failed first, wide tables, calibrated results ------------------

DIVERGENCE = (
    "diverges at features.4.block.0.2 (Hardswish vs _HardswishOldSlope): input aligned "
    "(max 4.9e-06), output max diff 2.1e-01"
)


def stepped_result(steps: int = 3, n: int = 12, *, noise: bool = False) -> DiffResult:
    """``step_<s>/<layer>`` keys, one group per training step: step 1 passes, later steps fail
    from their key ``n - s`` on."""
    results = []
    for s in range(1, steps + 1):
        for i, name in enumerate(_layer_names(n)):
            bad = s > 1 and i >= n - s
            max_abs = 10.0 ** (-7 + s) * (1 + i / n) * (100 if bad else 1)
            multiple = 0.5 * s + i / n + (40.0 if bad else 0.0)
            results.append(
                KeyResult(
                    key=f"step_{s}/{name}",
                    passed=not bad,
                    status="failed" if bad else "passed",
                    reason=f"{'over' if bad else 'within'} threshold",
                    path=(f"step_{s}", name),
                    size=16,
                    mean_abs=max_abs / 3,
                    max_abs=max_abs,
                    noise_multiple=multiple if noise else None,
                    methods=("noise",) if noise else ("max",),
                    thresholds={"noise": 20.0} if noise else {"max": 1e-3},
                    checks={"noise" if noise else "max": not bad},
                )
            )
    return DiffResult(tuple(results), ref_name="torch", other_name="paddle")


def test_findings_open_the_page_escaped():
    result = make_result(20, first_fail=8)
    page = render_html(result, findings=[DIVERGENCE, "<b>replay</b> & </script>"])
    found = re.search(r'<ul class="findings fail" id="findings">(.*?)</ul>', page, re.S)
    assert found, "no findings block"
    items = re.findall(r'<li class="finding">(.*?)</li>', found.group(1))
    assert items == [html_escape(DIVERGENCE), "&lt;b&gt;replay&lt;/b&gt; &amp; &lt;/script&gt;"]
    # at the top: in the header, before the summary line, the chart and the table
    at = page.index('id="findings"')
    assert page.index('<header class="top panel"') < at < page.index('id="summary-line"')
    assert at < page.index('id="chart-section"') < page.index('id="table-section"')
    assert page.count("</script>") == 2 and "<b>replay" not in page
    assert embedded(page)["findings"] == [DIVERGENCE, "<b>replay</b> & </script>"]
    # none given: no block; a lone string is one finding; one line each
    assert 'id="findings"' not in render_html(result)
    assert embedded(render_html(result, findings="one\nsentence"))["findings"] == ["one sentence"]
    # the same through DiffResult.to_html and write_html
    assert html_escape(DIVERGENCE) in result.to_html(findings=[DIVERGENCE])


def html_escape(s: str) -> str:
    import html

    return html.escape(s)


def test_to_html_and_write_html_take_findings(tmp_path):
    result = make_result(10, first_fail=4)
    written = result.to_html(str(tmp_path / "r.html"), findings=[DIVERGENCE])
    assert html_escape(DIVERGENCE) in Path(written).read_text(encoding="utf-8")
    write_html(result, tmp_path / "w.html", findings=(DIVERGENCE,))
    assert embedded((tmp_path / "w.html").read_text(encoding="utf-8"))["findings"] == [DIVERGENCE]


def test_per_step_summary():
    result = stepped_result(3, 12)
    page = render_html(result)
    steps = embedded(page)["steps"]
    assert [s["step"] for s in steps] == ["step_1", "step_2", "step_3"]
    assert [(s["keys"], s["passed"], s["failed"]) for s in steps] == [
        (12, 12, 0),
        (12, 10, 2),
        (12, 9, 3),
    ]
    assert [s["first_failure"] for s in steps] == [
        None,
        "step_2/" + _layer_names(12)[10],
        "step_3/" + _layer_names(12)[9],
    ]
    for s in steps:
        group = [r for r in result.results if r.key.startswith(s["step"] + "/")]
        assert s["worst_max_abs"] == max(r.max_abs for r in group)
        assert s["worst_noise_multiple"] is None
    table = re.search(r'<table class="steps" id="steps">(.*?)</table>', page, re.S).group(1)
    assert "<th>step</th>" in table and "worst noise" not in table
    assert page.index('id="steps-section"') < page.index('id="chart-section"')

    # calibrated: the worst noise multiple per step, printed as fmt_multiple prints it
    cal = stepped_result(2, 6, noise=True)
    steps = embedded(render_html(cal))["steps"]
    assert steps[1]["worst_noise_multiple"] == max(r.noise_multiple for r in cal.results[6:])
    assert "<th>worst noise</th>" in render_html(cal)


def test_step_groups_come_from_paths_or_key_prefixes():
    def kr(key, path=()):
        return KeyResult(key=key, passed=True, status="passed", reason="", path=path, max_abs=0.0)

    # key prefixes, without paths: iter_3/, epoch2/
    prefixed = DiffResult((kr("iter_1/loss"), kr("iter_1/lr"), kr("iter_2/loss")))
    assert [s["step"] for s in embedded(render_html(prefixed))["steps"]] == ["iter_1", "iter_2"]
    # path[0] wins over the key's text
    by_path = DiffResult((kr("a", ("epoch2", "a")), kr("b", ("epoch3", "b"))))
    assert [s["step"] for s in embedded(render_html(by_path))["steps"]] == ["epoch2", "epoch3"]
    # groups that are not steps are summarised as groups
    named = render_html(DiffResult((kr("forward/logits"), kr("backward/conv.grad"))))
    assert "<h2>Per group</h2>" in named
    # flat keys, one group only, or a key outside every group: no summary
    for keys in (["a", "b"], ["step_1/a", "step_1/b"], ["step_1/a", "step_2/a", "loose"]):
        page = render_html(DiffResult(tuple(kr(k) for k in keys)))
        assert embedded(page)["steps"] == [] and 'id="steps-section"' not in page


def test_calibrated_result_shows_the_noise_multiple():
    cal = stepped_result(2, 6, noise=True)
    data = embedded(render_html(cal))
    assert data["chart_stat"] == "noise_multiple"
    assert data["keys"]["noise_multiple"] == [r.noise_multiple for r in cal.results]
    # uncalibrated results keep their statistic
    assert embedded(render_html(stepped_result(2, 6)))["chart_stat"] == "max_abs"


# --- the CLI writes the divergence into the page ----------------------------------------------


def _captures(broken: str | None) -> dict:
    """Forward captures of a five-layer chain; ``broken`` adds 0.2 to that layer's output (and so
    to every later input and output)."""
    from reprod.capture.naming import layer_key

    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 8)).astype(np.float32)
    dump = {}
    off = np.float32(0.0)
    for name in ("stem.conv", "stem.bn", "features.4.block.0.2", "features.5", "classifier"):
        dump[layer_key(name, 1, "in")] = x + off
        y = np.tanh(x) + np.float32(0.1)
        if name == broken:
            off = np.float32(0.2)
        dump[layer_key(name, 1, "out")] = y + off
        x = y
    return dump


def test_cli_html_names_the_divergence(tmp_path, capsys):
    from reprod.cli import main

    np.savez(tmp_path / "torch.npz", **_captures(None))
    np.savez(tmp_path / "paddle.npz", **_captures("features.4.block.0.2"))
    out = tmp_path / "out.html"
    rc = main(
        [str(tmp_path / "torch.npz"), str(tmp_path / "paddle.npz"), "--html", str(out), "--quiet"]
    )
    assert rc == 1
    findings = embedded(out.read_text(encoding="utf-8"))["findings"]
    assert len(findings) == 1
    assert findings[0].startswith("diverges at features.4.block.0.2: input aligned")
    assert "output max diff 2.000e-01" in findings[0]
    assert html_escape(findings[0]) in out.read_text(encoding="utf-8")

    # aligned captures: no finding
    np.savez(tmp_path / "same.npz", **_captures(None))
    rc = main(
        [str(tmp_path / "torch.npz"), str(tmp_path / "same.npz"), "--html", str(out), "--quiet"]
    )
    assert rc == 0 and embedded(out.read_text(encoding="utf-8"))["findings"] == []

    # not captures: the first failure and its reason
    np.savez(tmp_path / "a.npz", x=np.zeros(3, np.float32), y=np.ones(3, np.float32))
    np.savez(tmp_path / "b.npz", x=np.zeros(3, np.float32), y=np.full(3, 2, np.float32))
    rc = main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--html", str(out), "--quiet"])
    assert rc == 1
    (finding,) = embedded(out.read_text(encoding="utf-8"))["findings"]
    assert finding.startswith("first failure: y: ")
    capsys.readouterr()


# --- in the browser ---------------------------------------------------------------------------

TABLE_FITS = """(() => {
  const w = document.getElementById('tablewrap'), r = w.getBoundingClientRect();
  const sec = document.getElementById('table-section').getBoundingClientRect();
  const t = document.getElementById('keys').getBoundingClientRect();
  return {page: document.documentElement.scrollWidth, view: innerWidth, wrapLeft: r.left,
    wrapRight: r.right, sectionRight: sec.right, tableWidth: t.width, scrollWidth: w.scrollWidth,
    clientWidth: w.clientWidth, overflowX: getComputedStyle(w).overflowX};
})()"""

LAST_COLUMN_REACHABLE = """(async () => {
  const w = document.getElementById('tablewrap');
  w.scrollLeft = w.scrollWidth;
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const th = [...document.querySelectorAll('#thead th')].pop(), a = th.getBoundingClientRect();
  const b = w.getBoundingClientRect();
  const out = {label: th.textContent, left: a.left, right: a.right, wrapLeft: b.left, wrapRight: b.right};
  w.scrollLeft = 0;
  return out;
})()"""


@needs_browser
@pytest.mark.parametrize("size", [(1400, 900), (1024, 768)], ids=["1400x900", "1024x768"])
def test_wide_table_scrolls_inside_its_box(open_report, artifacts, size):
    width, height = size
    result = make_result(40, first_fail=15)
    page = open_report(result, width=width, height=height)
    page.screenshot(artifacts / f"html_report_{width}.png", full_page=True)
    m = page.evaluate(TABLE_FITS)
    # the page itself never scrolls sideways; the table's box stays inside the window
    assert m["page"] <= m["view"], m
    assert 0 <= m["wrapLeft"] and m["wrapRight"] <= m["view"] and m["sectionRight"] <= m["view"], m
    # the table is wider than its box: the box scrolls, it does not clip
    assert m["tableWidth"] > m["clientWidth"] and m["scrollWidth"] > m["clientWidth"], m
    assert m["overflowX"] in ("auto", "scroll"), m
    last = page.evaluate(LAST_COLUMN_REACHABLE)
    assert last["label"] == "reason"
    assert last["wrapLeft"] <= last["left"] and last["right"] <= last["wrapRight"] + 1, last


@needs_browser
def test_table_opens_failed_first_and_sorts_on_click(open_report):
    result = make_result(30, first_fail=10)
    page = open_report(result)
    assert all_keys(page) == failed_first(result)
    assert "failed keys first" in text(page, "sort-note")
    # the chart keeps call order
    assert page.evaluate("+document.getElementById('chart').dataset.viewStart") == 0
    label = page.evaluate("document.getElementById('chart').getAttribute('aria-label')")
    assert f"first failure #{result.keys().index(result.first_failure.key)} " in label
    # the first failure is selected and is the first row
    assert text(page, "detail-key") == result.first_failure.key
    assert page.evaluate(f"{ROW_KEYS}[0]") == result.first_failure.key
    page.click("th.c-idx")
    page.settle()
    assert all_keys(page) == result.keys()
    assert text(page, "sort-note") == ""
    page.click("th.c-idx")
    page.settle()
    assert all_keys(page) == result.keys()[::-1]


@needs_browser
def test_findings_and_steps_at_the_top(open_report, artifacts):
    result = stepped_result(3, 12)
    evil = "<img src=x onerror=alert(1)> replay: step_2 diverges"
    page = open_report(result, findings=[DIVERGENCE, evil])
    page.screenshot(artifacts / "html_report_steps.png", full_page=True)
    items = page.evaluate(
        "[...document.querySelectorAll('#findings li')].map(li => li.textContent)"
    )
    assert items == [DIVERGENCE, evil]
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    tops = page.evaluate(
        "['findings', 'steps', 'chart', 'tablewrap'].map(id =>"
        " document.getElementById(id).getBoundingClientRect().top)"
    )
    assert tops == sorted(tops), tops
    # the findings are on the first screen
    assert tops[0] < 200

    rows = page.evaluate(
        "[...document.querySelectorAll('#steps tbody tr')].map(tr =>"
        " [...tr.children].map(td => td.textContent))"
    )
    names = _layer_names(12)
    assert [r[:4] for r in rows] == [
        ["step_1", "12", "12", "0"],
        ["step_2", "12", "10", "2"],
        ["step_3", "12", "9", "3"],
    ]
    assert [r[-1] for r in rows] == ["-", f"step_2/{names[10]}", f"step_3/{names[9]}"]
    assert rows[2][4] == f"{max(r.max_abs for r in result.results[24:]):.3e}"
    # a step's first failing key selects it
    page.click("#steps tbody tr:nth-child(3) a")
    page.settle()
    assert text(page, "detail-key") == f"step_3/{names[9]}"


@needs_browser
def test_noise_column_and_chart(open_report):
    from reprod.messages import fmt_multiple

    cal = stepped_result(2, 6, noise=True)
    extra = [
        KeyResult(
            key=f"step_2/extra{i}",
            passed=v <= 20,
            status="passed" if v <= 20 else "failed",
            reason="",
            path=("step_2", f"extra{i}"),
            max_abs=1e-6,
            noise_multiple=v,
            methods=("noise",),
            thresholds={"noise": 20.0},
        )
        for i, v in enumerate([0.0, 0.005, 0.0123, 1.0, 2.4, 9.96, 48.2, 4812.0, 2.5e16])
    ]
    cal = DiffResult(cal.results + tuple(extra), ref_name="torch", other_name="paddle")
    page = open_report(cal)
    assert page.evaluate("document.getElementById('metric').value") == "noise_multiple"
    assert page.evaluate("!!document.querySelector('th.c-noise_multiple')")
    cells = {
        r["key"]: r["noise"]
        for r in page.evaluate(
            ALL_ROWS.replace(
                "mean: r.querySelector('.c-mean_abs').textContent",
                "noise: r.querySelector('.c-noise_multiple').textContent",
            )
        )
    }
    for r in cal.results:
        assert cells[r.key] == fmt_multiple(r.noise_multiple), r.key
    # the threshold line is the noise factor; failing keys are drawn red
    assert page.evaluate(FAIL_PIXELS) > 20
    # the detail panel lists the multiple against its factor
    page.click("#first-failure a")
    page.settle()
    stats = page.evaluate("document.getElementById('detail-stats').innerText")
    assert "noise_multiple" in stats and "20x" in stats and "failed" in stats
    # sorting by the noise column: the largest multiple first
    page.click("th.c-noise_multiple")
    page.settle()
    assert all_keys(page)[0] == "step_2/extra8"
