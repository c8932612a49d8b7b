"""The end-to-end suite as two pytest sessions at once, split by release:

    python -m tests.e2e.streams

The suite waits on servers more than it computes: as one session it kept one of the machine's two
cores busy (97% of one core over 42 minutes, measured on the project machine), so two sessions, one
for the newest and the oldest release and one for the others (and the rows of no release), finish in
a little more than half the time. Each session starts its own servers and stores on free ports, in a
--basetemp of its own under a new /tmp/api-key-guard-e2e-*; nothing is shared between them. Each
one's output goes to a log, printed whole once it ends. The exit code is non-zero when either session
failed; the last lines add both up (a session that ended without pytest's closing line counts as one
failure).

It takes no arguments (a -k or -q of yours would undo the split or its read-out): to run one release or
one module, call pytest itself (CONTRIBUTING.md)."""

import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .provision import VERSIONS

FIRST = (VERSIONS[0], VERSIONS[-1])  # the newest release (the most rows) with the oldest (the fewest)
SELECTION = " or ".join(f"owui-{v}" for v in FIRST)
STREAMS = (("newest-and-oldest", SELECTION), ("the-others", f"not ({SELECTION})"))
OUTCOME = re.compile(r"(\d+) (passed|failed|errors?|skipped|xpassed|xfailed)")
ADVERSARIAL = re.compile(
    r"^adversarial: (\d+) cases run, (\d+) passed, bypasses found = (\d+)[^;]*; per release passed/run: ([^;]*)"
    r"(?:; per class: (.*))?$"
)
STOP_SECONDS = 120.0  # a session's teardown after an interrupt: it stops every server it started
PASSED_OF_RUN = re.compile(r"([\w.]+):? (\d+)/(\d+)")


@dataclass
class Stream:
    name: str
    selection: str
    log: Path
    process: subprocess.Popen
    started: float
    seconds: float = 0.0

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(name: str, selection: str, root: Path) -> Stream:
    log = root / f"{name}.log"
    argv = [sys.executable, "-m", "pytest", "-m", "e2e", "-k", selection, f"--basetemp={root / name}"]
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Stream(name, selection, log, process, time.monotonic())


def outcomes(output: str) -> Counter:
    """The counts of pytest's closing line (`=== 12 passed, 1 skipped in 3.2s ===`)."""
    closing = [line for line in output.splitlines() if line.startswith("=") and " in " in line]
    counts = Counter()
    for number, word in OUTCOME.findall(closing[-1] if closing else ""):
        counts["errors" if word.startswith("error") else word] += int(number)
    return counts


def adversarial_line(outputs: list[str]) -> str | None:
    """The sessions' `adversarial:` summary lines as one (their releases do not overlap)."""
    run = passed = bypasses = 0
    releases, classes = [], {"run": Counter(), "passed": Counter()}
    for output in outputs:
        for line in output.splitlines():
            found = ADVERSARIAL.match(line)
            if not found:
                continue
            run, passed, bypasses = run + int(found[1]), passed + int(found[2]), bypasses + int(found[3])
            releases += [part.strip() for part in found[4].split(",") if part.strip()]
            for kind, good, total in PASSED_OF_RUN.findall(found[5] or ""):
                classes["run"][kind] += int(total)
                classes["passed"][kind] += int(good)
    if not run:
        return None
    releases.sort(key=lambda part: [int(n) for n in part.split(":")[0].split(".") if n.isdigit()])
    per_class = ", ".join(f"{kind} {classes['passed'][kind]}/{classes['run'][kind]}" for kind in classes["run"])
    return (
        f"adversarial: {run} cases run, {passed} passed, bypasses found = {bypasses}; per release passed/run: "
        + ", ".join(releases)
        + (f"; per class: {per_class}" if per_class else "")
    )


def session_outcomes(stream: Stream) -> Counter:
    counts = outcomes(stream.output)
    if stream.process.returncode != 0 and not (counts["failed"] or counts["errors"]):
        counts["errors"] += 1  # ended without saying what failed: crashed, killed, or collected nothing
    return counts


def main(argv: list[str]) -> int:
    if argv:
        print("usage: python -m tests.e2e.streams (no arguments; for a part of the suite run pytest itself)")
        return 2
    root = Path(tempfile.mkdtemp(prefix="api-key-guard-e2e-"))
    streams: list[Stream] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # ended from outside: end the sessions too
    try:
        streams = [start(name, selection, root) for name, selection in STREAMS]
        print(f"e2e: {len(streams)} pytest sessions at once, logs in {root}", flush=True)
        waiting = list(streams)
        while waiting:
            for stream in list(waiting):
                if stream.process.poll() is not None:
                    stream.seconds = time.monotonic() - stream.started
                    waiting.remove(stream)
                    print(f"\n===== e2e session {stream.name} (-k {stream.selection!r}) =====", flush=True)
                    sys.stdout.write(stream.output)
                    print(f"===== {stream.name}: exit {stream.process.returncode} after {stream.seconds:.0f} s")
            time.sleep(1.0)
    finally:
        for stream in streams:
            if stream.process.poll() is None:
                stream.process.send_signal(signal.SIGINT)  # pytest stops on it and tears its servers down
                try:
                    stream.process.wait(timeout=STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    stream.process.kill()
                    stream.process.wait()
    total = sum((session_outcomes(s) for s in streams), Counter())
    if (line := adversarial_line([s.output for s in streams])) is not None:
        print(line)
    print(
        f"e2e sessions: {', '.join(f'{s.name} {s.seconds:.0f} s (exit {s.process.returncode})' for s in streams)}; "
        f"{total['xpassed']} xpassed, {total['xfailed']} xfailed, {total['errors']} errors"
    )
    print(f"e2e: {total['passed']} passed, {total['failed'] + total['errors']} failed, {total['skipped']} skipped")
    return 0 if all(s.process.returncode == 0 for s in streams) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
