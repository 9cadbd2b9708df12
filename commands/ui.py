"""``didp ui``: the local web page on 127.0.0.1, with the models loaded once.

    didp ui --weights tiny --port 7860

The environment, read here only: ``DIDP_WEIGHTS`` (``--weights`` wins), ``DIDP_OUTPUT_DIR`` (where
runs are made before their files are copied to the page's directory) and ``DIDP_MEMORY_BUDGET_MB``.
Gradio (the ``ui`` extra) is imported only here and in ``webui.page``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_PORT = 7860
HOST = "127.0.0.1"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="didp ui",
        description="A local web page on 127.0.0.1: type a caption, watch the picture form frame by frame.",
    )
    parser.add_argument("--weights", help="tiny, laion or a directory of weights (default: $DIDP_WEIGHTS or laion)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default {DEFAULT_PORT})")
    parser.add_argument(
        "--files",
        type=Path,
        default=Path(tempfile.gettempdir()) / "didp-ui",
        help="where the page keeps each run's files (default $TMPDIR/didp-ui; the last 20 runs' stay)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"error: --port {args.port}: give a port from 1 to 65535", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no calls home
    try:
        from webui.page import CSS, build, theme
    except ImportError as error:
        print(f"error: the page needs Gradio ({error.name}): make install (the ui extra)", file=sys.stderr)
        return 1
    from pipeline.runner import Pipeline
    from webui.runs import Runs

    weights = args.weights or os.environ.get("DIDP_WEIGHTS", "laion")
    runs = Runs(args.files)
    try:
        runs.pipeline = Pipeline(
            weights,
            output_root=Path(os.environ.get("DIDP_OUTPUT_DIR", Path(tempfile.gettempdir()) / "didp-outputs")),
            memory_budget=os.environ.get("DIDP_MEMORY_BUDGET_MB"),
            on_frame=runs.on_frame,
        )
    except Exception as error:  # a clear message, not a traceback, for missing or broken weights
        print(f"error: setup failed: {error}", file=sys.stderr)
        return 1
    page = build(runs, tiny=str(weights) == "tiny", weights=Path(str(weights)).name)
    page.queue(default_concurrency_limit=1)
    print(f"didp ui: http://{HOST}:{args.port}/ (Ctrl-C stops it)", file=sys.stderr, flush=True)
    try:
        page.launch(
            server_name=HOST,
            server_port=args.port,
            allowed_paths=[str(args.files)],
            ssr_mode=False,
            quiet=True,
            show_error=True,
            theme=theme(),
            css=CSS,
        )
    except KeyboardInterrupt:
        pass
    except OSError as error:  # the port is taken
        print(f"error: --port {args.port}: {error}", file=sys.stderr)
        return 1
    finally:
        runs.cancel()
    return 0
