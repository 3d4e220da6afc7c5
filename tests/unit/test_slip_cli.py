"""`splitveil slip`: bad flags exit 2 with one line, before anything heavy is loaded."""

import pytest

from splitveil.cli.main import main


@pytest.mark.parametrize("args, message", [
    (["--protect", "weights", "--prompt", "x", "--rank", "-1"], "--rank must be >= 0"),
    (["--protect", "weights", "--prompt", "x", "--split", "2,4"], "--split belongs to --protect prompt"),
    (["--protect", "prompt", "--prompt", "x", "--split", "4"], "two cuts"),
    (["--protect", "prompt", "--prompt", "x", "--split", "2,99"], "does not fit"),
    (["--protect", "prompt", "--prompt", "   "], "prompt is empty"),
    (["--protect", "prompt", "--prompt", "x", "--rank", "2", "--energy", "0.5"], "not both"),
    (["--protect", "prompt", "--prompt", "x", "--server", "wss://127.0.0.1:1", "--log-frames", "f"], "--log-frames"),
    (["--protect", "prompt", "--prompt", "x", "--pin", "ab"], "go with --server"),
    (["--protect", "secrets", "--prompt", "x"], "secrets"),
])
def test_bad_flags_exit_2_with_one_line(capsys, args, message):
    assert main(["slip", "generate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_eval_refuses_a_missing_prompts_file(capsys, tmp_path):
    assert main(["slip", "eval", "--allow-dirty", "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["slip", "generate", "--protect", "prompt", "--prompt", "x", "--pad-to", "0"], "--pad-to"),
    (["generate", "--split", "2,28", "--prompt", "x", "--pad-to", "4"], "--protect prompt"),
    (["slip", "serve", "--bundle", "no-such-folder"], "no such bundle folder"),
    (["slip", "generate", "--protect", "weights", "--prompt", "x", "--soundness-bits", "-1"], "--soundness-bits"),
])
def test_slip_hardening_flags_exit_2_with_one_line(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_float_is_labelled_for_benchmarks_not_integrity(capsys):
    import re

    assert main(["slip", "generate", "--help"]) == 0
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out).split())
    assert "for benchmarks, not for integrity" in text
