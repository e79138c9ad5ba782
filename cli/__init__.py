"""The ``pneumo`` command (`pneumo --help` lists its commands). Only ``run``, ``predict-batch``, ``runs`` and
``server`` import Prefect, inside the commands.
"""
from __future__ import annotations

import sys
from typing import Optional

import cyclopts

from cli import commands, models, runs, runtime
from cli import run as run_command

app = cyclopts.App(
    name="pneumo",
    help="Chest X-rays in, a 2,541-parameter pneumonia classifier out: train it, score with it, serve it.",
    default_parameter=cyclopts.Parameter(negative_iterable=(), consume_multiple=True),
    version_flags=[],
)
app.command(run_command.run)
for command in (commands.predict, commands.predict_batch, commands.drift, commands.serve, commands.gc):
    app.command(command)
app.command(models.models)
app.command(runs.runs)
app.command(runs.server)


def main(tokens: Optional[list[str]] = None) -> None:
    """The console script: one line and exit 2 for a refused command line, else the command's exit code."""
    tokens = sys.argv[1:] if tokens is None else list(tokens)
    prog = " ".join(["pneumo", *tokens[:1]]) if tokens and not tokens[0].startswith("-") else "pneumo"
    runtime.quiet_prefect()  # before any command imports Prefect: no usage data, no first-run notice
    try:
        run_command.use_config_file(app, tokens)
        code = app(tokens, print_error=False, exit_on_error=False, result_action="return_value")
    except (cyclopts.CycloptsError, run_command.UsageError) as error:
        print(f"{prog}: error: {run_command.error_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code if isinstance(code, int) else 0)
