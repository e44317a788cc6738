"""Explanations and scores on the `whq serve` pages: the unit page's explanations with their scores,
shown examples and verdicts; the run/site page's sortable explanation and score columns; the
explanation search; a hostile explanation shown as text; pages of sites without explanations."""

from __future__ import annotations

import html
import re
import shutil
from html.parser import HTMLParser

import pytest
from markupsafe import escape
from starlette.testclient import TestClient

import warehouse
from explain import examples as ex
from explain.pipeline import Recipe, plan_explain, plan_score, run_plan
from queries.server import create_app

from .llm_server import ScriptedServer, completion, delphi_answers

RUN, SITE, LAYER = "r", "mlp.act", 3
RECIPE = Recipe(n_explain=3, n_test=4, n_non_activating=4)
SCORERS = ["detection", "fuzz", "intruder", "embedding"]
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> & plural'


def hostile_answers(body: dict, n: int):
    """delphi_answers, but the first explanation is one a steered model could write: markup and script."""
    if body["messages"][0]["content"].startswith("You are a meticulous AI researcher") and n == 0:
        return 200, completion(f"[EXPLANATION]: {HOSTILE}"), 0.0
    return delphi_answers(body, n)


@pytest.fixture(scope="module")
def explained_root(minilm_wh, tmp_path_factory):
    """The MiniLM warehouse with 3 units of mlp.act layer 3 explained (one hostile text) and scored."""
    root = tmp_path_factory.mktemp("explain-pages") / "wh"
    shutil.copytree(minilm_wh, root)
    wh = warehouse.open(root)
    with ScriptedServer(hostile_answers) as server:
        llm = f"openai:{server.url}:judge"
        chosen = ex.select_units(wh, RUN, SITE, [LAYER], None, 3)
        plan = plan_explain(wh, RUN, SITE, chosen, explainer="delphi", model="openai:judge", recipe=RECIPE)
        run_plan(wh, RUN, plan, llm=llm, concurrency=1, backoff_s=0.01)
        plan = plan_score(wh, RUN, SITE, [LAYER], scorers=SCORERS, model="openai:judge", recipe=RECIPE)
        run_plan(wh, RUN, plan, llm=llm, concurrency=1, backoff_s=0.01)
    wh.close()
    return root


@pytest.fixture(scope="module")
def client(explained_root):
    wh = warehouse.open(explained_root)
    with TestClient(create_app(wh, token="t"), base_url="http://127.0.0.1:8050") as test_client:
        yield test_client, wh
    wh.close()


class Table(HTMLParser):
    """The rows of the tables of a page with a given class: [[cell text, ...], ...] per table, and each
    row's class."""

    def __init__(self, cls: str):
        super().__init__()
        self.cls, self.tables, self.row_classes = cls, [], []
        self._depth = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and self.cls in (attrs.get("class") or "").split():
            self._depth = 1
            self.tables.append([])
        elif self._depth and tag == "tr":
            self.tables[-1].append([])
            self.row_classes.append(attrs.get("class"))
        elif self._depth and tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table" and self._depth:
            self._depth = 0
        elif tag == "td" and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables(page: str, cls: str) -> Table:
    parsed = Table(cls)
    parsed.feed(page)
    return parsed


def body_rows(parsed: Table) -> list[list[str]]:
    return [row for table in parsed.tables for row in table if row]  # header rows hold th, not td


def _explained(wh):
    return wh.sql(
        "SELECT neuron, explanation_id, text FROM explanations WHERE run_id = ? AND site = ? AND layer = ? ORDER BY neuron",
        [RUN, SITE, LAYER],
    ).fetchall()


def test_unit_page_shows_explanation_scores_examples_and_verdicts(client):
    test_client, wh = client
    for unit, explanation_id, text in _explained(wh):
        response = test_client.get(f"/{RUN}/{SITE}/{LAYER}/{unit}")
        assert response.status_code == 200
        page = response.text
        assert f"explanation {explanation_id}" in page
        assert str(escape(text)) in page
        scores = wh.sql(
            "SELECT scorer, model, metric, value FROM scores WHERE explanation_id = ? ORDER BY scorer, model, metric",
            [explanation_id],
        ).fetchall()
        shown_scores = body_rows(tables(page, "scores"))
        assert [tuple(r[:3]) for r in shown_scores] == [s[:3] for s in scores] and scores
        for row, (_, _, _, value) in zip(shown_scores, scores):
            assert row[3] == ("–" if value is None else f"{value:,.4g}")
        shown = wh.sql(
            "SELECT d.doc_id || ':' || x.pos FROM explanation_examples x JOIN documents d USING (run_id, doc) "
            "WHERE x.explanation_id = ? AND x.scorer IS NULL",
            [explanation_id],
        ).fetchall()
        assert sorted(r[3] for r in body_rows(tables(page, "shown"))) == sorted(r[0] for r in shown)
        verdicts = wh.sql(
            "SELECT scorer, verdict, doc_id || ':' || pos FROM scorer_verdicts(?, ?, ?, ?) ORDER BY ALL",
            [RUN, SITE, LAYER, unit],
        ).fetchall()
        marks = {"right": "✓ right", "wrong": "✗ wrong", "unparsable": "? unparsable", None: "–"}
        parsed = tables(page, "verdicts")
        rendered = sorted((r[0], r[5], r[6]) for r in body_rows(parsed))
        assert rendered == sorted((s, marks[v], at) for s, v, at in verdicts)
        assert {"✓ right", "✗ wrong"} <= {r[1] for r in rendered}  # the fixture's answers hold both verdicts
        row_classes = [c for c in parsed.row_classes if c]
        assert sorted(row_classes) == sorted(f"verdict-{v or 'none'}" for _, v, _ in verdicts)


def test_shown_example_context_holds_its_token(client):
    test_client, wh = client
    unit, explanation_id, _ = _explained(wh)[0]
    page = test_client.get(f"/{RUN}/{SITE}/{LAYER}/{unit}").text
    rows = wh.sql(
        "SELECT d.text, t.char_start, t.char_end FROM explanation_examples x JOIN documents d USING (run_id, doc) "
        "JOIN tokens t ON t.run_id = x.run_id AND t.doc = x.doc AND t.pos = x.pos "
        "WHERE x.explanation_id = ? AND x.scorer IS NULL",
        [explanation_id],
    ).fetchall()
    bolded = re.findall(r'<td class="l ctx">.*?<b>(.*?)</b>', page.split('class="shown"')[1].split("</table>")[0])
    assert sorted(bolded) == sorted(str(escape(text[a:b])) for text, a, b in rows)


def test_hostile_explanation_renders_as_text(client):
    test_client, wh = client
    hostile = [unit for unit, _, text in _explained(wh) if text == HOSTILE]
    assert len(hostile) == 1
    for path in (
        f"/{RUN}/{SITE}/{LAYER}/{hostile[0]}",
        f"/{RUN}/{SITE}?layer={LAYER}&sort=explanation",
        f"/{RUN}/{SITE}/explanations?q=plural",
    ):
        page = test_client.get(path).text
        assert "<script>alert" not in page and "<img src=x" not in page, path
        assert str(escape(HOSTILE)) in page, path


def test_site_page_sorts_by_explanation_and_score_columns(client):
    test_client, wh = client
    explained = {unit: text for unit, _, text in _explained(wh)}
    detection = dict(
        wh.sql(
            "SELECT neuron, max(detection) FROM explanation_scores(?, ?, ?) GROUP BY neuron", [RUN, SITE, LAYER]
        ).fetchall()
    )
    page = test_client.get(f"/{RUN}/{SITE}?layer={LAYER}&sort=detection&order=desc").text
    header = re.search(r'<table class="sortable units"><thead><tr>(.*?)</tr>', page, re.S).group(1)
    assert "sort=explanation" in header and "detection</a> ▼" in header and "simulation" not in header
    rows = body_rows(tables(page, "units"))
    top = [int(r[0]) for r in rows[: len(detection)]]
    assert top == sorted(detection, key=lambda u: (-detection[u], u))
    assert all(html.unescape(r[8]) == explained.get(int(r[0]), "") for r in rows)
    page = test_client.get(f"/{RUN}/{SITE}?layer={LAYER}&sort=explanation&order=asc").text
    first = [int(r[0]) for r in body_rows(tables(page, "units"))[: len(explained)]]
    assert first == sorted(explained, key=lambda u: (explained[u], u))


def test_explanation_search_finds_units_by_text(client):
    test_client, wh = client
    page = test_client.get(f"/{RUN}/{SITE}/explanations?q=THE WORD").text
    found = sorted(int(r[1]) for r in body_rows(tables(page, "hits")))
    expected = sorted(unit for unit, _, text in _explained(wh) if "the word" in text.lower())
    assert found == expected and found
    assert f"/{RUN}/{SITE}/{LAYER}/{found[0]}" in page and "text match" in page
    page = test_client.get(f"/{RUN}/{SITE}/explanations?q=nothing-says-this").text
    assert not body_rows(tables(page, "hits")) and "No explanation of this site contains" in page
    site = test_client.get(f"/{RUN}/{SITE}").text
    assert f"/{RUN}/{SITE}/explanations" in site


def test_pages_without_explanations_show_no_explanation_sections(client):
    test_client, wh = client
    explained = {unit for unit, _, _ in _explained(wh)}
    unexplained = next(u for u in range(100) if u not in explained)
    page = test_client.get(f"/{RUN}/{SITE}/{LAYER}/{unexplained}").text
    assert "Explanation" not in page and 'class="verdicts"' not in page
    other = test_client.get("/r/mlp.up").text  # a site of the run that was not explained
    assert "sort=explanation" not in other and "explanation search" not in other
    assert test_client.get("/r/mlp.up?sort=detection").status_code == 400
    search = test_client.get("/r/mlp.up/explanations?q=word")
    assert search.status_code == 200 and "has an explanation yet" in search.text


@pytest.mark.parametrize(
    "path",
    ["/nope/mlp.act/explanations?q=a", "/r/nope/explanations?q=a", f"/r/mlp.act/{LAYER}/99999", "/r/mlp.act/99/0"],
)
def test_unknown_names_answer_404(client, path):
    test_client, _ = client
    assert test_client.get(path).status_code == 404
