"""The deployments as a user runs them: infra/stack.sh, prefect.yaml, a worker, `prefect deployment run`.

Everything is real and local: `prefect server start` on a free loopback port with its own
PREFECT_HOME, a moto S3 server, a `process` work pool and worker, and the Prefect CLI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.helpers import free_port

# One xdist worker runs the whole module, so that its module fixture (the stack and its two runs) is built once.
pytestmark = pytest.mark.xdist_group("test_deployment")

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "infra" / "stack.sh"
PREFECT = Path(os.environ.get("PNEUMO_BIN", Path(sys.executable).parent)) / "prefect"


def quick(env: dict, **run) -> list[str]:
    """Two epochs and small shards (no assertion depends on how well the model learns). A section given with
    --param replaces the deployment's own (Prefect merges parameters one level deep); where the data is stays,
    at the top level."""
    return ["--param", 'train={"epochs": 2, "patience": 2}', "--param", "run=" + json.dumps({"shard_size": 100, **run})]


def read_env_file(path: Path) -> dict[str, str]:
    """The `export K="V"` lines infra/stack.sh writes (values without shell expansion)."""
    env = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r'export (\w+)="?([^"$]*)"?', line)
        if match:
            env[match.group(1)] = match.group(2)
    return env


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")  # not module: under xdist another module's tests may run between this one's
def stack(tmp_path_factory):
    """infra/stack.sh up on free ports; infra/stack.sh down afterwards, and a check that it worked."""
    state = tmp_path_factory.mktemp("stack")
    bucket = f"pneumo-{uuid.uuid4().hex[:12]}"
    env = {
        **os.environ,
        "PNEUMO_STACK_DIR": str(state),
        "PNEUMO_PREFECT_PORT": str(free_port()),
        "PNEUMO_S3_PORT": str(free_port()),
        "PNEUMO_BUCKET": bucket,
        "PNEUMO_BIN": str(PREFECT.parent),
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick up runs quickly
    }
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        env.pop(name, None)
    pids: dict[str, int] = {}
    try:
        up = subprocess.run([str(STACK), "up"], env=env, check=True, timeout=300, capture_output=True, text=True)
        # It started a worker: no "To start a worker" hint; the closing hint follows the README's order.
        assert "To start a worker" not in up.stdout + up.stderr and "created work pool pneumo" in up.stderr
        hint = up.stderr.strip().splitlines()[-1]
        assert hint.index("make deploy") < hint.index("source ") < hint.index("deployment run") < hint.index("pneumo runs")
        pids = {name: int((state / f"{name}.pid").read_text()) for name in ("s3", "server", "worker")}
        env.update(read_env_file(state / "env"))  # PREFECT_API_URL, PREFECT_HOME, AWS_* of the stack
        env["PNEUMO_WORKDIR"] = f"s3://{bucket}/work"
        yield env
    finally:
        pids = pids or {
            p.stem: int(p.read_text()) for p in state.glob("*.pid") if p.read_text().strip().isdigit()
        }
        down = subprocess.run([str(STACK), "down"], env=env, timeout=120, capture_output=True, text=True)
        left = [name for name, pid in pids.items() if alive(pid)]
        for name in left:  # never leave a process behind, even when `down` is broken
            os.killpg(pids[name], signal.SIGKILL)
        assert down.returncode == 0 and not left, (down.stderr, left)
        # Each stopped on its own: the worker on its second SIGTERM, not on stack.sh's SIGKILL 20 s later.
        assert "stopped" in down.stderr and ": killed" not in down.stderr, down.stderr


def prefect(env, *args, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(PREFECT), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def run_deployment(env, name: str, *params: str) -> dict:
    """`prefect deployment run NAME --watch`; the flow run as `prefect flow-run inspect` shows it."""
    out = prefect(env, "deployment", "run", f"pneumo-full/{name}", *params, "--watch", "--watch-timeout", "600", timeout=700)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)
    return json.loads(prefect(env, "flow-run", "inspect", run_id, "--output", "json").stdout)


@pytest.fixture(scope="session")
def two_runs(stack, small_source):
    env = {**stack, "PNEUMO_SOURCE": str(small_source)}
    subprocess.run([str(STACK), "deploy"], env=env, check=True, timeout=300, capture_output=True, text=True)
    first = run_deployment(env, "on-demand", *quick(env))
    unchanged = run_deployment(env, "scheduled-retrain", *quick(env))  # nothing changed: a cache hit
    second = run_deployment(env, "on-demand", *quick(env, retrain=True))  # asked explicitly
    return env, first, unchanged, second


def test_both_deployments_are_declared_with_the_weekly_schedule(two_runs):
    env, _, _, _ = two_runs
    listed = prefect(env, "deployment", "ls").stdout
    assert "pneumo-full/on-demand" in listed and "pneumo-full/scheduled-retrain" in listed
    # Read with the client: `prefect deployment inspect -o json` (Prefect 3.9.1) cannot print a deployment with a
    # trigger (its automation holds a set, which its JSON encoder refuses).
    scheduled, automations = read_from_stack(env, lambda client: (
        deployment := client.read_deployment_by_name("pneumo-full/scheduled-retrain"),
        client.read_resource_related_automations(f"prefect.deployment.{deployment.id}"),
    ))
    [schedule] = scheduled.schedules
    assert schedule.schedule.cron == "0 3 * * 1" and schedule.schedule.timezone == "UTC" and schedule.active is True
    assert "run" not in scheduled.parameters and scheduled.parameters["workdir"] == env["PNEUMO_WORKDIR"]
    assert scheduled.work_pool_name == "pneumo"
    # Its drift trigger: pneumo.drift.detected of a batch or of `pneumo drift` starts a retrain.
    [automation] = automations
    assert automation.trigger.expect == {"pneumo.drift.detected"} and automation.enabled
    assert automation.trigger.match.model_dump()["pneumo.drift.origin"] == ["batch", "command"]
    on_demand = json.loads(prefect(env, "deployment", "inspect", "pneumo-full/on-demand", "-o", "json").stdout)
    assert on_demand["schedules"] == [] and "run" not in on_demand["parameters"]
    pool = json.loads(prefect(env, "work-pool", "inspect", "pneumo", "-o", "json").stdout)
    assert pool["type"] == "process"


def test_runs_complete_and_the_champion_rule_holds(two_runs):
    env, first, unchanged, second = two_runs
    assert all(run["state"]["type"] == "COMPLETED" for run in (first, unchanged, second))
    # The outcome is in the final state's message, which `pneumo runs` and the UI show.
    assert all(run["state"]["message"].startswith("registered tinynet v") for run in (first, second))
    assert unchanged["state"]["message"].startswith("nothing new registered (cache hit; tinynet v0001 unchanged")
    listed = subprocess.run([sys.executable, "-m", "cli", "runs"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    for run in (first, unchanged, second):  # where the README's Deploy section sends the user
        line = next(line for line in listed.stdout.splitlines() if run["id"] in line)
        assert "pneumo-full" in line and " ".join(run["state"]["message"].split()) in line
    # Read the registry on the stack's S3 endpoint, in a process with the stack's settings.
    check = subprocess.run(
        [sys.executable, "-c", (
            "import json, sys; from pneumo import registry as r\n"
            "reg = sys.argv[1]\n"
            "print(json.dumps({'versions': r.list_versions(reg, 'tinynet'),"
            " 'champion': r.get_alias(reg, 'tinynet', 'champion'),"
            " 'cards': {v: r.load_card(reg, 'tinynet', v).as_json() for v in r.list_versions(reg, 'tinynet')}}))"
        ), env["PNEUMO_WORKDIR"] + "/registry"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert check.returncode == 0, check.stderr
    found = json.loads(check.stdout)
    assert found["versions"] == ["v0001", "v0002"]  # the unchanged scheduled run registered nothing
    first_card, second_card = found["cards"]["v0001"], found["cards"]["v0002"]
    assert first_card["champion_comparison"]["promoted"] is True  # the first model becomes champion
    comparison = second_card["champion_comparison"]
    assert comparison["champion_version"] == "v0001" and comparison["metric"] == "stress_roc_auc"
    # The rule itself: v0002 is champion exactly when its stress-val AUC is strictly greater.
    beats = comparison["challenger_value"] > comparison["champion_value"]
    assert comparison["promoted"] is beats
    assert found["champion"] == ("v0002" if beats else "v0001")
    # Both cards were trained on the same shards: the data stages were cached.
    assert first_card["data"]["shards_digest"] == second_card["data"]["shards_digest"]


def test_the_worker_credentials_stay_out_of_logs_and_the_prefect_database(two_runs):
    env, _, _, _ = two_runs
    secret = env["AWS_SECRET_ACCESS_KEY"].encode()
    state = Path(env["PNEUMO_STACK_DIR"])
    files = [*state.glob("*.log"), *(state / "prefect-home").rglob("*.db")]
    assert any(f.suffix == ".db" for f in files) and (state / "worker.log").stat().st_size > 0
    for path in files:
        assert secret not in path.read_bytes(), path


def inverted_films(source: Path, target: Path, n: int = 120) -> Path:
    """``n`` of the source's films as negatives: films no training film resembles (a drifted batch)."""
    from PIL import Image, ImageOps

    target.mkdir(parents=True)
    for path in sorted(source.rglob("*.jpeg"))[:n]:
        with Image.open(path) as image:
            ImageOps.invert(image.convert("L")).save(target / path.name, quality=90)
    return target


def read_from_stack(env: dict, read):
    """``read(client)`` against the stack's Prefect API, from this process."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            return read(client)


def wait_for(what: str, read, timeout: float = 240.0):
    import time

    deadline = time.monotonic() + timeout
    while not (found := read()) and time.monotonic() < deadline:
        time.sleep(2)
    assert found, f"gave up waiting for {what}"
    return found


def test_drift_reaches_prefect_as_an_event_and_its_trigger_starts_a_retrain(two_runs, tmp_path, shared_data):
    """Last in the module: the retrain it starts registers a version of its own."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    env, *_ = two_runs
    films = inverted_films(shared_data / "train", tmp_path / "negatives")
    checked = subprocess.run([sys.executable, "-m", "cli", "drift", str(films), "--workdir", env["PNEUMO_WORKDIR"]],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines()[0] == "verdict: drift", checked.stdout
    events = EventFilter(event=EventNameFilter(name=["pneumo.drift.detected"]),
                         resource=EventResourceFilter(id_prefix=["pneumo.model.tinynet."]))
    # The command's own event (the retrain it triggers may send one of its own, origin "retrain", the newer).
    [event, *_] = wait_for("the drift event", lambda: [e for e in read_from_stack(env, lambda c: c.read_events(filter=events, limit=50).events)
                                                      if e.resource.get("pneumo.drift.origin") == "command"])
    assert event.payload["verdict"] == "drift"
    assert event.payload["n_films"] == 120 and event.payload["p_values"]["joint"] < drift_alpha()
    # The trigger of infra/prefect.yaml made a run of the retrain deployment, with run.retrain on.
    retrains = FlowRunFilter(), DeploymentFilter(name=DeploymentFilterName(any_=["scheduled-retrain"]))

    def triggered(client):
        runs = client.read_flow_runs(flow_run_filter=retrains[0], deployment_filter=retrains[1])
        return [r for r in runs if (r.parameters.get("run") or {}).get("retrain")]

    wait_for("the triggered retrain run", lambda: read_from_stack(env, triggered))
    done = wait_for("the retrain to finish", lambda: [r for r in read_from_stack(env, triggered) if r.state.is_final()], 400)
    assert done[0].state.is_completed(), done[0].state.message
    assert done[0].state.message.startswith("registered tinynet v0003")
    # Before training, the retrain checked its training films against the champion's: its card says how that went.
    card = subprocess.run(
        [sys.executable, "-c", "import json, sys; from pneumo import registry as r\n"
         "print(json.dumps(r.load_card(sys.argv[1], 'tinynet', 'v0003').as_json()['drift']))", env["PNEUMO_WORKDIR"] + "/registry"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert card.returncode == 0, card.stderr
    recorded = json.loads(card.stdout)
    assert recorded["against"].startswith("tinynet v000") and recorded["verdict"] in ("none", "warn", "drift", "too few films")


def drift_alpha() -> float:
    from pneumo.drift import DRIFT_ALPHA

    return DRIFT_ALPHA
