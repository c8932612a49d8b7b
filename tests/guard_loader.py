"""Load the guard exactly the way Open WebUI's loader does (utils/plugin.py)."""

import sys
import types
import uuid
from pathlib import Path

GUARD_FILE = Path(__file__).resolve().parent.parent / "filters" / "api_key_guard.py"
REWRITTEN = ("from utils", "from apps", "from main", "from config")


def load_guard(function_id: str = "api_key_guard", source: str | None = None) -> types.ModuleType:
    """Register a fresh module in sys.modules, exec the source in it, drop it again."""
    content = GUARD_FILE.read_text(encoding="utf-8") if source is None else source
    for prefix in REWRITTEN:  # the loader rewrites these substrings everywhere
        content = content.replace(prefix, "from open_webui." + prefix.split()[1])
    name = f"function_{function_id}_{uuid.uuid4().hex}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(compile(content, str(GUARD_FILE), "exec"), module.__dict__)
    finally:
        sys.modules.pop(name, None)
    return module
