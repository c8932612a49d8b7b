"""The e2e runner's read-out of its two pytest sessions (tests/e2e/streams.py)."""

from types import SimpleNamespace

import pytest

from tests.e2e import streams

A = (
    "adversarial: 335 cases run, 335 passed, bypasses found = 0; per release passed/run: 0.6.22: 165/165, "
    "0.12.4: 170/170; per class: dos 18/18, workspace 16/16"
)
B = (
    "adversarial: 335 cases run, 334 passed, bypasses found = 1 (x); per release passed/run: 0.8.12: 166/166, "
    "0.10.2: 168/169; per class: dos 18/18, workspace 15/16"
)


@pytest.mark.parametrize(
    ("output", "counts"),
    [
        pytest.param(
            "== 12 passed, 3 skipped, 1 xpassed in 9.1s ==", {"passed": 12, "skipped": 3, "xpassed": 1}, id="ok"
        ),
        pytest.param("== 1 failed, 2 passed, 1 error in 2s ==", {"failed": 1, "passed": 2, "errors": 1}, id="failed"),
        pytest.param("crashed before the end", {}, id="no-closing-line"),
    ],
)
def test_outcomes_read_the_closing_line(output, counts):
    assert streams.outcomes(f"collected 3 items\n{output}\n") == counts


def test_the_adversarial_lines_add_up():
    assert streams.adversarial_line([f"x\n{A}\n", f"{B}\n"]) == (
        "adversarial: 670 cases run, 669 passed, bypasses found = 1; per release passed/run: 0.6.22: 165/165, "
        "0.8.12: 166/166, 0.10.2: 168/169, 0.12.4: 170/170; per class: dos 36/36, workspace 31/32"
    )


def test_the_sessions_split_every_release_once():
    first, rest = (selection for _, selection in streams.STREAMS)
    assert (first, rest) == ("owui-0.12.4 or owui-0.6.22", "not (owui-0.12.4 or owui-0.6.22)")


@pytest.mark.parametrize(
    ("code", "output", "failures"),
    [
        pytest.param(0, "== 3 passed in 1s ==", 0, id="passed"),
        pytest.param(1, "== 1 failed, 2 passed in 1s ==", 1, id="failed"),
        pytest.param(-9, "tests/e2e/test_x.py ..", 1, id="killed-without-a-closing-line"),
        pytest.param(5, "== 2542 deselected in 1s ==", 1, id="collected-nothing"),
    ],
)
def test_a_session_that_ended_without_its_closing_line_counts_as_a_failure(tmp_path, code, output, failures):
    log = tmp_path / "s.log"
    log.write_text(output + "\n")
    stream = streams.Stream("s", "", log, SimpleNamespace(returncode=code), 0.0)
    counts = streams.session_outcomes(stream)
    assert counts["failed"] + counts["errors"] == failures
