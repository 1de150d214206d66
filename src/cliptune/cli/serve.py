"""``cliptune serve``: the HTTP API and web page over an index (FastAPI on uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cliptune.cli.errors import exit_on_error

__all__ = ["register", "serve_cmd"]

console = Console(soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``cliptune serve`` to ``app``."""
    app.command("serve")(serve_cmd)


def serve_cmd(
    index: Annotated[Path, typer.Argument(help="Index folder written by `cliptune index`.")],
    host: Annotated[
        str,
        typer.Option(
            help="Address to bind; the default serves this machine only (no auth: see docs/serve.md)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8000,
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Model to embed queries with (default: the one recorded in the index)."),
    ] = None,
    suite: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Behavioural suite file: adds the /suite page with its queries' flagged hits."),
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option(help="Largest query image upload in MiB (a larger one gets 413).", min=0.001)
    ] = 10.0,
) -> None:
    """Serve an index over HTTP: a search page at /, the JSON API (POST /search, GET /images/ID, /info).

    Examples:
        cliptune serve runs/demo/index
        cliptune serve indexes/fashion --port 8080 --suite data/fashion/suite.yaml
        cliptune serve indexes/fashion --host 0.0.0.0 --max-upload-mb 4
    """
    import uvicorn

    from cliptune.serve.app import create_app
    from cliptune.serve.limits import Limits

    limits = Limits(max_upload_bytes=int(max_upload_mb * (1 << 20)))
    with exit_on_error(1):
        app = create_app(index, model=model, suite=suite, limits=limits)
    console.print(f"serving {index} on http://{host}:{port}/ (Ctrl+C stops)", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="warning")
