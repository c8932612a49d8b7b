import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guard_loader import load_guard


@pytest.fixture(scope="session")
def guard():
    """The guard module, loaded the way Open WebUI loads a function."""
    return load_guard()
