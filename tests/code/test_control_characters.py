"""Issue 23 item 14: names are checked whole (a trailing newline never passes), and user or data text
reaches a terminal or a log with its control characters escaped (pneumo.names.printable)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from pneumo import promotion, registry
from pneumo.names import printable, validate_model_name

# An OSC title change with its BEL, a colour (CSI), CR (overwrites the line), VT, a C1 CSI, the line and
# paragraph separators, a right-to-left override and a zero-width space.
HOSTILE = "a\x1b]0;owned\x07b\x1b[31mred\rc\x0bd\x9b2Je\u2028f\u2029g\u202eh\u200bi"
ESCAPED = "a\\x1b]0;owned\\x07b\\x1b[31mred\\rc\\x0bd\\x9b2Je\\u2028f\\u2029g\\u202eh\\u200bi"


def tinynet_weights():
    from pneumo.model import TinyNet

    return TinyNet().state_dict()


def test_printable_escapes_what_moves_a_terminal_and_keeps_the_rest():
    assert printable(HOSTILE) == ESCAPED
    assert printable("line\nbreak\ttab\x7f\x00") == "line\\nbreak\\ttab\\x7f\\x00"
    kept = "/data/röntgen – 胸部 x-ray (1).png 🙂"
    assert printable(kept) == kept
    assert printable(ValueError("bad\x1b[2J")) == "bad\\x1b[2J"
    assert all(char.isprintable() for char in printable(HOSTILE))


@pytest.mark.parametrize("name, what", [("tinynet\n", "model name"), ("champion\n", "alias"), ("latest\r", "alias")])
def test_a_name_with_a_trailing_newline_is_refused(name, what):
    """On main `--model-name $'tinynet\\n'` registered into a folder named `tinynet\\n` (re.match with `$`)."""
    with pytest.raises(ValueError, match=f"invalid {what}"):
        validate_model_name(name, what=what)


def test_a_version_or_record_name_with_a_trailing_newline_is_refused(tmp_path):
    from tasks.result_storage import SignedResultStorage

    root = str(tmp_path / "registry")
    registry.register(root, "m", tinynet_weights(), {})
    assert registry.resolve(root, "m", "v0001") == "v0001"
    assert not registry.version_exists(root, "m", "v0001\n")
    with pytest.raises(ValueError, match="invalid alias 'v0001\\\\n'"):  # not a version: then not an alias either
        registry.resolve(root, "m", "v0001\n")
    with pytest.raises(ValueError, match="invalid version"):
        registry.require_aliasable(root, "m", "v0001\n")
    with pytest.raises(ValueError, match="refusing result record name 'abc\\\\n'"):
        SignedResultStorage(root=str(tmp_path / "results")).read_path("abc\n")


def test_a_run_config_refuses_a_model_name_with_a_newline():
    from pydantic import ValidationError

    from pneumo.config import ModelLocation

    with pytest.raises(ValidationError, match="invalid model name"):
        ModelLocation(model_name="tinynet\n")


def test_models_show_escapes_a_promotion_reason(tmp_path):
    """On main `models show` printed a --reason holding an OSC sequence and CR as is."""
    from pneumo.summary import card_lines

    root = str(tmp_path / "registry")
    registry.register(root, "m", tinynet_weights(), {"metrics": {"val": {"roc_auc": 0.9}}})
    promotion.promote(root, "m", "v0001", {"roc_auc": 0.9}, "roc_auc", force=True, reason=HOSTILE)
    card = registry.load_card(root, "m", "v0001")
    lines = card_lines(card, root, "m", ["champion"])
    champion = next(line for line in lines if line.startswith("  champion"))
    assert champion.endswith(f"promoted by hand: {ESCAPED}")
    assert all(line.isprintable() for line in lines)


def _run(message: str, **fields):
    now = datetime.now(timezone.utc)
    return SimpleNamespace(id="0e7dc79b-3879-44bc-8baa-71afd4cc3e72", name=fields.get("name", "clever-polecat"),
                           start_time=fields.get("start_time", now), expected_start_time=now, total_run_time=None,
                           state=SimpleNamespace(name="Completed", message=message))


def test_run_listings_escape_state_messages_and_artifacts():
    from pneumo.summary import run_lines, runs_lines

    listed = runs_lines([("pneumo-full", _run(f"registered {HOSTILE}"))], [("pneumo-full", _run("", name=HOSTILE))])
    # (a state message's whitespace, CR, VT and separators included, is folded into single spaces)
    folded = "a\\x1b]0;owned\\x07b\\x1b[31mred c d\\x9b2Je f g\\u202eh\\u200bi"
    assert f"registered {folded}" in listed[1]
    assert ESCAPED in listed[-1]  # a run name, as is
    artifact = SimpleNamespace(key="run-summary", data=f"# registered\n\nworkdir `{HOSTILE}`", created=1)
    shown = run_lines("pneumo-full", _run(HOSTILE), [artifact], "http://127.0.0.1:4280/runs/flow-run/x")
    assert f"  message    {folded}" in shown and f"workdir `{ESCAPED}`" in shown
    assert all(line.isprintable() for line in listed + shown)


def test_the_serve_request_log_escapes_the_path(tmp_path, caplog):
    """On main the request log dropped CR/LF (uvicorn refuses them) but passed ESC/OSC, VT and U+2028 from the path."""
    from fastapi.testclient import TestClient

    from pneumo import serve
    from tests.predict_helpers import register_two

    root = str(tmp_path / "registry")
    register_two(root)
    caplog.set_level(logging.INFO, logger="pneumo.serve")
    with TestClient(serve.create_app(root, "tinynet", "champion", poll_seconds=3600)) as client:
        assert client.get("/x%1b]0;owned%07y%1b[2J%0bz%e2%80%a8w%c2%9b").status_code == 404
    (line,) = [record.getMessage() for record in caplog.records if record.name == "pneumo.serve" and "GET" in record.getMessage()]
    assert line.startswith("GET /x\\x1b]0;owned\\x07y\\x1b[2J\\x0bz\\u2028w\\x9b 404 ")
    assert line.isprintable()
