"""Issue 23 item 4 through the commands: a broken champion alias takes nothing down and can be repaired.

On main `predict` and `serve` exited 1 with a 48-line traceback (BrokenAlias, KeyError, TypeError),
`models list` raised `TypeError: unhashable type: 'list'`, and `models promote v0003` failed with
`pneumo: 'version'`.
"""

from __future__ import annotations

import pathlib

import pytest

from pneumo import registry
from tests.helpers import run_pneumo
from tests.predict_helpers import register_two, xray_pair

pytestmark = pytest.mark.slow  # a new process per command

BROKEN = {"v9999": b'{"version": "v9999"}', "dotdot": b'{"version": "../x"}', "empty": b"{}", "list": b"[]",
          "version-list": b'{"version": ["v0001"]}', "not-json": b"{\"version\": "}


def one_line_naming(result, alias_file: pathlib.Path) -> bool:
    return (result.stderr.count("\n") == 1 and result.stderr.startswith("pneumo: alias champion of tinynet is broken")
            or result.stderr.startswith("pneumo: alias champion of tinynet points at")) and str(alias_file) in result.stderr


# Every form of broken pointer is in test_registry.py; here the two that raised KeyError and TypeError on main.
@pytest.mark.parametrize("content", [BROKEN["empty"], BROKEN["version-list"]], ids=["empty", "version-list"])
def test_predict_refuses_list_goes_on_and_promote_repairs(tmp_path, shared_data, content):
    root = str(tmp_path / "registry")
    register_two(root)
    alias_file = pathlib.Path(root, "tinynet", "aliases", "champion.json")
    alias_file.write_bytes(content)
    normal, _ = xray_pair(shared_data)

    predicted = run_pneumo("predict", str(normal), "--registry", root)
    assert predicted.returncode == 2 and one_line_naming(predicted, alias_file), predicted.stderr

    listed = run_pneumo("models", "list", "--registry", root)
    assert listed.returncode == 0 and one_line_naming(listed, alias_file), listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["v0001", "v0002"]

    promoted = run_pneumo("models", "promote", "v0002", "--registry", root, "--reason", "repair")
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.startswith("tinynet champion: (broken: alias champion of tinynet ") and promoted.stdout.endswith(" -> v0002\n")
    assert registry.get_alias(root, "tinynet", "champion") == "v0002"
    move = registry.alias_history(root, "tinynet", "champion")[-1]
    assert (move["to"], move["how"], move["reason"]) == ("v0002", "by hand", "promoted by hand: repair")
    assert str(alias_file) in move["repaired"]


def test_serve_refuses_a_broken_champion_in_one_line(tmp_path):
    root = str(tmp_path / "registry")
    register_two(root)
    alias_file = pathlib.Path(root, "tinynet", "aliases", "champion.json")
    alias_file.write_bytes(BROKEN["v9999"])
    served = run_pneumo("serve", "--registry", root, "--port", "1")  # refused before it listens
    assert served.returncode == 2 and one_line_naming(served, alias_file), served.stderr
