"""`imedsam serve`: the web page and its HTTP API (``pip install 'imedsam[web]'``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imedsam.errors import ImedsamError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a web page for interactive segmentation of images and volumes (Ctrl-C stops)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network, "
                        "then set --token)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model", default="litemedsam", help="default model (default: litemedsam)")
    p.add_argument("--adapter", default=None, help="serve this trained run (folder) as the default model")
    p.add_argument("--runs", default=None, help="offer every complete run in this folder too (chosen by name)")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on every API call; the page "
                                                 "takes it from the URL printed at start")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--max-upload-mb", type=float, default=512.0, help="largest upload (default 512 MB): 413 beyond")
    p.add_argument("--max-inflight", type=int, default=2, help="inferences at once (default 2)")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting for an inference (default 32): 503 "
                                                             "with Retry-After beyond")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request (default 120): 504")
    p.add_argument("--cache-mb", type=float, default=1024.0, help="memory for cached embeddings (default 1024)")
    p.add_argument("--max-sessions", type=int, default=16, help="open files at once (default 16)")
    p.add_argument("--session-ttl", type=float, default=3600.0, help="idle seconds before a session closes")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from imedsam.serve import create_app
    except ImportError as exc:
        raise ImedsamError(f"serve needs the web extra ({exc.name} is missing): pip install 'imedsam[web]'") from None
    from imedsam.serve.settings import ServeSettings

    if not 0 < args.port < 65536:
        raise ImedsamError(f"--port {args.port}: use 1..65535")
    if args.adapter is not None:
        from imedsam.models.registry import resolve_adapter_file

        resolve_adapter_file(args.adapter)
    settings = ServeSettings(model=args.model, adapter=args.adapter, runs=Path(args.runs) if args.runs else None,
                             token=args.token, device=args.device, precision=args.precision,
                             max_upload_mb=args.max_upload_mb, max_inflight=args.max_inflight,
                             max_queue=args.max_queue, request_timeout_s=args.request_timeout,
                             cache_mb=args.cache_mb, max_sessions=args.max_sessions, session_ttl_s=args.session_ttl)
    app = create_app(settings)
    catalog = app.state.catalog
    default = catalog.segmenter(None)  # load the default model before the first request
    if not catalog.entry(None).volume:  # and run it once, so that the first prompt is not the model's first call
        default.warm_up()
    shown = "localhost" if args.host in ("127.0.0.1", "0.0.0.0", "::") else args.host
    url = f"http://{shown}:{args.port}/" + (f"#token={args.token}" if args.token else "")
    print(f"imedsam serve: open {url} (API docs: http://{shown}:{args.port}/docs); Ctrl-C stops", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


HANDLERS = {"serve": cmd_serve}
