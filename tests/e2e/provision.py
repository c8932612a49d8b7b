"""Cached Open WebUI installations, one virtual environment per pinned release.

    python -m tests.e2e.provision                  # provision every version below
    python -m tests.e2e.provision 0.12.4           # just one
    python -m tests.e2e.provision --freeze 0.12.4  # after checking a venv: pin what it holds

Each release installs under its constraints file, tests/e2e/constraints/<version>.txt (`pip -c`,
the `pip freeze` of a venv the suite passed on), so a dependency released overnight cannot change
what CI tests. Venvs live outside the repository, under $API_KEY_GUARD_CACHE (default
~/.cache/api-key-guard/venvs/<version>); one is reused only while its marker names the same
constraints hash, so editing a constraints file re-provisions that release.

Adding a release: add it to VERSIONS, provision it (unconstrained the first time), run the e2e
suite on it, then `--freeze` it and commit the constraints file.
"""

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The releases the end-to-end suite runs against, one per variant of the internals the guard
# hooks (README, "Supported"): sync lookup and users.api_key column (0.6), api_key table and
# sync lookup with db= (0.8), async lookup without app.state.config (0.10), suffixed module
# names and current auth (0.12).
VERSIONS = ("0.12.4", "0.10.2", "0.8.12", "0.6.22")
# Installed first so pip takes the local CPU build instead of a multi-GB CUDA one.
TORCH_PIN = "torch==2.13.0"
DONE_MARKER = ".provisioned"
CONSTRAINTS_DIR = Path(__file__).resolve().parent / "constraints"
# pip freeze leaves out pip and setuptools by default; never pin the installer's own tools.
NOT_PINNED = ("pip", "setuptools", "wheel", "distribute")
FREEZE_HEADER = (
    "# pip freeze of a known-good Open WebUI {version} venv (python -m tests.e2e.provision --freeze {version}); "
    "used as pip -c"
)


class ProvisionError(RuntimeError):
    pass


def cache_root() -> Path:
    default = Path.home() / ".cache" / "api-key-guard" / "venvs"
    return Path(os.environ.get("API_KEY_GUARD_CACHE", default))


def venv_dir(version: str) -> Path:
    return cache_root() / version


def openwebui_bin(version: str) -> Path:
    return venv_dir(version) / "bin" / "open-webui"


def constraints_file(version: str) -> Path:
    return CONSTRAINTS_DIR / f"{version}.txt"


def stamp(version: str) -> str:
    """What a complete venv's marker says: the release and the hash of the constraints it was built with."""
    path = constraints_file(version)
    pinned = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else "none"
    return f"{version} constraints {pinned}\n"


def is_current(version: str) -> bool:
    marker = venv_dir(version) / DONE_MARKER
    return marker.exists() and marker.read_text() == stamp(version)


def provision(version: str) -> Path:
    """Return the venv for `version`, (re)creating it unless it was built with today's constraints."""
    venv = venv_dir(version)
    if is_current(version):
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    log_path = venv.parent / f"{version}.log"
    pip = str(venv / "bin" / "pip")
    constraints = ["-c", str(constraints_file(version))] if constraints_file(version).exists() else []
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [pip, "install", "--quiet", *constraints, TORCH_PIN],
        [pip, "install", "--quiet", *constraints, f"open-webui=={version}"],
    ]
    pinned = "pinned by " + str(constraints_file(version).name) if constraints else "UNPINNED: no constraints file"
    print(f"provisioning Open WebUI {version} into {venv} ({pinned}; a few minutes)", file=sys.stderr)
    with open(log_path, "w") as log:
        for step in steps:
            if subprocess.call(step, stdout=log, stderr=subprocess.STDOUT) != 0:
                raise ProvisionError(
                    f"provisioning Open WebUI {version} failed at `{' '.join(step[:4])}`; see {log_path}"
                )
    if not openwebui_bin(version).exists():
        raise ProvisionError(f"Open WebUI {version} installed without an `open-webui` command; see {log_path}")
    (venv / DONE_MARKER).write_text(stamp(version))
    return venv


def pinned_lines(freeze_output: str) -> list[str]:
    """`name==version` lines of `pip freeze`, minus the installer's own tools."""
    lines = [line.strip() for line in freeze_output.splitlines()]
    return [line for line in lines if "==" in line and line.split("==")[0].lower() not in NOT_PINNED]


def freeze(version: str) -> Path:
    """Write the constraints file from the venv as it is now, and mark the venv as built with it."""
    venv = venv_dir(version)
    if not (venv / DONE_MARKER).exists():
        raise ProvisionError(f"Open WebUI {version} is not provisioned; nothing to freeze")
    output = subprocess.run(
        [str(venv / "bin" / "pip"), "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
    ).stdout
    path = constraints_file(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([FREEZE_HEADER.format(version=version), *pinned_lines(output)]) + "\n")
    (venv / DONE_MARKER).write_text(stamp(version))
    return path


def main(argv: list[str] | None = None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    if args[:1] == ["--freeze"]:
        for version in args[1:]:
            print(f"Open WebUI {version}: wrote {freeze(version)}")
        return 0
    versions = args or list(VERSIONS)
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
