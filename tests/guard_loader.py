"""Load the guard exactly the way Open WebUI's loader does (utils/plugin.py)."""

import sys
import types
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from install import GUARD_FILE, as_stored  # noqa: E402  (the loader's import rewriting, in one place)


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
