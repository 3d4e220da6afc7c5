"""`progress`: a long run whose stderr goes to a log file says what it is doing, a line per new message."""

import re

from splitveil.cli.common import progress


def test_progress_writes_a_timestamped_line_per_new_message_when_stderr_is_not_a_terminal(capsys):
    with progress("training the victim ...") as spinner:
        spinner.update("3 runs done, 120 s ...")
        spinner.update("3 runs done, 120 s ...")  # unchanged: no second line
        spinner.update("frontier: walking noise, vib at cut 2 ...")
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == ""
    assert [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line) for line in lines] == [
        "training the victim ...", "3 runs done, 120 s ...", "frontier: walking noise, vib at cut 2 ..."]
    assert all(re.match(r"^\[\d\d:\d\d:\d\d\] ", line) for line in lines)


def test_progress_thins_out_a_counter_that_only_advances(capsys):
    with progress("start") as spinner:
        for done in range(1, 212):
            spinner.update(f"splitting {done}/211 matrices ...")
        spinner.update("perplexity of the residual-only model ...")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "start", "splitting 1/211 matrices ...", "perplexity of the residual-only model ..."]
