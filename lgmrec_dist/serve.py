"""``lgmrec serve``: the HTTP JSON service of ``lgmrec_dist.api`` over a trained run, on uvicorn
(docs/serving.md). FastAPI and uvicorn are the optional extra ``serve``; they are imported on use.

    lgmrec serve --run RUNDIR [--host 127.0.0.1] [--port 8080] [--ann DIR]
"""
from __future__ import annotations

import json
import threading


def start_background(app, host: str = "127.0.0.1", port: int = 0):
    """uvicorn serving ``app`` in a daemon thread; returns (server, port) once it accepts connections
    (port 0 = a free port). Stop it with ``server.should_exit = True``."""
    import time

    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start within 60 s")
        time.sleep(0.01)
    return server, server.servers[0].sockets[0].getsockname()[1]


def register_cli(sub) -> None:
    s = sub.add_parser("serve", help="HTTP JSON service over a trained run (recommend, fold-in, cold items)")
    s.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory of `lgmrec train`")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--ann", help="item index directory of `lgmrec export --ann` (default: exact scoring)")
    s.add_argument("--threads", type=int, default=0,
                   help="threads of torch and faiss within one request (0 = their default: all cores); "
                        "1 suits many concurrent clients (docs/benchmarks.md)")
    s.set_defaults(func=_cmd_serve)


def set_request_threads(threads: int) -> None:
    """Threads torch and faiss use within one request; requests themselves run in uvicorn's thread pool,
    so with many clients in flight more threads per request only oversubscribe the cores."""
    if threads <= 0:
        return
    import torch
    torch.set_num_threads(threads)
    try:
        import faiss
        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def _cmd_serve(args) -> int:
    import uvicorn

    from lgmrec_dist.api import create_app
    from lgmrec_dist.recommender import Recommender
    set_request_threads(args.threads)
    rec = Recommender.from_run(args.run, args.ann)  # a bad run: the command line's one error line
    print(json.dumps({"serving": str(args.run), "host": args.host, "port": args.port, "ann": args.ann}), flush=True)
    uvicorn.run(create_app(rec), host=args.host, port=args.port, log_level="warning")
    return 0
