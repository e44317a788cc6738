"""`whq serve` and `whq export site`: every page type served on 127.0.0.1 from the golden
warehouse, opened in headless Chromium (charts drawn to SVG, shaded tokens, links), the SQL
box's refusals, unknown names as 404 pages, a bounded load test, and the static export
opened from file://. One screenshot per page type is kept under artifacts/ to look at."""

from __future__ import annotations

import concurrent.futures
import re
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
from .cli_runner import run_cli

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
RUN = "g"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(golden_root):
    """The app under uvicorn in a thread of this process, on a free port of 127.0.0.1."""
    import uvicorn

    from queries.server import create_app

    wh = warehouse.open(golden_root)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(wh), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
    wh.close()


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


def chromium(tmp_path: Path, url: str, shot: str | None = None) -> str:
    """The DOM after scripts ran (and a screenshot under artifacts/ when `shot` is named)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium to run the browser tests")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    if shot:
        ARTIFACTS.mkdir(exist_ok=True)
        target = ARTIFACTS / f"page_{shot}.png"
        subprocess.run([*flags, "--window-size=1300,2000", f"--screenshot={target}", url], capture_output=True, timeout=180)
        assert target.exists() and target.stat().st_size > 5_000
    return dom


def assert_charts_drawn(dom: str, n: int) -> None:
    assert dom.count('data-rendered="yes"') == n, "every chart rendered"
    assert not re.search(r'class="chart"[^>]*>chart failed', dom)
    assert dom.count("<svg") >= n and 'class="mark-' in dom


# -- pages in the browser ------------------------------------------------------------------------

def test_home_page(server, tmp_path, golden_root):
    dom = chromium(tmp_path, server + "/", shot="home")
    wh = warehouse.open(golden_root)
    n_tokens = wh.sql("SELECT n_tokens FROM runs WHERE run_id = ?", [RUN]).fetchall()[0][0]
    on_disk = sum(p["bytes"] for p in wh.manifest(RUN)["parts"])
    assert f"{n_tokens:,}" in dom and f"{on_disk:,}" in dom
    links = parse(dom).links
    assert f"/{RUN}/mlp.act" in links and f"/{RUN}/mlp.up" in links


def test_site_page(server, tmp_path):
    dom = chromium(tmp_path, server + f"/{RUN}/mlp.act?layer=1&sort=rate&order=desc", shot="site")
    assert_charts_drawn(dom, 3)
    page = parse(dom)
    units = [link for link in page.links if re.fullmatch(rf"/{RUN}/mlp\.act/1/\d+", link)]
    assert len(units) == 100  # one page of the 128 units
    wh_rates = [float(v) for v in re.findall(r'<td data-v="([0-9.e-]+)">', dom)[1::5][:5]]
    assert wh_rates == sorted(wh_rates, reverse=True)
    for link in {*units[:3], *(link for link in page.links if "page=2" in link)}:
        assert get(server + link.replace("&amp;", "&"))[0] == 200, link


def test_unit_page(server, tmp_path, golden_root):
    dom = chromium(tmp_path, server + f"/{RUN}/mlp.act/1/3", shot="unit")
    page = parse(dom)
    wh = warehouse.open(golden_root)
    top = wh.pl(f"SELECT * FROM top_contexts('{RUN}', 'mlp.act', 1, 3, k := 20, before := 24, after := 8)")
    sample = wh.pl(f"SELECT * FROM whq_examples('{RUN}', 'mlp.act', 1, 3, 'random', 10, 24, 8, 0)")
    expected = sum(len(t) for t in top["tokens"]) + sum(len(t) for t in sample["tokens"])
    assert len(page.tokens) == expected > 0
    fired = [t for t in page.tokens if "fire" in t["class"].split()]
    assert len(fired) == top.height + sample.height
    assert all("background-color: rgba(" in t["style"] for t in page.tokens)
    lens = wh.pl(f"SELECT * FROM neuron_logit_lens('{RUN}', 'mlp.act', 1, 3)")
    assert lens.height and all(f">{t}<" in dom.replace("&amp;", "&") for t in lens["token"].drop_nulls()[:3])
    assert f"/{RUN}/mlp.act/1/2" in page.links and f"/{RUN}/mlp.act/1/4" in page.links
    for link in page.links:
        if link.startswith("/"):
            assert get(server + link.replace("&amp;", "&"))[0] == 200, link


def test_token_search_page(server, tmp_path, golden_root):
    dom = chromium(tmp_path, server + f"/{RUN}/mlp.act/tokens?q=e", shot="tokens")
    units = [link for link in parse(dom).links if re.fullmatch(rf"/{RUN}/mlp\.act/\d+/\d+", link)]
    assert units
    wh = warehouse.open(golden_root)
    best = wh.sql(f"SELECT t.layer, t.neuron, count(*) AS n FROM tokens k JOIN token_neurons t USING (run_id, doc, pos) "
                  f"WHERE k.run_id = '{RUN}' AND t.site = 'mlp.act' AND k.piece = 'e' GROUP BY ALL "
                  f"ORDER BY n DESC, avg(t.value) DESC, t.layer, t.neuron LIMIT 1").fetchall()[0]
    assert units[0] == f"/{RUN}/mlp.act/{best[0]}/{best[1]}"
    assert get(server + units[0])[0] == 200


def test_sql_page_runs_queries_and_refuses_writes(server, tmp_path, capsys, monkeypatch, golden_root):
    query = urllib.parse.quote("SELECT layer, count(*) AS n FROM neuron_stats WHERE site = 'mlp.act' GROUP BY layer ORDER BY layer")
    dom = chromium(tmp_path, server + f"/sql?q={query}", shot="sql")
    assert dom.count("<tr>") == 5 and "download CSV" in dom
    status, csv = get(server + f"/sql.csv?q={query}")
    assert status == 200 and csv.splitlines() == ["layer,n", "0,128", "1,128", "2,128", "3,128"]
    for statement in ("COPY runs TO 'out.csv'", "ATTACH 'other.duckdb' AS o", "SELECT * FROM read_csv('/etc/passwd')"):
        status, text = get(server + "/sql?q=" + urllib.parse.quote(statement))
        code, _, err = run_cli(capsys, monkeypatch, "sql", golden_root, statement, "--read-only")
        assert status == 400 and code == 2
        shown = re.search(r'<p class="error">(.*?)</p>', text).group(1).replace("&#39;", "'")
        assert shown == err.strip(), statement  # the same one line as whq sql --read-only
        assert get(server + "/sql.csv?q=" + urllib.parse.quote(statement))[0] == 400


@pytest.mark.parametrize("path, names", [
    ("/nope/mlp.act", "its runs: g"),
    (f"/{RUN}/nope", "its sites: mlp.act, mlp.up"),
    (f"/{RUN}/mlp.act/9/0", "its layers: 0, 1, 2, 3"),
    (f"/{RUN}/mlp.act/1/128", "units 0..127"),
    (f"/{RUN}/mlp.act/1/3/extra", "start from the home page"),
])
def test_unknown_names_are_404_pages_naming_what_exists(server, path, names):
    status, text = get(server + path)
    assert status == 404 and names in text.replace("&#39;", "'")


def test_unit_page_under_load(server):
    """200 requests from 8 concurrent clients against the unit page: all 200 OK, same page."""
    urls = [server + f"/{RUN}/mlp.act/1/{i % 16}" for i in range(200)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(get, urls))
    assert [status for status, _ in answers] == [200] * 200
    same = [text for url, (_, text) in zip(urls, answers) if url.endswith("/1/3")]
    assert len(same) >= 1 and len(set(same)) == 1


# -- static export -------------------------------------------------------------------------------

def test_export_site_opens_from_file(golden_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "site"
    code, stdout, err = run_cli(capsys, monkeypatch, "export", "site", golden_root, "--run", RUN, "--site", "mlp.act",
                                "--out", out, "--layers", "1", "--layers", "2")
    assert code == 0, err
    assert "wrote 259 pages" in stdout  # index + 2 layer pages + 2 x 128 unit pages
    for page in out.rglob("*.html"):
        text = page.read_text()
        assert not re.search(r"<script[^>]+src=\"(https?:)?//|<link[^>]+href=", text), page
        for link in parse(text).links:
            assert (page.parent / link).resolve().exists(), (page, link)
    dom = chromium(tmp_path, (out / "index.html").as_uri(), shot="export_site")
    assert_charts_drawn(dom, 3)
    dom = chromium(tmp_path, (out / "2" / "0.html").as_uri())
    assert len(parse(dom).tokens) > 0 and 'rel="prev"' in dom  # runs back into layer 1
    code, _, err = run_cli(capsys, monkeypatch, "export", "site", golden_root, "--run", RUN, "--site", "mlp.act",
                           "--out", out, "--layers", "7")
    assert code == 2 and "has no layer 7" in err and len(err.strip().splitlines()) == 1
