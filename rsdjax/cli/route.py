"""`rsdjax route --backend URL --backend URL ...`: one OpenAI endpoint in front of several servers."""
from __future__ import annotations


def register(sub) -> None:
    from rsdjax.serve.balance import POLICIES

    p = sub.add_parser("route", help="router joining several `rsdjax serve` instances behind one endpoint")
    p.add_argument("--backend", action="append", required=True, metavar="URL",
                   help="a server's base URL, e.g. http://127.0.0.1:8001 (repeat for each)")
    p.add_argument("--policy", choices=list(POLICIES), default="least-loaded")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for a backend's answer (streams: between chunks); then 504")
    p.add_argument("--health-interval", type=float, default=2.0, help="seconds between health checks")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args) -> int:
    from urllib.parse import urlparse

    import uvicorn

    from rsdjax.serve.router import create_router_app

    for url in args.backend:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"route: --backend {url!r} is not an http(s)://host:port URL")
    if args.timeout <= 0 or args.health_interval <= 0:
        raise ValueError("route: --timeout and --health-interval must be > 0")
    app = create_router_app(args.backend, policy=args.policy, timeout=args.timeout,
                            health_interval=args.health_interval, max_body_bytes=args.max_body_bytes)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
