"""What is written from the Valves model must not drift: the JSON Schema, the README's valves table, and the
example valve files (which must validate, and which the README shows as they are)."""

import json
from pathlib import Path

import pytest

from tests.guard_loader import load_guard
from valves_schema import generate

ROOT = Path(__file__).resolve().parent.parent

EXAMPLES = sorted((ROOT / "valves_schema" / "examples").glob("*.json"))
README_LIMIT_BYTES = 14 * 1024  # issue 22: the admin's page stays short; everything else lives in docs/


def readme() -> str:
    return generate.README_FILE.read_text(encoding="utf-8")


def test_checked_in_schema_matches_the_code():
    assert generate.SCHEMA_FILE.read_text(encoding="utf-8") == generate.render(), (
        "valves_schema/valves.schema.json is out of date: run `make schema` and commit it"
    )


def test_readme_valves_table_matches_the_code():
    assert readme() == generate.with_valves_table(readme()), (
        "README.md's valves table is out of date: run `make schema` and commit it"
    )


def table_rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines() if line.startswith("| `")]


def test_the_table_has_one_row_per_valve_in_the_models_order_with_its_default_and_description():
    model = load_guard().Valves
    rows = table_rows(generate.valves_table())
    assert [name.strip("`") for name, _, _ in rows] == list(model.model_fields)
    by_name = {name.strip("`"): (default, what) for name, default, what in rows}
    assert by_name["api_key_roles"][0] == "`admin`"
    assert by_name["api_key_groups"][0] == "*(empty)*"
    assert by_name["route_guard"][0] == "`true`"
    assert by_name["priority"][0] == "`-100`"
    assert by_name["usage_retention_days"][0] == "`90` (1 to 3650)"
    assert by_name["audit_log"][1] == model.model_fields["audit_log"].description


def test_the_table_documents_the_built_in_defaults_not_the_environment(monkeypatch):
    before = generate.valves_table()
    monkeypatch.setenv("API_KEY_GUARD_API_KEY_ROLES", "admin,user")
    monkeypatch.setenv("API_KEY_ALLOWED_ENDPOINTS_USER", "*")
    assert generate.valves_table() == before


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all\n",
        f"{generate.TABLE_BEGIN}\nonly the first\n",
        f"{generate.TABLE_END}\n{generate.TABLE_BEGIN}\n",
        f"{generate.TABLE_BEGIN}\n{generate.TABLE_END}\n{generate.TABLE_BEGIN}\n{generate.TABLE_END}\n",
    ],
    ids=["none", "begin-only", "reversed", "twice"],
)
def test_the_generator_refuses_a_readme_without_one_pair_of_markers(text):
    with pytest.raises(ValueError):
        generate.with_valves_table(text)


def test_the_generator_replaces_only_what_is_between_the_markers():
    text = f"before\n{generate.TABLE_BEGIN}\nstale table\n{generate.TABLE_END}\nafter\n"
    done = generate.with_valves_table(text)
    assert done == f"before\n{generate.TABLE_BEGIN}\n{generate.valves_table()}\n{generate.TABLE_END}\nafter\n"
    assert generate.with_valves_table(done) == done


def test_readme_stays_short():
    assert len(readme().encode("utf-8")) < README_LIMIT_BYTES


def test_there_is_an_example_per_common_policy():
    assert [p.stem for p in EXAMPLES] == ["admin-only", "automation-group", "group-tiers", "monitor", "users-chat-only"]


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in EXAMPLES])
def test_example_validates(path):
    module = load_guard()
    data = json.loads(path.read_text(encoding="utf-8"))
    assert set(data) <= set(module.Valves.model_fields), "unknown valve names in the example"
    module.policy_from_valves(module.Valves(**data))


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in EXAMPLES])
def test_readme_shows_the_example_as_it_is(path):
    shown = f"```json\n{path.read_text(encoding='utf-8').strip()}\n```"
    assert shown in readme(), f"README.md must show {path.relative_to(ROOT)} exactly as the file holds it"
