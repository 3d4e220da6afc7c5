"""Records are tied to the code that made them: commit, dirty flag and diff hash taken when a run starts."""

import hashlib
import json
import subprocess

import pytest

from splitveil.core.errors import ConfigError
from splitveil.core import records


def git(root, *args):
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True).stdout


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@example.org")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "commit", "-qm", "first")
    return tmp_path


def test_clean_tree_has_no_diff_hash(repo):
    state = records.git_state(repo)
    assert state == {"git_sha": git(repo, "rev-parse", "HEAD").decode().strip(), "git_dirty": False, "git_diff_sha256": None}


def test_dirty_tree_is_flagged_with_the_hash_of_its_diff(repo):
    (repo / "code.py").write_text("x = 2\n")
    state = records.git_state(repo)
    assert state["git_dirty"] is True
    assert state["git_diff_sha256"] == hashlib.sha256(git(repo, "diff", "HEAD")).hexdigest()
    (repo / "code.py").write_text("x = 3\n")  # another change, another hash
    assert records.git_state(repo)["git_diff_sha256"] != state["git_diff_sha256"]


def test_untracked_files_do_not_make_a_tree_dirty(repo):
    (repo / "results.json").write_text("{}")
    assert records.git_state(repo)["git_dirty"] is False


def test_outside_a_checkout_the_state_is_unknown(tmp_path):
    assert records.git_state(tmp_path) == {"git_sha": "unknown", "git_dirty": None, "git_diff_sha256": None}


def test_a_published_run_refuses_a_dirty_tree_unless_allowed(repo, monkeypatch):
    monkeypatch.delenv(records.RUN_STATE_VARIABLE, raising=False)
    (repo / "code.py").write_text("x = 2\n")
    with pytest.raises(ConfigError, match="--allow-dirty"):
        records.stamp_run(allow_dirty=False, root=repo)
    state = records.stamp_run(allow_dirty=True, root=repo)
    assert state["allow_dirty"] is True and state["git_dirty"] is True


def test_records_carry_the_state_stamped_at_the_start_not_at_the_end(repo, monkeypatch):
    monkeypatch.delenv(records.RUN_STATE_VARIABLE, raising=False)
    started = records.stamp_run(allow_dirty=False, root=repo)
    (repo / "code.py").write_text("x = 2\n")  # the tree changes while the run goes on
    git(repo, "commit", "-qam", "second")
    env = records.environment()
    assert {k: env[k] for k in started} == started
    assert json.loads(json.dumps(env)) == env  # a record is plain JSON


@pytest.mark.parametrize("command", [
    ["bench", "llm"],
    ["bench", "service"],
    ["bench", "batched"],
    ["bench", "fuzz"],
    ["bench", "load"],
    ["attack", "text-sweep", "--quick"],
    ["attack", "image-sweep", "--dataset", "digits", "--quick"],
])
def test_publishing_commands_refuse_a_dirty_tree_with_one_line(command, monkeypatch, capsys, tmp_path):
    from splitveil.cli.main import main

    monkeypatch.setattr(records, "git_state", lambda root=None: {"git_sha": "0" * 40, "git_dirty": True,
                                                                "git_diff_sha256": "f" * 64})
    assert main([*command, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("splitveil: error:") and "--allow-dirty" in err, err
    assert not list(tmp_path.iterdir())  # refused before writing anything
