"""Degenerate runs: every page, export and macro answers (rows, an empty table, or one line naming
what exists or the fix), never a 500 or a traceback.

The warehouse holds run 'empty', whose documents are all empty (no token: its sites never learned
their width and have no statistics), and run 'cold': layers where no unit fires (threshold above
every value, so no unit has an example), a top-1 site where most units never fire, a site that kept
only the last token (`last`) and a NAG site. Beside them the golden run 'g', captured before `sum_pos` existed: its selectivity can be
negative, whose logarithm the site page's histogram took (a NaN cast error).
"""

from __future__ import annotations

import html
import re
import shutil

import duckdb
import pytest
from starlette.testclient import TestClient

import warehouse
from warehouse.errors import WarehouseError

COMMON = {"batch_size": 2, "max_length": 16, "device": "cpu", "progress": False}
COLD_SITES = [
    "mlp.act:threshold=1000,examples=3,hist,quantiles=4,similar=4",
    "mlp.up:topk=1,examples=2",
    "resid.out:last",
    "mlp.down:nag=3",
]
# What a macro may answer instead of rows: the one-line refusals naming what exists or the fix.
REFUSALS = re.compile(r"re-ingest with --site|has no (NAG )?site|kept no|kept neither")


@pytest.fixture(scope="module")
def degenerate_root(golden_root, tiny_lm_dir, tmp_path_factory):
    from ingest.pipeline import ingest
    from ingest.sources import Document

    root = tmp_path_factory.mktemp("degenerate") / "wh"
    shutil.copytree(golden_root, root)
    empty = [Document("e0", ""), Document("e1", "")]
    ingest(root, str(tiny_lm_dir), sites=[COLD_SITES[0], "resid.out:last"], documents=empty, run_id="empty", **COMMON)
    texts = [Document("d0", "hello world, a short text"), Document("d1", "another one here")]
    ingest(root, str(tiny_lm_dir), sites=COLD_SITES, documents=texts, run_id="cold", logit_lens=True, **COMMON)
    return root


@pytest.fixture(scope="module")
def client(degenerate_root):
    from queries.server import create_app

    wh = warehouse.open(degenerate_root)
    with TestClient(create_app(wh, token="t"), base_url="http://127.0.0.1:8050") as client:
        yield client
    wh.close()


def _sites(root) -> list[tuple]:
    wh = warehouse.open(root)
    try:
        return wh.sql("SELECT run_id, site, layers, width FROM sites ORDER BY ALL").fetchall()
    finally:
        wh.close()


def test_the_runs_are_degenerate(degenerate_root):
    """The fixture holds what this file claims: no token, no firing, no statistics."""
    wh = warehouse.open(degenerate_root)
    assert wh.sql("SELECT n_tokens FROM runs WHERE run_id = 'empty'").fetchall() == [(0,)]
    assert wh.sql("SELECT DISTINCT width FROM sites WHERE run_id = 'empty'").fetchall() == [(None,)]
    fired = "SELECT coalesce(sum(n_fired), 0) FROM neuron_stats WHERE run_id = 'cold' AND site = ?"
    assert wh.sql(fired, ["mlp.act"]).fetchall() == [(0,)]
    assert wh.sql("SELECT count(*) FROM neuron_stats WHERE run_id = 'empty'").fetchall() == [(0,)]  # no statistics
    never = "SELECT count(*) FROM neuron_stats WHERE run_id = 'cold' AND site = 'mlp.up' AND n_fired = 0"
    assert wh.sql(never).fetchall()[0][0] > 0
    wh.close()


def _page_paths(root) -> list[str]:
    paths = ["/", "/sql?token=t&q=SELECT%20*%20FROM%20runs"]
    for run, site, layers, width in _sites(root):
        paths += [f"/{run}/{site}", f"/{run}/{site}?sort=kurtosis&order=desc", f"/{run}/{site}/tokens?q=hello"]
        for layer in layers:
            paths += [f"/{run}/{site}?layer={layer}&sort=selectivity", f"/{run}/{site}/{layer}/0"]
            paths += [f"/{run}/{site}/{layer}/{(width or 1) - 1}"]
    return paths


def test_every_page_answers(client, degenerate_root):
    for path in _page_paths(degenerate_root):
        response = client.get(path)
        text = html.unescape(response.text)
        if response.status_code == 404:  # only the units of a run that held no token
            assert "has no units: the run's documents held no token" in text, path
            assert re.fullmatch(r"/empty/[^/]+/\d+/0", path), path
        else:
            assert response.status_code == 200 and 'class="error"' not in text, path


def test_pages_say_what_is_missing(client):
    site = html.unescape(client.get("/empty/mlp.act").text)
    assert "0 units on layers 0, 1, 2, 3" in site and "<tbody>" in site
    unit = html.unescape(client.get("/cold/mlp.act/2/5").text)
    assert "This unit never fired: no firing examples." in unit
    unit = html.unescape(client.get("/cold/resid.out/0/0").text)
    assert "This site kept no examples: re-ingest with --site resid.out:last,examples=20." in unit
    assert client.get("/cold/mlp.act/tokens?q=zzzz").status_code == 200


def test_a_run_captured_before_sum_pos_has_its_site_page(client):
    """The golden run's selectivity is max / mean, negative on some units: the log histogram puts them in bin 0."""
    for layer in range(4):
        response = client.get(f"/g/mlp.act?layer={layer}")
        assert response.status_code == 200 and 'class="error"' not in response.text


@pytest.mark.parametrize("export", ["site", "neuronpedia", "features"])
def test_every_export_answers(degenerate_root, tmp_path, export):
    from queries.export import write_features
    from queries.neuronpedia import write_neuronpedia
    from queries.site_export import write_site

    write = {"site": write_site, "neuronpedia": write_neuronpedia, "features": write_features}[export]
    wh = warehouse.open(degenerate_root)
    for run, site, layers, width in _sites(degenerate_root):
        out = tmp_path / f"{run}-{site}"
        try:
            write(wh, run, site, out)
        except WarehouseError as err:  # features need examples: the line names the fix
            assert export == "features" and "re-ingest with --site" in str(err) and "\n" not in str(err)
            continue
        assert any(out.rglob("*")), (run, site)
        if export == "site":
            pages = list(out.rglob("*.html"))
            assert len(pages) == 1 + len(layers) + len(layers) * (width or 0), (run, site)
    wh.close()


ARGUMENTS = {
    "run": "{run}",
    "site": "{site}",
    "layer": 0,
    "neuron": 0,
    "unit": 0,
    "k": 5,
    "before": 3,
    "after": 2,
    "n": 3,
    "seed": 0,
    "text": "hello",
    "bins": 10,
    "target_run": "{run}",
    "pool_run": "{run}",
}


def test_every_unit_macro_answers(degenerate_root):
    """Every macro that takes a run and site, on every site of both runs: rows (maybe none) or a refusal naming the fix."""
    con = warehouse.open(degenerate_root).connect()
    macros = con.execute(
        "SELECT function_name, parameters FROM duckdb_functions() WHERE database_name = current_database() "
        "AND function_type = 'table_macro' AND NOT starts_with(function_name, 'whq_') ORDER BY 1"
    ).fetchall()
    called = set()
    for name, params in macros:
        given = []
        for p in params:  # the leading parameters this test knows how to fill
            if p not in ARGUMENTS:
                break
            given.append(p)
        if "site" not in given:
            continue
        for run, site, _, _ in _sites(degenerate_root):
            args = [ARGUMENTS[p].format(run=run, site=site) if isinstance(ARGUMENTS[p], str) else ARGUMENTS[p]
                    for p in given]  # fmt: skip
            try:
                con.execute(f"SELECT * FROM {name}({', '.join('?' * len(args))})", args).fetchall()
            except duckdb.BinderException:  # it needs arguments beyond a unit's (nag_quality's quality column)
                break
            except duckdb.InvalidInputException as err:
                assert REFUSALS.search(str(err)) and "\n" not in str(err).strip(), (name, run, site, str(err))
            called.add(name)
    assert {"unit_stats", "layer_summary", "selectivity_histogram", "rate_histogram", "top_contexts",
            "quantile_examples", "similar_units", "unit_histogram", "units_for_token", "nag_profile"} <= called  # fmt: skip
