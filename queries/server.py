"""The Starlette application behind `whq serve`: one route per page of queries/pages.py.

Routes (run and site names are path segments; a run may not be called `sql` or `_whq`):

    /                                   home: the runs
    /{run}/{site}?layer=&sort=&order=&page=   run/site: layer summary, histograms, units table
    /{run}/{site}/{layer}/{unit}        unit page
    /{run}/{site}/tokens?q=             token search
    /{run}/{site}/explanations?q=       units found by what their explanation says
    /sql?q=&token=   /sql.csv?q=&token= read-only SQL box and its CSV download
    /_whq/vega.js                       vega + vega-lite + vega-embed (vl-convert's bundle)

Handlers are plain functions, so Starlette runs them in its thread pool; an unknown run,
site, layer or unit answers 404 with a page naming what exists, a bad parameter 400.

Every web page the user's browser opens can send requests to a server on 127.0.0.1, and
though it cannot read the answers, it can time them (a query whose cost depends on a
document's text reads that text bit by bit) or keep the server busy. So `Guard`, one check
in front of every route, answers only:
- requests addressed to this server's own names (the Host header), against DNS rebinding;
- on the SQL endpoints, same-origin requests (Sec-Fetch-Site, Origin) that carry the
  per-launch token of the URL `whq serve` prints, as Jupyter does;
- on the browsing pages, same-origin requests and cross-site top-level navigations (a link
  from a notebook or a chat still opens a page). They stay open without the token: they
  run the macros with fixed costs on the names in the URL, and what they show cannot be
  read by another origin. A page opened with the token carries it in its links, so the
  SQL box stays one click away.
The warehouse may change under the server (`LiveReader`): a run committed later is served,
a deleted run answers 404, and the other runs' pages keep working.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import os
import secrets
import socket
import threading

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from warehouse import catalog
from warehouse.display import csv_text
from warehouse.errors import BadInput, NotFound, QueryError, UnknownRun, WarehouseError

from . import page_data, pages

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SQL_PATHS = ("/sql", "/sql.csv")
SECURITY_HEADERS = {  # no other site may frame the pages, nor learn a URL (with its token) through Referer
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'",
    "referrer-policy": "same-origin",
    "x-content-type-options": "nosniff",
}


def new_token() -> str:
    return secrets.token_urlsafe(24)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (port 0: any free port); BadInput naming the option to fix."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise BadInput(f"--port {port} must be a TCP port in 0..65535 (0 picks a free one)")
    if not host or host != host.strip() or any(c in host for c in "/[]@ "):
        raise BadInput(f"--host {host!r} must be an address or a name of this machine, e.g. 127.0.0.1, ::1 or 0.0.0.0")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        reason = err.strerror if isinstance(err, socket.gaierror) else "not a valid name"
        raise BadInput(
            f"--host {host!r} is not an address or a name of this machine ({reason}): use 127.0.0.1, ::1 or 0.0.0.0"
        ) from None
    try:
        return socket.create_server(address[:2], family=family, dualstack_ipv6=False)
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        fix = {
            errno.EADDRINUSE: "pick another port with --port",
            errno.EACCES: "pick a port above 1023 with --port",
            errno.EADDRNOTAVAIL: "give an address of this machine with --host",
        }.get(err.errno, "pick another --host or --port")
        raise BadInput(f"cannot listen on {host}:{port}: {reason}; {fix}") from None


def url_of(sock: socket.socket, token: str | None = None) -> str:
    """The URL of the address `sock` really listens on (with the token the SQL box needs)."""
    address, port = sock.getsockname()[:2]
    shown = f"[{address}]" if ":" in address else address
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def allowed_hosts(sock: socket.socket, host: str) -> list[str]:
    """The Host names to answer: any for a wildcard address, else the loopback names and the address listened on."""
    address = sock.getsockname()[0]
    if ipaddress.ip_address(address).is_unspecified:
        return ["*"]
    return sorted({*LOOPBACK_NAMES, host.lower(), address})


def _host_name(header: str) -> str:
    """The name of a Host header without its port: '[::1]:8050' → '::1', 'localhost:8050' → 'localhost'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def refusal(scope: dict, hosts: list[str], token: str) -> tuple[int, str] | None:
    """(status, one line) when the request must not be answered, None when it may be (see the module doc)."""
    headers = Headers(scope=scope)
    host = headers.get("host", "")
    if "*" not in hosts and _host_name(host) not in hosts:
        return 400, f"this server answers requests addressed to {', '.join(hosts)}, not {host!r}"
    site = headers.get("sec-fetch-site")
    origin = headers.get("origin")
    foreign_origin = origin is not None and origin != f"{scope.get('scheme', 'http')}://{host}"
    cross = foreign_origin or site in ("cross-site", "same-site")
    if scope["path"] in SQL_PATHS:
        if cross:
            return 403, "the SQL box answers only its own pages, not requests sent by another site"
        if not valid_token(Request(scope).query_params.get("token"), token):
            return 403, "the SQL box needs the token of the URL `whq serve` printed: open that URL"
    elif cross:
        navigation = headers.get("sec-fetch-mode") == "navigate" and headers.get("sec-fetch-dest") == "document"
        if not navigation or foreign_origin:
            return 403, "this server answers other sites' links, not requests their pages send"
    return None


def valid_token(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


class Guard:
    """ASGI middleware: `refusal` in front of every route, and SECURITY_HEADERS on every answer."""

    def __init__(self, app, hosts: list[str], token: str):
        self.app, self.hosts, self.token = app, hosts, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = refusal(scope, self.hosts, self.token)
        if refused is not None:
            status, line = refused
            return await PlainTextResponse(line + "\n", status_code=status, headers=SECURITY_HEADERS)(
                scope, receive, send
            )

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    *((k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class LiveReader:
    """The Reader of the warehouse as it is now: reopened when a run was committed, deleted, repaired
    or quarantined since the last request (catalog.fingerprint changed); requests in flight finish on
    the Reader they started with."""

    def __init__(self, wh):
        self.root = wh.root
        self._lock = threading.Lock()
        self._fingerprint = catalog.fingerprint(wh.layout)
        self._reader = page_data.Reader(wh)

    def current(self) -> page_data.Reader:
        import warehouse

        with self._lock:
            try:
                now = catalog.fingerprint(self._reader.wh.layout)
            except OSError:  # a manifest went away while it was listed: reopen, and look again next time
                now = None
            if now is None or now != self._fingerprint:
                # a fresh Warehouse rebuilds the catalog and forgets the guarded connections of the old one
                self._reader = page_data.Reader(warehouse.open(self.root))
                self._fingerprint = now
            return self._reader

    def close(self) -> None:
        self._reader.close()


def create_app(wh, allowed_hosts: list[str] | None = None, token: str | None = None, limits=None) -> Starlette:
    """The app; `allowed_hosts` are the Host headers it answers (default: the loopback names), so a
    web page elsewhere cannot read the warehouse through DNS rebinding; ["*"] answers any. `token`
    (the app's `.token`; a new one when None) opens the SQL endpoints; `limits` (safesql.SqlLimits;
    its defaults when None) bound their queries."""
    live = LiveReader(wh)
    token = token or new_token()

    def links_for(request: Request) -> pages.Links:
        given = request.query_params.get("token")
        return pages.Links(token=given if valid_token(given, token) else None)

    def page(render):
        def endpoint(request: Request) -> Response:
            links = links_for(request)
            try:
                return HTMLResponse(render(request, live.current(), links))
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

    def home(request, reader, links) -> str:
        return pages.home_page(reader, links)

    def site(request, reader, links) -> str:
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

    def unit(request, reader, links) -> str:
        p = request.path_params
        return pages.unit_page(reader, links, p["run"], p["site"], integer(request, "layer"), integer(request, "unit"))

    def tokens(request, reader, links) -> str:
        p = request.path_params
        return pages.tokens_page(reader, links, p["run"], p["site"], request.query_params.get("q", "").strip())

    def explanations(request, reader, links) -> str:
        p = request.path_params
        return pages.explanations_page(reader, links, p["run"], p["site"], request.query_params.get("q", "").strip())

    def sql(request: Request) -> Response:
        body, status = pages.sql_page(live.current(), links_for(request), request.query_params.get("q", ""), limits)
        return HTMLResponse(body, status_code=status)

    def sql_csv(request: Request) -> Response:
        try:
            text = csv_text(pages.sql_result(live.current(), request.query_params.get("q", ""), limits))
        except QueryError as err:
            return PlainTextResponse(f"error: {' '.join(str(err).split())}\n", status_code=400)
        return Response(text, media_type="text/csv", headers={"content-disposition": 'attachment; filename="whq.csv"'})

    def vega(request: Request) -> Response:
        return Response(pages.vega_bundle(), media_type="text/javascript", headers={"cache-control": "max-age=86400"})

    def missing(request: Request, exc) -> Response:
        return HTMLResponse(
            pages.missing_page(links_for(request), f"no page at {request.url.path}: start from the home page /"),
            status_code=404,
        )

    def unavailable(request: Request, exc: WarehouseError) -> Response:
        """The warehouse could not be read (reopened mid-repair, a damaged manifest): its one line, 503."""
        return HTMLResponse(pages.missing_page(links_for(request), " ".join(str(exc).split())), status_code=503)

    routes = [
        Route("/", page(home)),
        Route("/sql", sql),
        Route("/sql.csv", sql_csv),
        Route("/_whq/vega.js", vega),
        Route("/{run}/{site}", page(site)),
        Route("/{run}/{site}/tokens", page(tokens)),
        Route("/{run}/{site}/explanations", page(explanations)),
        Route("/{run}/{site}/{layer}/{unit}", page(unit)),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        live.close()

    app = Starlette(routes=routes, exception_handlers={404: missing, WarehouseError: unavailable}, lifespan=lifespan)
    return Guard(app, allowed_hosts or list(LOOPBACK_NAMES), token)
