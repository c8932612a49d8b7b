"""valves_schema/ is generated from the code and must not drift; its examples must validate."""

import json
from pathlib import Path

import pytest

from tests.guard_loader import load_guard
from valves_schema import generate

ROOT = Path(__file__).resolve().parent.parent

EXAMPLES = sorted((ROOT / "valves_schema" / "examples").glob("*.json"))


def test_checked_in_schema_matches_the_code():
    assert generate.SCHEMA_FILE.read_text(encoding="utf-8") == generate.render(), (
        "valves_schema/valves.schema.json is out of date: run `make schema` and commit it"
    )


def test_there_is_an_example_per_common_policy():
    assert [p.stem for p in EXAMPLES] == ["admin-only", "automation-group", "monitor", "users-chat-only"]


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in EXAMPLES])
def test_example_validates(path):
    module = load_guard()
    data = json.loads(path.read_text(encoding="utf-8"))
    assert set(data) <= set(module.Valves.model_fields), "unknown valve names in the example"
    module.policy_from_valves(module.Valves(**data))
