"""python -m dlpipe.serving [MODEL_URI] [--workers N] [--port P] [key.path=value ...]

Serve a registered model on 127.0.0.1 with N worker processes (dlpipe.serve.server): /invocations,
/health (model name, version, alias), /reload. MODEL_URI defaults to the configured model's @production;
the tracking store comes from conf/ (no secret on the command line). Stop it with SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import sys

from dlpipe.cli import add_common, load_or_exit, parse, setup_logging


def main(argv: list[str] | None = None) -> int:
    import argparse

    from dlpipe.model.names import PRODUCTION
    from dlpipe.serve.server import Settings, serve
    from dlpipe.tracking import tracking_uri

    p = argparse.ArgumentParser(prog="python -m dlpipe.serving", description=__doc__.split("\n\n")[1])
    p.add_argument("model_uri", nargs="?", help="models:/name@alias or models:/name/version (default: @production)")
    p.add_argument("--workers", type=int, default=2, help="worker processes, each with one torch thread (default 2)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5002)
    p.add_argument("--poll-seconds", type=float, default=10.0, help="how often each worker checks the alias")
    add_common(p, force=False)
    args = parse(p, sys.argv[1:] if argv is None else argv)
    if args.model_uri and "=" in args.model_uri and not args.model_uri.startswith("models:/"):
        args.overrides, args.model_uri = [args.model_uri, *args.overrides], None  # an override, not a URI
    setup_logging()
    cfg = load_or_exit(args)
    uri = args.model_uri or f"models:/{cfg.model_name}@{PRODUCTION}"
    settings = Settings(uri, tracking_uri(cfg), args.poll_seconds)
    print(f"serving {uri} on http://{args.host}:{args.port} with {args.workers} worker(s)", flush=True)
    serve(settings, args.host, args.port, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
