"""`whq serve` as a hostile page and a changing warehouse meet it, on the real server over loopback.

Every web page the user's browser opens can send requests to 127.0.0.1: the SQL endpoints
answer only same-origin requests carrying the per-launch token; the browsing pages answer
other sites' links but not their pages' subresource requests. A result is bounded in bytes,
not only rows (SQL box, CSV download, `whq sql --read-only`). Every server option is checked,
and the URL printed is the address really listened on (IPv6 included). Runs deleted, added and
repaired while the server runs are seen without a restart.
"""

from __future__ import annotations

import html
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from .cli_runner import run_cli
from .test_pages import TOKEN, serving

HUGE = "SELECT repeat('<', 50000000) FROM range(6)"  # 300 MB in six rows of a 60-byte request
SLOW = "SELECT count(*) FROM range(1000000000000)"  # would run until the timeout
WHQ = [sys.executable, "-c", "from warehouse.cli import main; main()"]


def fetch(url: str, headers: dict | None = None) -> tuple[int, str, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


def sql_url(server: str, query: str, token: str | None = TOKEN, csv: bool = False) -> str:
    params = {"q": query, **({"token": token} if token is not None else {})}
    return f"{server}/sql{'.csv' if csv else ''}?{urllib.parse.urlencode(params)}"


@pytest.fixture(scope="module")
def served(golden_root):
    with serving(golden_root) as url:
        yield url


# -- other sites ---------------------------------------------------------------------------------

CROSS_SITE = [
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"},  # <img src=...>
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"},  # a link
    {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"},  # another port's page
    {"Origin": "http://attacker.example"},  # fetch() from a browser without Sec-Fetch headers
    {"Origin": "null"},  # a sandboxed frame
]


@pytest.mark.parametrize("csv", [False, True], ids=["sql", "sql.csv"])
@pytest.mark.parametrize("headers", CROSS_SITE, ids=lambda h: "/".join(h.values()))
def test_sql_endpoints_refuse_other_sites_before_running_anything(served, headers, csv):
    """The timing attack of the issue: a slow query sent by another site is refused at once, token or not."""
    start = time.monotonic()
    status, text, _ = fetch(sql_url(served, SLOW, csv=csv), headers)
    assert status == 403 and text == "the SQL box answers only its own pages, not requests sent by another site\n"
    assert time.monotonic() - start < 5  # the query never ran (it would take the 30 s timeout)


@pytest.mark.parametrize("csv", [False, True], ids=["sql", "sql.csv"])
@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x", TOKEN.upper()])
def test_sql_endpoints_need_the_launch_token(served, token, csv):
    status, text, _ = fetch(sql_url(served, "SELECT 42 AS answer", token, csv))
    assert status == 403 and text == "the SQL box needs the token of the URL `whq serve` printed: open that URL\n"


@pytest.mark.parametrize("headers", [{}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}])
def test_sql_endpoints_answer_their_own_pages_with_the_token(served, headers):
    port = urllib.parse.urlparse(served).port
    same = {**headers, **({"Origin": f"http://127.0.0.1:{port}"} if headers else {})}
    status, text, _ = fetch(sql_url(served, "SELECT 42 AS answer"), same)
    assert status == 200 and "<td>42</td>" in text
    assert f'name="token" value="{TOKEN}"' in text  # the form sends it again
    status, text, _ = fetch(sql_url(served, "SELECT 42 AS answer", csv=True), same)
    assert (status, text) == (200, "answer\n42\n")


def test_browsing_pages_answer_links_from_other_sites_but_not_their_requests(served):
    """A link from a notebook opens a page; an <img>, fetch() or frame of another site gets nothing."""
    for path in ("/", "/g/mlp.act/1/3", "/g/mlp.act/tokens?q=the"):
        status, _, headers = fetch(served + path, CROSS_SITE[1])
        assert status == 200, path
        assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "same-origin"
        for refused in (CROSS_SITE[0], CROSS_SITE[2], CROSS_SITE[3], CROSS_SITE[4]):
            status, text, _ = fetch(served + path, refused)
            assert status == 403 and text == "this server answers other sites' links, not requests their pages send\n"
        frame = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}
        assert fetch(served + path, frame)[0] == 403


def test_pages_opened_with_the_token_carry_it_to_the_sql_box(served):
    status, text, _ = fetch(f"{served}/?token={TOKEN}")
    assert status == 200 and f'href="/sql?token={TOKEN}"' in text and f"/g/mlp.act?token={TOKEN}" in text
    status, text, _ = fetch(f"{served}/?token=guess")  # a wrong token is not echoed into the links
    assert status == 200 and "token=" not in text and 'href="/sql"' in text


@pytest.mark.parametrize(
    "host, answered",
    [
        ("127.0.0.1:{port}", True),
        ("localhost:{port}", True),
        ("[::1]:{port}", True),
        ("LOCALHOST", True),
        ("attacker.example", False),
        ("attacker.example:{port}", False),
        ("127.0.0.1.attacker.example", False),
        ("[::1", False),
        ("", False),
    ],
)
def test_host_header_names_are_parsed_with_ipv6(served, host, answered):
    port = urllib.parse.urlparse(served).port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host.format(port=port)}\r\nConnection: close\r\n\r\n".encode())
        head = sock.makefile("rb").readline().decode()
    assert head.split()[1] == ("200" if answered else "400"), host


# -- hostile URLs: each answers one line, never a 500 -------------------------------------------

HOSTILE = [
    ("/g/mlp.act?layer=99999999999999999999999", 404, "has no layer 99999999999999999999999; its layers: 0, 1, 2, 3"),
    ("/g/mlp.act?layer=1.5", 400, "layer must be an integer, not '1.5'"),
    ("/g/mlp.act?layer=%00", 400, "layer must be an integer, not '\\x00'"),
    ("/g/mlp.act?page=0", 404, "has pages 1..2; there is no page 0"),
    ("/g/mlp.act?sort=neuron;DROP", 400, "sort by one of neuron, rate, mean"),
    ("/g/mlp.act?order=asc%20--", 400, "sort by one of neuron, rate, mean"),
    ("/g/mlp.act/1/-1", 404, "has units 0..127; there is no unit -1"),
    ("/g/mlp.act/1/0x10", 400, "unit must be an integer, not '0x10'"),
    ("/%00/mlp.act", 404, "no run '\\x00' in this warehouse; its runs: g"),
    ("/g/%00", 404, "run 'g' has no site '\\x00'; its sites: mlp.act, mlp.up"),
    ("/g/..%2F..%2F", 404, "no page at /g/../../: start from the home page /"),
    ("/g/mlp.act/tokens?q=%00", 200, None),
    ("/g/mlp.act/tokens?q=%E2%80%AE", 200, None),
    ("/g/mlp.act/tokens?q=" + "a" * 20000, 200, None),
    ("/sql?q=" + "(" * 3000, 400, "it is nested too deeply; flatten it (WITH ...)"),
    ("/sql?q=SELECT%20INTERVAL%202%20DAY%20AS%20i", 200, "<td>2 days</td>"),
    ("/sql?q=SELECT%20%27infinity%27::TIMESTAMP%20AS%20t", 200, "<td>infinity</td>"),
    ("/sql.csv?q=SELECT%20%27infinity%27::TIMESTAMP%20AS%20t", 200, "infinity"),
    ("/sql?q=SELECT%20%27%3C/script%3E%3Cscript%3Ealert(1)%3C/script%3E%27%20AS%20x", 200, "<td>&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;</td>"),
]  # fmt: skip


@pytest.mark.parametrize("path, status, shown", HOSTILE, ids=[h[0][:40] for h in HOSTILE])
def test_hostile_urls_answer_in_one_line(served, path, status, shown):
    if path.startswith("/sql"):
        path += f"&token={TOKEN}"
    answer, text, _ = fetch(served + path)
    assert answer == status, text[:300]
    if shown is not None and status != 200:
        line = re.search(r'<p class="error">(.*?)</p>', text)
        line = html.unescape(line.group(1)) if line else text.strip()
        assert shown in line and "\n" not in line, line
    elif shown is not None:
        assert shown in text


# -- bytes, not rows -------------------------------------------------------------------------------

BYTES_LINE = (
    "the result holds more than {limit} bytes (stopped fetching): select fewer or shorter values "
    "(LIMIT, left(text, 200)), or raise --max-bytes"
)


def test_the_sql_box_and_csv_bound_the_bytes_of_a_result(served):
    status, text, _ = fetch(sql_url(served, HUGE))
    error = re.search(r'<p class="error">(.*?)</p>', text).group(1)
    assert status == 400 and error == "error: " + BYTES_LINE.format(limit="256,000,000")
    assert len(text) < 100_000  # was a 1.2 GB page
    status, text, _ = fetch(sql_url(served, HUGE, csv=True))
    assert (status, text) == (400, "error: " + BYTES_LINE.format(limit="256,000,000") + "\n")


def test_a_long_value_is_cut_in_the_table_and_whole_in_the_csv(served):
    query = "SELECT repeat('y', 5000) AS long, 'short' AS short"
    status, text, _ = fetch(sql_url(served, query))
    assert status == 200 and f"<td>{'y' * 1000}… (5,000 characters; the CSV download has them all)</td>" in text
    assert fetch(sql_url(served, query, csv=True))[1] == f"long,short\n{'y' * 5000},short\n"


def test_the_server_limits_are_options(golden_root):
    from warehouse.safesql import SqlLimits

    with serving(golden_root, limits=SqlLimits(max_bytes="1KB")) as url:
        status, text, _ = fetch(sql_url(url, "SELECT repeat('x', 2000)", csv=True))
        assert (status, text) == (400, "error: " + BYTES_LINE.format(limit="1,000") + "\n")
        assert fetch(sql_url(url, "SELECT 1 AS one", csv=True))[1] == "one\n1\n"


def test_whq_sql_read_only_bounds_the_bytes_in_memory(golden_root):
    """3 GB in a million 3 KB rows, all under the row cap given: held whole, the process peaked at 8.9 GB
    (measured); bounded, it stops fetching past 256 MB. The rows are short so that DuckDB's own chunks
    (2,048 rows per thread, outside whq's bound) stay a few MB and the peak measures what whq holds."""
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the forking process, so a
    # child of a large pytest process reported the parent's size
    measured = "import atexit, re, sys; atexit.register(lambda: print('peak', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1], file=sys.stderr)); "
    done = subprocess.run(
        [sys.executable, "-c", measured + WHQ[-1], "sql", str(golden_root), "--read-only", "--memory-limit", "500MB",
         "--max-rows", "1000000", "SELECT repeat('<', 3000) AS x FROM range(1000000)"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    error, peak = done.stderr.splitlines()
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert error == "error: " + BYTES_LINE.format(limit="256,000,000")
    assert int(peak.split()[1]) / 1024 < 900, f"whq sql --read-only peaked at {peak}"


def test_whq_sql_max_bytes_option(golden_root, capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, "sql", golden_root, "--read-only", "--max-bytes", "1KB",
                             "SELECT repeat('x', 2000)")  # fmt: skip
    assert (code, err) == (2, "error: " + BYTES_LINE.format(limit="1,000") + "\n")
    code, out, err = run_cli(capsys, monkeypatch, "sql", golden_root, "--read-only", "--max-bytes", "1MB",
                             "--format", "csv", "SELECT repeat('x', 2000) AS x")  # fmt: skip
    assert code == 0 and out.splitlines()[1] == "x" * 2000


# -- options and the address printed -------------------------------------------------------------


def _serve(golden_root, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*WHQ, "serve", str(golden_root), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_serve_on_ipv6_prints_the_address_it_listens_on(golden_root):
    """--host ::1 answered "Invalid host header" to every request; --port 0 printed port 0."""
    server = _serve(golden_root, "--host", "::1", "--port", "0")
    try:
        line = server.stdout.readline().strip()
        printed = re.fullmatch(r"serving .* at (http://\[::1\]:(\d+)/\?token=([\w-]+)) \(Ctrl-C stops\)", line)
        assert printed and printed.group(2) != "0", line
        base = f"http://[::1]:{printed.group(2)}"
        assert fetch(base + "/")[0] == 200 and fetch(base + "/g/mlp.act/1/3")[0] == 200
        status, text, _ = fetch(sql_url(base, "SELECT 7 AS seven", printed.group(3), csv=True))
        assert (status, text) == (200, "seven\n7\n")
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=60)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--port", "70000"], "--port 70000 must be a TCP port in 0..65535 (0 picks a free one)"),
        (["--port", "-1"], "--port -1 must be a TCP port in 0..65535 (0 picks a free one)"),
        (["--host", ""], "--host '' must be an address or a name of this machine, e.g. 127.0.0.1, ::1 or 0.0.0.0"),
        (["--host", "[::1]"], "--host '[::1]' must be an address or a name of this machine, e.g. 127.0.0.1, ::1 or 0.0.0.0"),
        (["--host", "http://127.0.0.1"], "--host 'http://127.0.0.1' must be an address or a name of this machine, e.g. 127.0.0.1, ::1 or 0.0.0.0"),
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' is not an address or a name of this machine"),
        (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1:0: Cannot assign requested address; give an address of this machine with --host"),
        (["--max-bytes", "lots"], "--max-bytes 'lots' must be a size such as 64MB or 1GB"),
        (["--max-bytes", "0MB"], "--max-bytes '0MB' must be a size such as 64MB or 1GB"),
        (["--timeout", "0"], "--timeout 0 must be a positive number of seconds"),
        (["--memory-limit", "much"], "--memory-limit 'much' must be a size such as 512MB or 4GB"),
    ],
)  # fmt: skip
def test_every_serve_option_is_checked_in_one_line(golden_root, capsys, monkeypatch, options, message):
    code, out, err = run_cli(capsys, monkeypatch, "serve", golden_root, "--port", "0", *options)
    assert code == 2 and err.startswith("error: " + message) and len(err.splitlines()) == 1, err


# -- a warehouse that changes while the server runs ----------------------------------------------


def test_runs_deleted_added_and_repaired_while_serving(golden_root, tmp_path, tiny_lm_dir, capsys, monkeypatch):
    from ingest.pipeline import ingest
    from ingest.sources import Document

    root = tmp_path / "wh"
    shutil.copytree(golden_root, root)
    ingest(root, str(tiny_lm_dir), sites=["mlp.act:topk=4,examples=3"], run_id="old", batch_size=2, max_length=16,
           device="cpu", progress=False, documents=[Document("a", "one small text"), Document("b", "and another")])  # fmt: skip
    with serving(root) as url:
        assert fetch(url + "/g/mlp.act/1/3")[0] == 200 and fetch(url + "/old/mlp.act/1/2")[0] == 200
        assert run_cli(capsys, monkeypatch, "runs", root, "--delete", "old")[0] == 0
        status, text, _ = fetch(url + "/old/mlp.act/1/2")
        assert status == 404 and "no run 'old' in this warehouse; its runs: g" in text.replace("&#39;", "'")
        assert fetch(url + "/g/mlp.act/1/3")[0] == 200  # untouched runs keep working
        ingest(root, str(tiny_lm_dir), sites=["mlp.act:topk=4,examples=3"], run_id="new", batch_size=2,
               max_length=16, device="cpu", progress=False, documents=[Document("c", "a run committed later")])  # fmt: skip
        status, text, _ = fetch(url + "/new/mlp.act/1/2")
        assert status == 200 and "new / mlp.act / layer 1 / unit 2" in text  # no restart
        assert fetch(sql_url(url, "SELECT run_id FROM runs ORDER BY run_id", csv=True))[1] == "run_id\ng\nnew\n"
        (root / "runs" / "new.json").write_text('{"run_id": "new", ')  # a torn manifest: one line, then `whq repair`
        status, text, _ = fetch(url + "/g/mlp.act/1/3")
        assert status == 503 and "whq repair" in html.unescape(re.search(r'<p class="error">(.*?)</p>', text).group(1))
        assert run_cli(capsys, monkeypatch, "repair", root)[0] == 0
        assert fetch(url + "/g/mlp.act/1/3")[0] == 200
