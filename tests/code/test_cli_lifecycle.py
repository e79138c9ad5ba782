"""A command-line run (cli/runtime.py) from start to end: Ctrl-C says resume and exits 130, a second Ctrl-C
exits at once, a finished run's links work after it, and a Prefect API that dies fails it within a minute.

Real processes and signals, through a small flow run by ``runtime.run_flow`` as `pneumo run` runs its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

# real CLI runs against real Prefect servers, interrupted or killed on purpose: left out of `make test-fast`.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

# Three cached stages, then an "epoch" loop with a worker process of its own, as training has.
FLOW = """
import subprocess, sys, time
from cli import runtime
runtime.quiet_prefect()
runtime.stop_on_interrupt()
from prefect import flow, task
from prefect.cache_policies import INPUTS

@task(cache_policy=INPUTS, persist_result=True)
def download(source: str) -> str:
    return source

@task(cache_policy=INPUTS, persist_result=True)
def sizes(source: str) -> int:
    return len(source)

@task(cache_policy=INPUTS, persist_result=True)
def index(size: int) -> int:
    return size

@task
def train(epochs: int) -> int:
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stderr=subprocess.DEVNULL)
    for epoch in range(1, epochs + 1):
        print(f"epoch {epoch}/{epochs}", flush=True)
        time.sleep(0.1)
    worker.kill()
    return epochs

@flow
def tiny(epochs: int) -> int:
    index(sizes(download("source")))
    return train(epochs)

sys.exit(runtime.run_flow(tiny, {"epochs": int(sys.argv[1])}, lambda result, seconds: print(f"trained {result} epochs")))
"""


def start_run(script: Path, epochs: int, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """The run in its own session (as a terminal's job), read until its 30th epoch (its stages recorded by then)."""
    cli = subprocess.Popen([sys.executable, str(script), str(epochs)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    for line in cli.stdout:
        output.append(line)
        if "epoch 30/" in line:
            return cli, "".join(output)
    raise AssertionError("training never started:\n" + "".join(output))


def in_session(session: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def test_runs_reuse_the_local_server_whose_links_work_after_the_run_and_ctrl_c_says_resume(prefect_server, tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(FLOW)
    # A user without PREFECT_API_URL: the local server of the session's PNEUMO_SERVER_DIR (tests/conftest.py).
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "client-home"), PYTHONPATH=str(REPO))
    port = int(prefect_server.rsplit(":", 1)[1].split("/")[0])

    # 1. Ctrl-C (as a terminal sends it: to the whole group) while training.
    cli, output = start_run(script, 100000, env)
    assert f"pneumo: using the local Prefect server: UI http://127.0.0.1:{port}" in output
    os.killpg(cli.pid, signal.SIGINT)
    interrupted = time.monotonic()
    rest, _ = cli.communicate(timeout=60)
    seconds = time.monotonic() - interrupted
    print(f"Ctrl-C: exit {cli.returncode} after {seconds:.2f} s; last output:\n{rest}")
    assert cli.returncode == 130
    assert seconds < 3, f"{seconds:.1f} s from SIGINT to exit"
    said = "pneumo: interrupted: 3 finished stages are cached; re-run the same command to resume"
    lines = rest.strip().splitlines()  # one line said, beside the last epochs printed meanwhile
    assert lines.count(said) == 1 and all(line.startswith("epoch ") for line in lines if line != said), rest
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
    deadline = time.monotonic() + 5
    while in_session(cli.pid):  # the training's worker process is stopped too
        assert time.monotonic() < deadline, f"left running: {in_session(cli.pid)}"
        time.sleep(0.2)
    assert psutil.pid_exists(json.loads((Path(os.environ["PNEUMO_SERVER_DIR"]) / "server.json").read_text())["pid"])

    # 2. The same command resumes from the cache; two Ctrl-Cs in a row end it at once.
    cli, output = start_run(script, 100000, env)
    assert output.count("Finished in state Cached") >= 3, output
    os.killpg(cli.pid, signal.SIGINT)
    os.killpg(cli.pid, signal.SIGINT)
    rest, _ = cli.communicate(timeout=60)
    assert cli.returncode == 130 and "Traceback" not in rest

    # 3. A run to the end: its last line is its UI page, and the page and its API answer after the run.
    finished = subprocess.run([sys.executable, str(script), "6"], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=600)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    last = finished.stdout.strip().splitlines()[-1]
    assert last.startswith(f"  run page     http://127.0.0.1:{port}/runs/flow-run/"), last
    assert "trained 6 epochs" in finished.stdout and "usage data" not in finished.stderr
    flow_run_id = last.rsplit("/", 1)[1]
    assert f"View at http://127.0.0.1:{port}/runs/flow-run/{flow_run_id}" in finished.stdout + finished.stderr
    browser = urllib.request.Request(last.split()[-1], headers={"Accept": "text/html"})  # the UI answers browsers
    with urllib.request.urlopen(browser, timeout=10) as page:
        assert page.status == 200 and b"<html" in page.read().lower()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/flow_runs/{flow_run_id}", timeout=10) as api:
        assert json.loads(api.read())["state"]["type"] == "COMPLETED"
    # The UI asks its API on this port, not on Prefect's default 4200.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as settings:
        assert json.loads(settings.read())["api_url"] == f"http://127.0.0.1:{port}/api"


def test_a_prefect_api_that_dies_mid_run_fails_the_cli_within_a_minute_and_says_so(tmp_path):
    from tests.helpers import free_port, wait_for_port

    script = tmp_path / "tiny.py"
    script.write_text(FLOW)
    port = free_port()
    home = {"PREFECT_HOME": str(tmp_path / "server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **home}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client-home"), "PYTHONPATH": str(REPO),
           "PNEUMO_API_GONE_AFTER_SECONDS": "5"}  # the watchdog's 30 s shortened: the test waits less, asserts the same
    cli = None
    try:
        wait_for_port(port, timeout=240)
        cli, _ = start_run(script, 100000, env)  # the API dies while a task computes and has nothing to tell it
        os.killpg(server.pid, signal.SIGKILL)
        killed = time.monotonic()
        rest, _ = cli.communicate(timeout=300)
        seconds = time.monotonic() - killed
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        if cli is not None and cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
    assert cli.returncode == 1
    assert seconds < 90, f"the CLI took {seconds:.0f} s to give up on a dead Prefect API"
    assert f"the Prefect API at {api} went away" in rest
    assert "re-run the same command" in rest and "cached" in rest
