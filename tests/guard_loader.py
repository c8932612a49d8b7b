"""The one way tests (and valves_schema/generate.py) load the guard: the way Open WebUI's loader does
(utils/plugin.py), with install.py's copy of its import rewriting."""

import sys
import types
import uuid

from install import GUARD_FILE, as_stored


def load_guard(function_id: str = "api_key_guard", source: str | None = None) -> types.ModuleType:
    """Register a fresh module in sys.modules, exec the source in it, drop it again."""
    content = as_stored(GUARD_FILE.read_text(encoding="utf-8") if source is None else source)
    name = f"function_{function_id}_{uuid.uuid4().hex}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(compile(content, str(GUARD_FILE), "exec"), module.__dict__)
    finally:
        sys.modules.pop(name, None)
    return module
