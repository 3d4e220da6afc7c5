"""`progress`: a long run whose stderr goes to a log file says what it is doing, a line per new message."""

import re

from splitveil.cli.common import progress


def test_progress_writes_a_timestamped_line_per_new_message_when_stderr_is_not_a_terminal(capsys):
    with progress("training the victim ...") as spinner:
        spinner.update("3 runs done, 120 s ...")
        spinner.update("3 runs done, 120 s ...")  # unchanged: no second line
        spinner.update("4 runs done, 180 s ...")
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == ""
    assert [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line) for line in lines] == [
        "training the victim ...", "3 runs done, 120 s ...", "4 runs done, 180 s ..."]
    assert all(re.match(r"^\[\d\d:\d\d:\d\d\] ", line) for line in lines)
