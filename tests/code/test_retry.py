"""The one retry policy: what is retried, what fails at once, and bounded backoff."""

from __future__ import annotations

import inspect
from concurrent.futures.process import BrokenProcessPool

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError
from prefect import flow, task
from prefect.states import Failed
from pydantic import BaseModel, ValidationError

from pneumo import storage
from pneumo.download import UnsafeArchive, find_dataset_root, parse_source
from pneumo.quarantine import TooMuchBadData
from tasks import download, quarantine, register, retry, shards, sizes
from tasks.retry import is_retryable, retry_condition, retry_delays, retry_options


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def _raised(call) -> BaseException:
    try:
        call()
    except BaseException as error:  # noqa: BLE001 - the error is the subject
        return error
    raise AssertionError("no error raised")


class _Model(BaseModel):
    n: int


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError("reset by peer"),
        TimeoutError("timed out"),
        BrokenProcessPool("a worker died"),
        _client_error("SlowDown", 503),
        _client_error("InternalError", 500),
        ConnectionClosedError(endpoint_url="http://s3"),
        storage.S3Error("throttled", kind="throttled", retryable=True),
        RuntimeError("something unexpected"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transient_errors_are_retried(error):
    assert is_retryable(error)
    assert retry_condition(None, None, Failed(data=error))


def test_input_errors_fail_at_once(tmp_path):
    (tmp_path / "chest_xray" / "chest_xray").mkdir(parents=True)
    errors = [
        _raised(lambda: parse_source(str(tmp_path / "nonexistent"))),  # bad source
        _raised(lambda: find_dataset_root(tmp_path)),  # "no dataset found" (one level too deep, ...)
        _raised(lambda: _Model(n="x")),  # a validation error
        UnsafeArchive("'..' would escape the target folder"),
        TooMuchBadData("12% of the input files were quarantined"),
        FileNotFoundError("s3://bucket/missing"),
        _client_error("AccessDenied", 403),
        _client_error("NoSuchBucket", 404),
        storage.S3Error("the credentials look wrong", kind="credentials", retryable=False),
    ]
    assert isinstance(errors[2], ValidationError)
    assert "no dataset found" in str(errors[1])
    for error in errors:
        assert not is_retryable(error), error
        assert not retry_condition(None, None, Failed(data=error)), error


@pytest.mark.slow  # a temporary Prefect server
def test_a_task_fails_at_once_on_a_permanent_error_and_retries_a_transient_one(prefect_server):
    calls = {"permanent": 0, "transient": 0}

    @task(**{**retry_options(3), "retry_delay_seconds": 0})
    def permanent():
        calls["permanent"] += 1
        raise TooMuchBadData("too much bad data")

    @task(**{**retry_options(3), "retry_delay_seconds": 0})
    def transient():
        calls["transient"] += 1
        if calls["transient"] < 3:
            raise ConnectionResetError("reset")
        return "ok"

    @flow
    def both():
        return transient(), permanent(return_state=True)

    result, state = both()
    assert result == "ok" and calls["transient"] == 3
    assert state.is_failed() and calls["permanent"] == 1


def test_delays_are_capped_each_and_in_total():
    assert retry_delays(0) == []
    assert retry_delays(3) == [2, 4, 8]
    delays = retry_delays(20)
    jitter = 1 + retry.JITTER_FACTOR
    # Prefect's jitter can stretch a delay by the factor: the caps hold even then.
    assert max(delays) * jitter <= 300
    assert sum(delays) * jitter <= 1800
    assert delays == sorted(delays) and delays[:4] == [2, 4, 8, 16]
    # Uncapped, 2 * 2**19 s is 12 days.
    assert len(delays) >= 8
    with pytest.raises(ValueError):
        retry_delays(21)


# With the full flow's tests: in `make test-fast` they are the only ones needing a server, so its worker starts the one.
@pytest.mark.xdist_group("test_full_flow")
def test_every_task_uses_the_one_policy(prefect_server):  # result_storage() saves a block: the session's API, not a temporary one
    tasks = [
        download.download_dataset, sizes.size_percentiles, shards.write_shard, shards.write_index,
        quarantine.report_quarantine, register.train_evaluate_register,
    ]
    for each in tasks:
        assert each.retry_condition_fn is retry_condition, each.name
        assert each.retries == retry.DEFAULT_RETRIES, each.name
    from tasks.options import with_run_options

    run_task = with_run_options(shards.write_shard, "/tmp/pneumo-workdir", 20)
    assert run_task.retry_condition_fn is retry_condition
    assert max(run_task.retry_delay_seconds) <= 300
    # No task module sets its own numbers.
    for module in (download, sizes, shards, quarantine, register):
        assert "retry_delay_seconds=" not in inspect.getsource(module), module.__name__


@pytest.mark.slow  # a temporary Prefect server
def test_a_source_one_level_too_deep_fails_on_the_first_try(prefect_server, tmp_path):
    """The flow's own retry budget (--retries 3) no longer retries what no retry can fix."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.options import with_run_options

    source = tmp_path / "chest_xray" / "train"  # one level too deep: NORMAL/ and PNEUMONIA/ directly inside
    for name in ("NORMAL", "PNEUMONIA"):
        (source / name).mkdir(parents=True)
        (source / name / "IM-0001-0001.jpeg").write_bytes(b"not read")
    workdir = str(tmp_path / "work")

    @flow
    def stage():
        return with_run_options(download.download_dataset, workdir, 3)(str(source), "fingerprint", workdir)

    state = stage(return_state=True)
    assert state.is_failed()
    assert "no dataset found" in state.message
    with get_client(sync_client=True) as client:
        (run,) = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert run.run_count == 1
