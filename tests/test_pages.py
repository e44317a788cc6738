"""`whq serve` and `whq export site`: every page type served on 127.0.0.1 from the golden
warehouse, opened in headless Chromium (charts drawn to SVG, shaded tokens, links), the SQL
box's refusals, unknown names as 404 pages, a bounded load test, and the static export
opened from file://. One screenshot per page type is kept under artifacts/ to look at."""

from __future__ import annotations

import concurrent.futures
import contextlib
import html
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

import warehouse
from queries.pages import _number as pages_number

from .browser import assert_charts_drawn, render
from .cli_runner import run_cli

RUN = "g"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


UNIT_SITES = ["mlp.act:threshold=0,examples=3,hist,quantiles=4,similar=4", "mlp.up:topk=4,examples=3"]
NEGATIVE = "Most negative activations"


@pytest.fixture(scope="module")
def pages_root(golden_root, tmp_path_factory, tiny_lm_dir):
    """The golden run 'g', and beside it run 'u' of the same documents with everything a unit page
    shows: histograms, quantile examples, most negative examples, similar units, the logit lens; and
    a ReLU SAE's latents (never negative: no most negative examples)."""
    from ingest.pipeline import ingest
    from ingest.sources import Document

    from . import dictionaries
    from .golden.build_fixture import DOCUMENTS

    root = tmp_path_factory.mktemp("pages") / "wh"
    shutil.copytree(golden_root, root)
    sae = dictionaries.saelens(root.parent / "sae", "standard", d_in=64, d_sae=32)
    ingest(
        root,
        str(tiny_lm_dir),
        sites=[*UNIT_SITES, f"resid.out[1]+sae={sae}:topk=4,examples=3"],
        documents=[Document(i, text, dataset=d) for i, d, text in DOCUMENTS],
        run_id="u",
        batch_size=2,
        max_length=16,
        device="cpu",
        progress=False,
        logit_lens=True,
    )
    return root


TOKEN = "test-token"  # the per-launch token the SQL box needs (whq serve draws a new one each launch)


@contextlib.contextmanager
def serving(root: Path, **options):
    """The app under uvicorn in a thread of this process, on a free port of 127.0.0.1; `options` go to create_app."""
    import uvicorn

    from queries.server import create_app

    wh = warehouse.open(root)
    app = create_app(wh, **{"token": TOKEN, **options})
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{srv.config.port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        wh.close()


@pytest.fixture(scope="module")
def server(pages_root):
    with serving(pages_root) as url:
        yield url


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


class _Page(HTMLParser):
    """Links and the shaded token spans of a page."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.tokens: list[dict] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "span" and "tok" in (attrs.get("class") or "").split():
            self.tokens.append(attrs)


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


# -- pages in the browser ------------------------------------------------------------------------


def test_home_page(server, tmp_path, golden_root):
    dom = render(tmp_path, server + "/", shot="page_home")
    wh = warehouse.open(golden_root)
    n_tokens = wh.sql("SELECT n_tokens FROM runs WHERE run_id = ?", [RUN]).fetchall()[0][0]
    on_disk = sum(p["bytes"] for p in wh.manifest(RUN)["parts"])
    assert f"{n_tokens:,}" in dom and f"{on_disk:,}" in dom
    links = parse(dom).links
    assert f"/{RUN}/mlp.act" in links and f"/{RUN}/mlp.up" in links


def test_site_page(server, tmp_path):
    dom = render(tmp_path, server + "/u/mlp.act?layer=1&sort=kurtosis&order=desc", shot="page_site")
    assert_charts_drawn(dom, 3)
    page = parse(dom)
    units = [link for link in page.links if re.fullmatch(r"/u/mlp\.act/1/\d+", link)]
    assert len(units) == 100  # one page of the 128 units
    cells = re.findall(
        r'<td data-v="([0-9.e+-]*)">', dom
    )  # 8 a row: neuron, rate, mean, min, max, skewness, kurtosis, selectivity
    kurtosis = [float(v) for v in cells[6::8]]
    assert len(kurtosis) == 100 and kurtosis == sorted(kurtosis, reverse=True)
    for link in {*units[:3], *(link for link in page.links if "page=2" in link)}:
        assert get(server + link.replace("&amp;", "&"))[0] == 200, link


def test_unit_page(server, tmp_path, pages_root):
    dom = render(tmp_path, server + "/u/mlp.act/1/3", shot="page_unit")
    assert_charts_drawn(dom, 1)  # the unit's histogram
    page = parse(dom)
    wh = warehouse.open(pages_root)
    top = wh.pl("SELECT * FROM top_contexts('u', 'mlp.act', 1, 3, k := 20, before := 24, after := 8)")
    bottom = wh.pl("SELECT * FROM bottom_contexts('u', 'mlp.act', 1, 3, k := 20, before := 24, after := 8)")
    sample = wh.pl("SELECT * FROM whq_examples('u', 'mlp.act', 1, 3, 'random', 10, 24, 8, 0)")
    spread = wh.pl("SELECT * FROM quantile_examples('u', 'mlp.act', 1, 3, before := 24, after := 8)")
    assert spread.height > 0 and bottom.height == 3 and max(bottom["value"]) < 0  # SiLU: signed
    assert NEGATIVE in dom
    windows = [*top["tokens"], *bottom["tokens"], *spread["tokens"], *sample["tokens"]]
    assert len(page.tokens) == sum(len(t) for t in windows) > 0
    assert [t["title"] for t in page.tokens if "fire" in t["class"].split()] == [
        pages_number(v) for v in [*top["value"], *bottom["value"], *spread["value"], *sample["value"]]
    ]
    assert all(re.fullmatch(r"--a:[01]\.\d\d", t["style"]) for t in page.tokens)
    # each window reads as its document spells it: the text from its first token's start to its last token's end
    shown = [html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r'<td class="ctx">(.*?)</td>', dom)]
    spelled = wh.pl("""
        SELECT x.rank, substr(d.text, min(t.char_start) + 1, max(t.char_end) - min(t.char_start)) AS text
        FROM top_contexts('u', 'mlp.act', 1, 3, k := 20, before := 24, after := 8) x
        JOIN documents d ON d.run_id = 'u' AND d.doc_id = x.doc_id
        JOIN tokens t ON t.run_id = 'u' AND t.doc = d.doc AND t.pos BETWEEN greatest(x.pos - 24, 0) AND x.pos + 8
        GROUP BY x.rank, d.text ORDER BY x.rank""")
    assert shown[: top.height] == [text.replace("\n", "⏎") for text in spelled["text"]]
    stats = wh.pl("SELECT * FROM unit_stats('u', 'mlp.act', 1) WHERE neuron = 3").row(0, named=True)
    assert pages_number(stats["kurtosis"]) in dom and pages_number(stats["min"]) in dom
    # the outlined token's opacity: |value| / max |value|, but |value| / |min| in the most negative section
    # (a SiLU unit's negative part is small: on the common scale those examples were near-white)
    fire_alpha = [float(t["style"][len("--a:") :]) for t in page.tokens if "fire" in t["class"].split()]
    scale = max(abs(stats["max"]), abs(stats["min"]))
    expected = [abs(v) / scale for v in top["value"]] + [abs(v) / abs(stats["min"]) for v in bottom["value"]]
    assert fire_alpha[: len(expected)] == pytest.approx(expected, abs=0.006)
    assert max(expected[top.height :]) == pytest.approx(1.0, abs=1e-3)  # the most negative example is full blue
    similar = wh.pl("SELECT * FROM similar_units('u', 'mlp.act', 1, 3)")
    assert {"decoder", "coactivation"} <= set(similar["kind"])
    for unit in similar["neuron"]:
        assert f"/u/mlp.act/1/{unit}" in page.links
    assert "/u/mlp.act/1/2" in page.links and "/u/mlp.act/1/4" in page.links
    for link in set(page.links):
        if link.startswith("/sql"):  # the SQL box needs the launch token, which this page was opened without
            assert get(server + link.replace("&amp;", "&"))[0] == 403, link
        elif link.startswith("/"):
            assert get(server + link.replace("&amp;", "&"))[0] == 200, link


def test_unit_page_of_a_site_without_histograms(server, tmp_path, golden_root):
    dom = render(tmp_path, server + f"/{RUN}/mlp.up/1/3")
    assert "No histogram for this site" in dom and 'data-rendered="yes"' not in dom
    assert NEGATIVE not in dom  # a warehouse from before bottom examples: none stored, no section
    page = parse(dom)
    wh = warehouse.open(golden_root)
    top = wh.pl(f"SELECT * FROM top_contexts('{RUN}', 'mlp.up', 1, 3, k := 20, before := 24, after := 8)")
    assert (
        len([t for t in page.tokens if "fire" in t["class"].split()])
        == top.height
        + wh.sql(f"SELECT count(*) FROM whq_examples('{RUN}', 'mlp.up', 1, 3, 'random', 10, 24, 8, 0)").fetchall()[0][0]
    )


def test_unit_page_of_a_never_negative_site_has_no_most_negative_section(server, tmp_path, pages_root):
    wh = warehouse.open(pages_root)
    stats = wh.pl("SELECT * FROM unit_stats('u', 'sae.resid.out', 1) WHERE rate > 0 ORDER BY neuron")
    assert stats.height > 0 and min(stats["min"]) >= 0  # ReLU latents
    assert wh.sql(
        "SELECT count(*) FROM neuron_examples WHERE run_id = 'u' AND kind = 'bottom' AND site = 'sae.resid.out'"
    ).fetchall() == [(0,)]
    unit = stats["neuron"][0]
    dom = render(tmp_path, server + f"/u/sae.resid.out/1/{unit}")
    top = wh.pl(f"SELECT * FROM top_contexts('u', 'sae.resid.out', 1, {unit}, k := 20, before := 24, after := 8)")
    assert "Top activations" in dom and top.height > 0 and NEGATIVE not in dom


def test_token_search_page(server, tmp_path, pages_root):
    dom = render(tmp_path, server + "/u/mlp.act/tokens?q=e", shot="page_tokens")
    units = [link for link in parse(dom).links if re.fullmatch(r"/u/mlp\.act/\d+/\d+", link)]
    wh = warehouse.open(pages_root)
    best = wh.pl("SELECT * FROM units_for_token('u', 'mlp.act', 'e') LIMIT 50")
    assert units == [f"/u/mlp.act/{layer}/{unit}" for layer, unit in zip(best["layer"], best["neuron"])] and units
    assert f"occurs {best['n_occurrences'][0]:,} times" in dom
    assert get(server + units[0])[0] == 200


def test_sql_page_runs_queries_and_refuses_writes(server, tmp_path, capsys, monkeypatch, golden_root):
    query = urllib.parse.quote(
        "SELECT layer, count(*) AS n FROM neuron_stats WHERE run_id = 'g' AND site = 'mlp.act' GROUP BY layer ORDER BY layer"
    )
    dom = render(tmp_path, server + f"/sql?token={TOKEN}&q={query}", shot="page_sql")
    assert dom.count("<tr>") == 5 and "download CSV" in dom
    status, csv = get(server + f"/sql.csv?token={TOKEN}&q={query}")
    assert status == 200 and csv.splitlines() == ["layer,n", "0,128", "1,128", "2,128", "3,128"]
    for statement in ("COPY runs TO 'out.csv'", "ATTACH 'other.duckdb' AS o", "SELECT * FROM read_csv('/etc/passwd')"):
        status, text = get(server + f"/sql?token={TOKEN}&q=" + urllib.parse.quote(statement))
        code, _, err = run_cli(capsys, monkeypatch, "sql", golden_root, statement, "--read-only")
        assert status == 400 and code == 2
        shown = re.search(r'<p class="error">(.*?)</p>', text).group(1).replace("&#39;", "'")
        assert shown == err.strip(), statement  # the same one line as whq sql --read-only
        assert get(server + f"/sql.csv?token={TOKEN}&q=" + urllib.parse.quote(statement))[0] == 400
    status, text = get(server + f"/sql?token={TOKEN}&q=" + urllib.parse.quote("SELECT * FROM range(20000)"))  # row cap
    assert status == 200 and "10,000 rows (the result had more: add a LIMIT), the first 1,000 shown" in text


@pytest.mark.parametrize(
    "path, names",
    [
        ("/nope/mlp.act", "its runs: g, u"),
        (f"/{RUN}/nope", "its sites: mlp.act, mlp.up"),
        (f"/{RUN}/mlp.act/9/0", "its layers: 0, 1, 2, 3"),
        (f"/{RUN}/mlp.act/1/128", "units 0..127"),
        (f"/{RUN}/mlp.act/1/3/extra", "start from the home page"),
    ],
)
def test_unknown_names_are_404_pages_naming_what_exists(server, path, names):
    status, text = get(server + path)
    assert status == 404 and names in text.replace("&#39;", "'")


def test_other_host_names_are_refused(server):
    """A page elsewhere that rebinds its own name to 127.0.0.1 cannot read the warehouse."""
    request = urllib.request.Request(server + "/", headers={"Host": "attacker.example"})
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("answered a foreign Host")
    except urllib.error.HTTPError as err:
        assert err.code == 400


def test_unit_page_under_load(server):
    """96 requests from 8 concurrent clients against the unit pages of 16 units: all 200 OK, and each
    unit's 6 answers the same page."""
    urls = [server + f"/u/mlp.act/1/{i % 16}" for i in range(96)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(get, urls))
    assert [status for status, _ in answers] == [200] * 96
    for unit in range(16):
        same = {text for url, (_, text) in zip(urls, answers) if url.endswith(f"/1/{unit}")}
        assert len(same) == 1, unit


# -- static export -------------------------------------------------------------------------------


def test_export_site_opens_from_file(pages_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "site"
    code, stdout, err = run_cli(
        capsys,
        monkeypatch,
        "export",
        "site",
        pages_root,
        "--run",
        "u",
        "--site",
        "mlp.act",
        "--out",
        out,
        "--layers",
        "1",
        "--layers",
        "2",
    )
    assert code == 0, err
    assert "wrote 259 pages" in stdout  # index + 2 layer pages + 2 x 128 unit pages
    for page in out.rglob("*.html"):
        text = page.read_text()
        assert not re.search(r"<script[^>]+src=\"(https?:)?//|<link[^>]+href=", text), page
        for link in parse(text).links:
            assert (page.parent / link).resolve().exists(), (page, link)
    dom = render(tmp_path, (out / "index.html").as_uri(), shot="page_export_site")
    assert_charts_drawn(dom, 3)
    dom = render(tmp_path, (out / "2" / "0.html").as_uri(), shot="page_export_unit")
    assert_charts_drawn(dom, 1)
    assert len(parse(dom).tokens) > 0 and 'rel="prev"' in dom  # runs back into layer 1
    assert NEGATIVE in (out / "1" / "3.html").read_text()  # the unit test_unit_page opens, exported
    code, _, err = run_cli(
        capsys,
        monkeypatch,
        "export",
        "site",
        pages_root,
        "--run",
        "u",
        "--site",
        "mlp.act",
        "--out",
        out,
        "--layers",
        "7",
    )
    assert code == 2 and "has no layer 7" in err and len(err.strip().splitlines()) == 1


def test_whq_serve_prints_its_url_and_stops_on_ctrl_c(golden_root):
    import signal
    import sys

    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    whq = [
        sys.executable,
        "-c",
        "from warehouse.cli import main; main()",
        "serve",
        str(golden_root),
        "--port",
        str(port),
    ]
    busy = subprocess.run(whq, capture_output=True, text=True, timeout=120)
    assert (
        busy.returncode == 2
        and busy.stderr
        == f"error: cannot listen on 127.0.0.1:{port}: Address already in use; pick another port with --port\n"
    )
    taken.close()
    server = subprocess.Popen(whq, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        printed = re.search(r" at (http://\S+) \(Ctrl-C stops\)$", server.stdout.readline().strip()).group(1)
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/\?token=[\w-]{{32}}", printed)
        assert get(f"http://127.0.0.1:{port}/")[0] == 200
        assert get(printed.replace("/?", "/sql?"))[0] == 200 and get(f"http://127.0.0.1:{port}/sql")[0] == 403
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=60)
    assert server.returncode in (0, 130)


def test_pages_of_a_minilm_capture(minilm_wh, tmp_path):
    """A real model's capture: a topk site with examples, WordPiece tokens."""
    with serving(minilm_wh) as url:
        dom = render(tmp_path, url + "/r/mlp.act?layer=2")
        assert_charts_drawn(dom, 3)
        unit = int(re.search(r'href="/r/mlp\.act/2/(\d+)"', dom).group(1))
        dom = render(tmp_path, url + f"/r/mlp.act/2/{unit}")
        wh = warehouse.open(minilm_wh)
        top = wh.pl(f"SELECT * FROM top_contexts('r', 'mlp.act', 2, {unit}, k := 20, before := 24, after := 8)")
        bottom = wh.pl(f"SELECT * FROM bottom_contexts('r', 'mlp.act', 2, {unit}, k := 20, before := 24, after := 8)")
        sample = wh.pl(f"SELECT * FROM whq_examples('r', 'mlp.act', 2, {unit}, 'random', 10, 24, 8, 0)")
        assert bottom.height == 5 and max(bottom["value"]) < 0 and NEGATIVE in dom  # GELU is signed
        page = parse(dom)
        assert len(page.tokens) == sum(len(t) for t in [*top["tokens"], *bottom["tokens"], *sample["tokens"]])
        status, text = get(url + "/r/mlp.act/tokens?q=speak")
        assert status == 200 and "/r/mlp.act/" in text
        status, text = get(url + "/r/mlp.up/2/5")  # a NAG site: no examples, the page says how to keep them
        assert status == 200 and "This site kept no examples: re-ingest with --site mlp.up:nag=6,examples=20." in text


def test_bench_serve_names_the_dominant_query(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(
        capsys,
        monkeypatch,
        "bench",
        "serve",
        tmp_path / "b",
        "--rows",
        "20000",
        "--layers",
        "2",
        "--width",
        "64",
        "--k",
        "4",
        "--repeats",
        "1",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    for page in ("unit page", "token search", "run/site page"):
        assert result[page]["median_ms"] > 0 and result[page]["queries_ms"], page
    timed = " ".join(result["unit page"]["queries_ms"])  # every section of the page, each statement on its own
    for read in (
        "whq_examples_by_kind",  # top, random, bottom and quantile examples: one statement
        "unit_histograms",
        "whq_similar_units",
        "neuron_logits",
        "scorer_verdicts",
        "explanation_examples",
        "scores",
    ):
        assert read in timed, read


def _unspelled(rows: list[dict]) -> list[dict]:
    """Example rows as the macros give them: without the kind the page adds and the window tokens' spelling."""
    return [
        {
            name: [{f: t[f] for f in ("piece", "text", "value")} for t in value] if name == "tokens" else value
            for name, value in row.items()
            if name != "kind"
        }
        for row in rows
    ]


def test_bench_warehouse_carries_every_section_of_the_unit_page(tmp_path):
    """The synthetic run holds what a capture of examples=N,hist,quantiles=Q,similar=K --logit-lens and an
    explained, scored unit hold; its histograms, extremes and quantile bins agree with its own rows."""
    from queries import bench, page_data

    shape = bench.Shape(rows=20000, layers=2, width=64, k=4)
    bench.build(tmp_path / "b", shape)
    run = shape.run_id
    with warehouse.open(tmp_path / "b") as wh:
        reader = page_data.Reader(wh)
        try:
            info = page_data.site_info(reader, run, bench.SITE)
            (unit,) = reader.rows(
                "SELECT neuron FROM neuron_stats WHERE run_id = ? AND layer = 0 ORDER BY n_fired DESC, neuron LIMIT 1",
                [run],
            )
            data = page_data.unit_data(reader, info, run, bench.SITE, 0, unit["neuron"])[unit["neuron"]]
            explanations = page_data.unit_explanations(reader, run, bench.SITE, 0, unit["neuron"])
            # The page reads every kind in one statement: the rows of the one-kind macros, kind by kind.
            args = [run, bench.SITE, unit["neuron"]]
            one_kind = {
                kind: reader.rows(
                    "SELECT * FROM whq_examples(?, ?, 0, ?, ?, ?, ?, ?, 0)",
                    [*args, kind, k, page_data.BEFORE, page_data.AFTER],
                )
                for kind, k in (("top", page_data.TOP_K), ("bottom", page_data.TOP_K), ("random", page_data.N_RANDOM))
            }
            one_kind["quantile"] = reader.rows(
                "SELECT * EXCLUDE (neuron) FROM whq_quantile_examples(?, ?, 0, ?, ?, ?)",
                [*args, page_data.BEFORE, page_data.AFTER],
            )
        finally:
            reader.close()
        for kind, expected in one_kind.items():
            assert expected and _unspelled(data["examples"][kind]) == expected, kind
        assert all(data["examples"][kind] for kind in ("top", "bottom", "random", "quantile"))
        assert data["histogram"] and all(data["lens"].values()) and all(data["similar"].values())
        assert explanations and all(explanations[0][part] for part in ("scores", "shown", "verdicts"))
        kinds = wh.sql(f"SELECT DISTINCT kind FROM neuron_examples WHERE run_id = '{run}'").fetchall()
        assert {k for (k,) in kinds} == {"top", "bottom", "random", "nonfiring", "quantile"}
        # Every token in one bin of each unit; the firing bins count exactly the stored firings
        # (bins from whq_hist_lo/hi, not the builder's), the negative ones the bottom examples.
        mismatched = wh.sql(
            f"""
            WITH h AS (SELECT layer, neuron, bin, count, whq_hist_lo(bin) AS lo, whq_hist_hi(bin) AS hi
                       FROM unit_histograms WHERE run_id = '{run}'),
            shown AS (SELECT layer, neuron, value FROM token_neurons WHERE run_id = '{run}'
                      UNION ALL SELECT layer, neuron, value FROM neuron_examples WHERE run_id = '{run}' AND kind = 'bottom'),
            counted AS (SELECT h.layer, h.neuron, h.bin, h.count, count(v.value) AS n FROM h LEFT JOIN shown v
                        ON v.layer = h.layer AND v.neuron = h.neuron AND (CASE WHEN h.bin > 97 THEN v.value >= h.lo
                           AND v.value < h.hi ELSE v.value > h.lo AND v.value <= h.hi END) AND v.value <> 0
                        GROUP BY ALL)
            SELECT
              (SELECT count(*) FROM counted WHERE bin <> 97 AND n <> count),
              (SELECT count(*) FROM (SELECT h.layer, h.neuron, sum(h.count) AS total FROM h GROUP BY ALL) t
               JOIN neuron_stats s ON s.run_id = '{run}' AND s.layer = t.layer AND s.neuron = t.neuron
               WHERE t.total <> s.n_tokens),
              (SELECT count(*) FROM (SELECT e.layer, e.neuron, min(e.value) AS lo, max(e.value) AS hi FROM neuron_examples e
                                     WHERE e.run_id = '{run}' GROUP BY ALL) e
               JOIN neuron_stats s ON s.run_id = '{run}' AND s.layer = e.layer AND s.neuron = e.neuron
               WHERE s.min <> e.lo OR s.max <> e.hi)
            """
        ).fetchall()
        assert mismatched == [(0, 0, 0)]
        outside = wh.sql(
            f"SELECT count(*), count(*) FILTER (WHERE NOT (value >= lo AND value < hi)) "
            f"FROM whq_quantile_examples('{run}', '{bench.SITE}', 1, NULL, 2, 2)"
        ).fetchall()
        assert outside[0][0] > 0 and outside[0][1] == 0


# -- the unit page's scoped views (page_data.Reader.scope, catalog.scope_views) ----------------


def _unit_pages(root: Path, units: list[tuple], scoped: bool = True) -> list[str]:
    """The unit pages of `units` ((run, site, layer, unit)) as a fresh Reader renders them: through its
    scoped views, or (scoped False) through the catalog's views of every part, as before them."""
    from queries import page_data, pages
    from warehouse import catalog

    real = catalog.scope_views
    if not scoped:
        catalog.scope_views = lambda *args: False
    try:
        with warehouse.open(root) as wh:
            reader = page_data.Reader(wh)
            try:
                rendered = [pages.unit_page(reader, pages.Links(), *unit) for unit in units]
                assert len(reader._scopes) == (min(len({u[:3] for u in units}), page_data.SCOPES) if scoped else 0)
                return rendered
            finally:
                reader.close()
    finally:
        catalog.scope_views = real


@pytest.mark.parametrize(
    ("copied", "shared"),
    [(True, False), (False, True), (False, False)],
    ids=["small-tables-copied", "tokens-shared", "views-only"],
)
def test_unit_pages_read_through_scoped_views_as_through_every_part(pages_root, tmp_path, monkeypatch, copied, shared):
    """Every section of the unit page (the bench warehouse's: explanations, verdicts and scores too; the
    golden run's older parts, which lack later columns) is the same read through the views of one run,
    site and layer (the small tables copied into memory, the run's tokens in the copy its scopes share,
    or none) as through the catalog's, which list every part."""
    from queries import bench, page_data, pages
    from warehouse import catalog

    if not copied:  # the scope copies none, tokens included: they go to the shared copy where it fits
        monkeypatch.setattr(catalog, "SCOPE_COPY_BYTES", 0)
    if not shared:
        monkeypatch.setattr(catalog, "SHARED_TOKENS_BYTES", 0)

    shape = bench.Shape(rows=20000, layers=2, width=64, k=4)
    bench.build(tmp_path / "b", shape)
    with warehouse.open(tmp_path / "b") as wh:
        reader = page_data.Reader(wh)
        try:
            with reader.scope(shape.run_id, bench.SITE, 1):  # the views hold that layer's parts alone
                assert reader.rows("SELECT DISTINCT layer FROM token_neurons") == [{"layer": 1}]
                assert len(reader.rows("SELECT DISTINCT layer FROM neuron_stats")) == 1
                temporary = {
                    r["table_name"] for r in reader.rows("SELECT table_name FROM duckdb_tables() WHERE temporary")
                }
                assert ("neuron_stats" in temporary) == copied
                assert bool(_shared_copies(reader)) == shared
            assert len(reader.rows("SELECT DISTINCT layer FROM token_neurons")) == 2
            explained = reader.rows("SELECT layer, neuron FROM explanations ORDER BY ALL LIMIT 2")
        finally:
            reader.close()
    units = [(shape.run_id, bench.SITE, e["layer"], e["neuron"]) for e in explained] + [
        (shape.run_id, bench.SITE, 1, 7)
    ]
    assert _unit_pages(tmp_path / "b", units) == _unit_pages(tmp_path / "b", units, scoped=False)
    units = [("u", "mlp.act", 1, 3), ("u", "mlp.up", 0, 5), (RUN, "mlp.act", 1, 3), (RUN, "mlp.up", 1, 3)]
    expected = _unit_pages(pages_root, units, scoped=False)
    assert _unit_pages(pages_root, units) == expected
    with warehouse.open(pages_root) as wh:  # threads borrow the scopes' cursors in turn, as the server's do
        reader = page_data.Reader(wh)
        try:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                rendered = list(pool.map(lambda unit: pages.unit_page(reader, pages.Links(), *unit), units * 3))
            assert rendered == expected * 3 and len(reader._scopes) == len(units)
        finally:
            reader.close()


def _shared_copies(reader) -> list[str]:
    """The run-wide copies the Reader's scopes share (catalog.share)."""
    from warehouse import catalog

    with reader._whole():
        rows = reader.rows("SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [catalog.SHARED])
    return sorted(r["table_name"] for r in rows)


def test_scopes_of_a_run_share_one_copy_of_its_tokens(tmp_path, monkeypatch):
    """Two layers' scopes of one run read one copy of its tokens, the same rows in the same order as the
    catalog's view; it goes with the last scope of the run, and a scope of it made later copies afresh."""
    from queries import bench, page_data
    from warehouse import catalog

    monkeypatch.setattr(page_data, "SCOPES", 2)
    monkeypatch.setattr(catalog, "SCOPE_COPY_BYTES", 0)  # a run this small would be copied by each scope
    shape = bench.Shape(rows=20000, layers=2, width=64, k=4)
    bench.build(tmp_path / "b", shape)
    with warehouse.open(tmp_path / "b") as wh:
        reader = page_data.Reader(wh)
        try:
            everything = reader.fetch("SELECT * FROM tokens")
            for layer in (0, 1):
                with reader.scope(shape.run_id, bench.SITE, layer):
                    assert reader.fetch("SELECT * FROM tokens") == everything
                    temporary = reader.rows("SELECT table_name FROM duckdb_tables() WHERE temporary")
                    assert "tokens" not in {r["table_name"] for r in temporary}  # a view over the shared copy
            shared = _shared_copies(reader)
            assert len(shared) == 1 and reader._cursors == {shape.run_id: 2}
            with reader.scope("other", bench.SITE, 0):  # no such run: nothing scoped, nothing evicted
                pass
            assert _shared_copies(reader) == shared
            monkeypatch.setattr(page_data, "SCOPES", 0)
            with reader.scope(shape.run_id, bench.SITE, 0):  # its copy is read while the cursor is lent
                assert reader.fetch("SELECT * FROM tokens") == everything
            assert _shared_copies(reader) == [] and reader._cursors == {}  # every scope of the run evicted
            monkeypatch.setattr(page_data, "SCOPES", 2)
            with reader.scope(shape.run_id, bench.SITE, 1):
                assert reader.fetch("SELECT * FROM tokens") == everything
            assert _shared_copies(reader) == shared
        finally:
            reader.close()


def test_scoped_views_follow_runs_committed_deleted_and_quarantined(pages_root, tmp_path, tiny_lm_dir, monkeypatch):
    """The server's scoped views never show parts its catalog does not: a Reader whose warehouse changed
    reads through the catalog's views, and the server's next Reader (LiveReader) scopes the new parts."""
    from ingest.pipeline import ingest
    from ingest.sources import Document
    from queries import pages
    from queries.server import LiveReader
    from warehouse import catalog, maintenance
    from warehouse.errors import UnknownRun

    monkeypatch.setattr(catalog, "SCOPE_COPY_BYTES", 0)  # the runs' tokens go to the copy their scopes share
    root = tmp_path / "wh"
    shutil.copytree(pages_root, root)
    unit = ("u", "mlp.act", 1, 3)
    live = LiveReader(warehouse.open(root))
    before = live.current()
    first = pages.unit_page(before, pages.Links(), *unit)
    assert first == _unit_pages(root, [unit], scoped=False)[0]
    maintenance.delete_run(warehouse.open(root), "u")
    with pytest.raises(UnknownRun):
        pages.unit_page(live.current(), pages.Links(), *unit)
    # the Reader opened before the change scopes nothing new: the parts listed now are not its catalog's
    assert not catalog.scope_views(before._con.cursor(), before.wh.layout, RUN, "mlp.act", 1)
    ingest(root, str(tiny_lm_dir), sites=UNIT_SITES[:1], run_id="u", batch_size=2, max_length=16, device="cpu",
           progress=False, documents=[Document("c", "a run of the same name committed later, with other words")])  # fmt: skip
    copied = _shared_copies(before)
    again = pages.unit_page(live.current(), pages.Links(), *unit)
    assert again != first and again == _unit_pages(root, [unit], scoped=False)[0]
    # the run committed again under its name reads a copy of its new tokens, named after them
    assert copied and _shared_copies(live.current()) and not set(copied) & set(_shared_copies(live.current()))
    (root / "quarantine.json").write_text(json.dumps(["u"]))
    with pytest.raises(UnknownRun):
        pages.unit_page(live.current(), pages.Links(), *unit)
    reader = live.current()
    assert (
        pages.unit_page(reader, pages.Links(), RUN, "mlp.act", 1, 3)
        == _unit_pages(root, [(RUN, "mlp.act", 1, 3)], scoped=False)[0]
    )
    assert not catalog.scope_views(reader._con.cursor(), reader.wh.layout, "u", "mlp.act", 1)  # quarantined
    live.close()
