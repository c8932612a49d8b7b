"""The one way tests (and valves_schema/generate.py) load the guard: install.py's loader, which runs it
the way Open WebUI's loader does (utils/plugin.py), under a fresh module name each time."""

import types
import uuid

from install import GUARD_FILE, guard_module


def load_guard(function_id: str = "api_key_guard", source: str | None = None) -> types.ModuleType:
    content = GUARD_FILE.read_text(encoding="utf-8") if source is None else source
    return guard_module(content, GUARD_FILE, f"function_{function_id}_{uuid.uuid4().hex}")
