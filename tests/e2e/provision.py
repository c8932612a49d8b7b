"""Cached Open WebUI installations, one virtual environment per pinned release.

    python -m tests.e2e.provision            # provision every version below
    python -m tests.e2e.provision 0.12.4     # just one

Venvs live outside the repository, under $API_KEY_GUARD_CACHE (default
~/.cache/api-key-guard/venvs/<version>), and are reused once complete.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The supported releases the end-to-end suite runs against. Adding one is this one line.
VERSIONS = ("0.12.4", "0.10.2", "0.8.12", "0.6.22")
# Installed first so pip takes the local CPU build instead of a multi-GB CUDA one.
TORCH_PIN = "torch==2.13.0"
DONE_MARKER = ".provisioned"


class ProvisionError(RuntimeError):
    pass


def cache_root() -> Path:
    default = Path.home() / ".cache" / "api-key-guard" / "venvs"
    return Path(os.environ.get("API_KEY_GUARD_CACHE", default))


def venv_dir(version: str) -> Path:
    return cache_root() / version


def openwebui_bin(version: str) -> Path:
    return venv_dir(version) / "bin" / "open-webui"


def provision(version: str) -> Path:
    """Return the venv for `version`, creating it on first use."""
    venv = venv_dir(version)
    if (venv / DONE_MARKER).exists():
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    log_path = venv.parent / f"{version}.log"
    pip = str(venv / "bin" / "pip")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [pip, "install", "--quiet", TORCH_PIN],
        [pip, "install", "--quiet", f"open-webui=={version}"],
    ]
    print(f"provisioning Open WebUI {version} into {venv} (first run only, a few minutes)", file=sys.stderr)
    with open(log_path, "w") as log:
        for step in steps:
            if subprocess.call(step, stdout=log, stderr=subprocess.STDOUT) != 0:
                raise ProvisionError(
                    f"provisioning Open WebUI {version} failed at `{' '.join(step[:4])}`; see {log_path}"
                )
    if not openwebui_bin(version).exists():
        raise ProvisionError(f"Open WebUI {version} installed without an `open-webui` command; see {log_path}")
    (venv / DONE_MARKER).write_text(version)
    return venv


def main(argv: list[str] | None = None) -> int:
    versions = (argv if argv is not None else sys.argv[1:]) or list(VERSIONS)
    with ThreadPoolExecutor(max_workers=len(versions)) as pool:  # each is mostly download and unpack
        futures = {version: pool.submit(provision, version) for version in versions}
    failed = False
    for version, future in futures.items():
        try:
            print(f"Open WebUI {version}: {future.result()}")
        except ProvisionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
