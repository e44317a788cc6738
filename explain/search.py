"""Search units by what their explanation says: the MiniLM embedding of the query, computed here
(SQL cannot run the model), passed to the search_explanations macro with the plain text."""

from __future__ import annotations

from .embed import embed


def search(wh, run: str, site: str, text: str, *, limit: int | None = None):
    """search_explanations(run, site, text) ranked by embedding similarity plus text match (a polars DataFrame)."""
    query = "SELECT * FROM search_explanations($run, $site, $text, query_embedding := $vector)"
    if limit is not None:
        query += f" LIMIT {int(limit)}"
    return wh.pl(query, {"run": run, "site": site, "text": text, "vector": embed([text])[0]})
