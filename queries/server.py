"""The Starlette application behind `whq serve`: one route per page of queries/pages.py.

Routes (run and site names are path segments; a run may not be called `sql` or `_whq`):

    /                                   home: the runs
    /{run}/{site}?layer=&sort=&order=&page=   run/site: layer summary, histograms, units table
    /{run}/{site}/{layer}/{unit}        unit page
    /{run}/{site}/tokens?q=             token search
    /sql?q=   /sql.csv?q=               read-only SQL box and its CSV download
    /_whq/vega.js                       vega + vega-lite + vega-embed (vl-convert's bundle)

Handlers are plain functions, so Starlette runs them in its thread pool; an unknown run,
site, layer or unit answers 404 with a page naming what exists, a bad parameter 400.
"""

from __future__ import annotations

import contextlib

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from warehouse.errors import BadInput, NotFound, QueryError, UnknownRun

from . import page_data, pages


def create_app(wh, allowed_hosts: list[str] | None = None) -> Starlette:
    """The app; `allowed_hosts` are the Host headers it answers (default: the loopback names), so a
    web page elsewhere cannot read the warehouse through DNS rebinding; ["*"] answers any."""
    reader = page_data.Reader(wh)
    links = pages.Links()

    def page(render):
        def endpoint(request: Request) -> Response:
            try:
                return HTMLResponse(render(request))
            except (UnknownRun, NotFound) as err:
                return HTMLResponse(pages.missing_page(links, " ".join(str(err).split())), status_code=404)
            except (BadInput, QueryError) as err:
                return HTMLResponse(pages.missing_page(links, " ".join(str(err).split())), status_code=400)

        return endpoint

    def integer(request: Request, name: str, default: int | None = None) -> int | None:
        raw = request.path_params.get(name, request.query_params.get(name))
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise BadInput(f"{name} must be an integer, not {raw!r}") from None

    def site(request: Request) -> str:
        p, q = request.path_params, request.query_params
        return pages.site_page(
            reader,
            links,
            p["run"],
            p["site"],
            integer(request, "layer"),
            q.get("sort", "neuron"),
            q.get("order", "asc"),
            integer(request, "page", 1),
        )

    def unit(request: Request) -> str:
        p = request.path_params
        return pages.unit_page(reader, links, p["run"], p["site"], integer(request, "layer"), integer(request, "unit"))

    def tokens(request: Request) -> str:
        p = request.path_params
        return pages.tokens_page(reader, links, p["run"], p["site"], request.query_params.get("q", "").strip())

    def sql(request: Request) -> Response:
        body, status = pages.sql_page(reader, links, request.query_params.get("q", ""))
        return HTMLResponse(body, status_code=status)

    def sql_csv(request: Request) -> Response:
        try:
            text = pages.csv_text(pages.sql_result(reader, request.query_params.get("q", "")))
        except QueryError as err:
            return PlainTextResponse(f"error: {' '.join(str(err).split())}\n", status_code=400)
        return Response(text, media_type="text/csv", headers={"content-disposition": 'attachment; filename="whq.csv"'})

    def vega(request: Request) -> Response:
        return Response(pages.vega_bundle(), media_type="text/javascript", headers={"cache-control": "max-age=86400"})

    def missing(request: Request, exc) -> Response:
        return HTMLResponse(
            pages.missing_page(links, f"no page at {request.url.path}: start from the home page /"), status_code=404
        )

    routes = [
        Route("/", page(lambda request: pages.home_page(reader, links))),
        Route("/sql", sql),
        Route("/sql.csv", sql_csv),
        Route("/_whq/vega.js", vega),
        Route("/{run}/{site}", page(site)),
        Route("/{run}/{site}/tokens", page(tokens)),
        Route("/{run}/{site}/{layer}/{unit}", page(unit)),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        reader.close()

    hosts = allowed_hosts or ["127.0.0.1", "localhost", "::1"]
    return Starlette(
        routes=routes,
        exception_handlers={404: missing},
        lifespan=lifespan,
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
    )
