"""`pneumo server start|stop|status`: the local Prefect server that runs use (flows/prefect_server.py)."""

from __future__ import annotations

import typer

from flows import prefect_server

server_app = typer.Typer(
    help="The local Prefect server that `pneumo run` uses when PREFECT_API_URL is not set: start, stop, status.",
    no_args_is_help=True,
)


@server_app.command()
def start() -> None:
    """Start the local Prefect server in the background (runs start it themselves when needed)."""
    try:
        server, started = prefect_server.ensure_running()
    except (RuntimeError, ValueError) as error:
        typer.echo(f"pneumo: {error}", err=True)
        raise typer.Exit(1)
    what = "started" if started else "already running"
    typer.echo(f"local Prefect server {what}: UI {server.url} (pid {server.pid}; "
               f"stops after {server.idle_minutes:g} min without a run)")


@server_app.command()
def stop() -> None:
    """Stop the local Prefect server now (a run using it fails: stop it between runs)."""
    server = prefect_server.stop()
    if server is None:
        typer.echo("no local Prefect server was running")
    else:
        typer.echo(f"stopped the local Prefect server (pid {server.pid}, {server.url})")


@server_app.command()
def status() -> None:
    """Whether the local Prefect server runs, its UI, pid, idle stop and files. Exit code 1 when it is not running."""
    running, lines = prefect_server.status_lines()
    typer.echo("\n".join(lines))
    raise typer.Exit(0 if running else 1)
