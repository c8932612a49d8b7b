"""Regenerate the checked-in JSON Schema of the guard's Valves.

    python -m valves_schema.generate      (or `make schema`)

The schema is generated with no API_KEY_GUARD_* environment presets, so it
documents the built-in defaults.
"""

import json
import os
import sys
from pathlib import Path

from tests.guard_loader import load_guard

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "valves_schema" / "valves.schema.json"
PRESET_NAMES = ("API_KEY_GUARD_", "API_KEY_ALLOWED_ENDPOINTS_")


def valves_model():
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(PRESET_NAMES)}
    try:
        return load_guard().Valves
    finally:
        os.environ.update(saved)


def render() -> str:
    schema = valves_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "API Key Guard valves"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> int:
    SCHEMA_FILE.write_text(render(), encoding="utf-8")
    print(f"wrote {SCHEMA_FILE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
