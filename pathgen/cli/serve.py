"""``pathgen serve [--store URL] [--host 127.0.0.1] [--port 8765] [--reviewer NAME] [--behind-proxy] [--read-only]``:
the review browser over a store (pathgen/serve/). It reads the store and writes nothing but ``reviews/``.

Exit codes: 0 when stopped (Ctrl-C), 2 for bad usage or settings (a store that does not exist).
"""

from __future__ import annotations

import argparse
import sys

from pathgen.cli.args import EXIT_OK, EXIT_USAGE, Commands, overrides_of, settings_args, store_arg
from pathgen.settings import load_settings

COMMAND = "serve"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8765
EPILOG = """Reviewer identity: each review is stored under --reviewer NAME. The app binds to 127.0.0.1 by default:
anyone who can reach it reviews as --reviewer, and it ignores any reviewer header a client sends. To let a team review,
keep it on 127.0.0.1, put an authenticating reverse proxy in front (nginx with auth_request, oauth2-proxy, Apache
mod_auth_openidc) that sets X-Forwarded-User (serve.reviewer_header) to the signed-in user and overwrites any such
header a client sends, and start it with --behind-proxy (serve.trust_reviewer_header=true): the header then names the
reviewer, over --reviewer. Requests must name 127.0.0.1, localhost, --host or one of serve.allowed_hosts as Host (else
400): pass the proxy's Host through or list its name. E.g. nginx:
  location / { auth_request /oauth2/auth; auth_request_set $user $upstream_http_x_auth_request_user;
               proxy_set_header X-Forwarded-User $user; proxy_set_header Host localhost;
               proxy_pass http://127.0.0.1:8765; }
  pathgen serve --store URL --behind-proxy"""


def register(commands: Commands) -> None:
    serve = commands.add(
        COMMAND,
        serve_store,
        help="browse the slides, patches and pairs of a store in a web browser, and review the pairs",
        description="A web app over the store: /slides, /slides/<slide_id>, /patches/<patch_id>, /pairs, and a JSON "
        "API under /api/. It writes nothing but reviews (reviews/<agents_hash>/<slide_id>.parquet).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    store_arg(serve)
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    serve.add_argument("--reviewer", metavar="NAME", help="the reviewer when no proxy header names one (see below)")
    serve.add_argument(
        "--behind-proxy",
        action="store_true",
        help="trust the reviewer header (serve.reviewer_header) set by an authenticating proxy in front; only behind "
        "one that overwrites it (serve.trust_reviewer_header)",
    )
    serve.add_argument("--read-only", action="store_true", help="browse only: reviews are disabled")
    settings_args(serve)


def serve_store(args: argparse.Namespace) -> int:
    from tasks.store.objects import Store, StoreError

    overrides = overrides_of(args) | ({"serve.trust_reviewer_header": True} if args.behind_proxy else {})
    settings = load_settings(args.config, overrides)
    if not 0 <= args.port <= 65535:
        print(f"pathgen serve: --port {args.port} is not a port (0..65535)", file=sys.stderr)
        return EXIT_USAGE
    store = Store(settings.store, settings.s3)
    try:
        if not store.exists(""):
            print(f"pathgen serve: no store at {store.url}; give --store URL of a store pathgen wrote", file=sys.stderr)
            return EXIT_USAGE
    except StoreError as exc:
        print(f"pathgen serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    import uvicorn

    from pathgen.serve.app import allowed_hosts, create_app

    app = create_app(store, args.reviewer, args.read_only, settings, host=args.host)
    ctx = app.state.ctx
    print(f"pathgen serve: {store.url} at http://{args.host}:{args.port}/slides (Ctrl-C stops it)")
    if ctx.read_only:
        print(f"  read-only: {ctx.read_only_reason}; reviews are disabled")
    elif ctx.trusts_header:
        who = f", else as {args.reviewer}" if args.reviewer else ""
        print(f"  reviews: as the proxy's header {ctx.reviewer_header} names{who} (--behind-proxy)")
    else:
        who = f"as {args.reviewer}" if args.reviewer else "refused: no --reviewer NAME"
        print(f"  reviews: {who}; the {ctx.reviewer_header} header is ignored (see pathgen serve --help for a proxy)")
    if ctx.openseadragon is None:
        print("  the slide viewer (OpenSeadragon) is missing: run make setup to fetch it from npm")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"  WARNING: bound to {args.host}: whoever reaches it can review; put an authenticating proxy in front")
        hosts = ", ".join(allowed_hosts(settings, args.host))
        print(f"  answers only requests for the hosts {hosts}; name others in serve.allowed_hosts")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return EXIT_OK
