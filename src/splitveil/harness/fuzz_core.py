"""What every `bench fuzz` target shares: outcomes and their judging vocabulary, the tally, the workers that send
cases, the replay of failures, the record and its plot.

A target (`fuzz_targets`) gives a *client* with `run_case(category, rng, index=) -> Outcome` that never raises and
judges every answer itself, a bystander (an honest client whose output is compared with an undisturbed reference),
and the server's log. `run_cases` drives clients from `workers` threads until `messages` hostile messages are sent;
`finish_record` turns the tally, the bystander and the log into the record every target writes (same shape for
every target; `target` names it).
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

FAILURES = ("hang", "handshake_timeout", "closed_without_error", "bad_reply", "accepted_malformed", "internal_error", "unhandled",
            "http_5xx", "starved", "harness_error")


@dataclass
class Outcome:
    """How the server answered one case. `failure` is None when every answer was right."""

    category: str
    index: int | None = None  # the case's number in its run (replayable with `case_rng(seed, index)`)
    messages: list = field(default_factory=list)
    answers: list = field(default_factory=list)  # "result", "ok", "error", "clean_close", "close_1009", "http_4xx", ...
    failure: str | None = None
    detail: str = ""

    def fail(self, failure: str, detail: str) -> "Outcome":
        self.failure, self.detail = failure, detail[:500]
        return self

    def reproducer(self, limit: int = 512) -> dict:
        """The failing case as data: category, failure, and each message as hex (cut at `limit` bytes)."""
        def show(message):
            data = message.encode() if isinstance(message, str) else bytes(message)
            return {"type": "text" if isinstance(message, str) else "binary", "bytes": len(data), "hex": data[:limit].hex()}
        return {"category": self.category, "case": self.index, "failure": self.failure, "detail": self.detail,
                "messages": [show(m) for m in self.messages]}


def case_rng(seed: int, index: int) -> random.Random:
    """The generator of case `index` of a run seeded `seed` (any case can be replayed alone)."""
    return random.Random(f"splitveil-fuzz:{seed}:{index}")


_LOG_LEVEL = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (ERROR|CRITICAL) ")  # `splitveil serve`'s log format


def is_unhandled_line(line: str) -> bool:
    """A log line of an unhandled path: a traceback, or a record at ERROR/CRITICAL level."""
    return "Traceback (most recent call last)" in line or bool(_LOG_LEVEL.match(line))


def log_watcher(path, is_unhandled: Callable[[str], bool] = is_unhandled_line) -> Callable[[], list[str]]:
    """Returns a function that gives the new lines of a server log that show an unhandled path (tracebacks, ERROR)."""
    state = {"offset": 0}

    def new_lines() -> list[str]:
        try:
            with open(path, "rb") as handle:
                handle.seek(state["offset"])
                chunk = handle.read()
        except FileNotFoundError:
            return []
        cut = chunk.rfind(b"\n") + 1
        state["offset"] += cut
        lines = chunk[:cut].decode("utf-8", errors="replace").splitlines()
        return [line for line in lines if is_unhandled(line)]

    return new_lines


def locked(watch: Callable[[], list[str]]) -> Callable[[], list[str]]:
    """`watch`, callable from several worker threads."""
    lock = threading.Lock()

    def call() -> list[str]:
        with lock:
            return watch()

    return call


class Tally:
    """Counts per category and in total; keeps the first reproducers of each (category, failure)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cases = 0
        self.messages = 0
        self.per_category: dict[str, Counter] = {}
        self.reproducers: list[dict] = []

    def add(self, outcome: Outcome) -> int:
        with self.lock:
            counts = self.per_category.setdefault(outcome.category, Counter())
            self.cases += 1
            counts["cases"] += 1
            sent = len(outcome.messages)
            self.messages += sent
            counts["messages"] += sent
            for answer in outcome.answers:
                counts[answer.split(":")[0]] += 1
            if outcome.failure:
                counts[f"failure:{outcome.failure}"] += 1
                if sum(1 for r in self.reproducers if (r["category"], r["failure"]) == (outcome.category, outcome.failure)) < 3:
                    self.reproducers.append(outcome.reproducer())
            return self.messages

    def summary(self) -> dict:
        total = Counter()
        for counts in self.per_category.values():
            total.update(counts)
        failures = {name: total.get(f"failure:{name}", 0) for name in FAILURES}
        return {"cases": self.cases, "messages_sent": self.messages, "error_frames": total["error"],
                "clean_closes_after_error": total["clean_close"], "errors_kept_open": total["error_kept_open"],
                "valid_results": total["result"], "ok_answers": total["ok"], "closed_1009_oversize": total["close_1009"],
                "http_4xx": total["http_4xx"], "http_closed": total["http_closed"], "http_2xx": total["http_2xx"],
                "failures": failures, "unhandled_paths": failures["unhandled"] + failures["internal_error"],
                "hangs": failures["hang"], "handshake_timeouts": failures["handshake_timeout"],
                "total_failures": sum(failures.values())}


def run_cases(make_client: Callable[[], object], names: list[str], *, messages: int, workers: int, seed: int,
              progress: Callable[[int, int], None] | None = None) -> tuple[Tally, float]:
    """Cases `0, 1, ...` (category `names[i % len]`, generator `case_rng(seed, i)`) from `workers` threads, each with
    its own client, until `messages` hostile messages are sent. Returns the tally and the seconds it took."""
    tally, counter = Tally(), {"next": 0}
    started = time.monotonic()

    def work():
        client = make_client()
        while True:
            with tally.lock:
                if tally.messages >= messages:
                    return
                index = counter["next"]
                counter["next"] += 1
            outcome = client.run_case(names[index % len(names)], case_rng(seed, index), index=index)
            sent = tally.add(outcome)
            if progress is not None:
                progress(min(sent, messages), messages)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally, time.monotonic() - started


def replay_failures(reproducers: list[dict], names: list[str], seed: int, workers: int, client, unhandled) -> None:
    """Replays each failing case alone (no other traffic), and records what it gives then.

    A server log line is blamed on the case that read the log next; with several workers (or a line logged just
    after a connection closed) that may be a neighbour. So a log-only failure that does not come back alone is
    followed by the cases just before it, and the first of those that fails alone is recorded as the likely cause.
    """
    unhandled()
    for reproducer in reproducers:
        index = reproducer["case"]
        again = client.run_case(reproducer["category"], case_rng(seed, index), index=index)
        reproducer["replayed_alone"] = {"failure": again.failure, "detail": again.detail[:300]}
        if reproducer["failure"] != "unhandled" or again.failure is not None:
            continue
        for earlier in range(index - 1, max(-1, index - 1 - 2 * workers), -1):
            neighbour = client.run_case(names[earlier % len(names)], case_rng(seed, earlier), index=earlier)
            if neighbour.failure is not None:
                reproducer["likely_cause"] = neighbour.reproducer()
                break


def finish_record(record: dict, tally: Tally, *, seconds: float, late: list[str], log_text: str, samples: list,
                  server_alive: bool) -> dict:
    """Adds the summary, the reproducers, the per-category counts and RSS to `record`, and its verdict `passed`:
    no failure, no unhandled log line or traceback, bystander identical (during and after), server alive, RSS bounded."""
    from splitveil.harness.common import rss_summary

    summary = tally.summary()
    summary["unhandled_log_lines_after_last_case"] = late[:10]
    summary["server_log_tracebacks"] = log_text.count("Traceback (most recent call last)")
    record.update({"seconds": seconds, "summary": summary, "reproducers": tally.reproducers, "server_alive": server_alive,
                   "per_category": {name: dict(counts) for name, counts in sorted(tally.per_category.items())},
                   "rss": {"timeline": samples, **rss_summary(samples)}})
    record["passed"] = bool(summary["total_failures"] == 0 and not late and summary["server_log_tracebacks"] == 0
                            and record["bystander"]["identical_to_unsplit"] and record["after_fuzz_identical"]
                            and server_alive and record["rss"]["bounded"])
    return record


@dataclass
class Subject:
    """A server under fuzz, as the run sees it: its process id (RSS), its log, and whether it still runs."""

    pid: int
    log_path: Path
    alive: Callable[[], bool]
    unhandled: Callable[[], list[str]]  # new unhandled lines of its log since the last call (thread-safe)


def fuzz_subject(spec, subject: Subject, make_client: Callable[..., object], bystander, after: Callable[[], bool], *,
                 names: list[str], record: dict, progress: Callable[[int, int], None] | None = None) -> dict:
    """The run every target shares: RSS sampled, the bystander working, `spec.messages` hostile messages from
    `spec.workers` clients (`make_client(settle=0.0)`), the failures replayed alone, `after()` (an honest client
    once the fuzzing is over: still exact?), and the record's verdict (`finish_record`)."""
    from splitveil.harness.common import RssSampler

    sampler = RssSampler(subject.pid, spec.rss_period_seconds).start()
    bystander.start()
    tally, seconds = run_cases(make_client, names, messages=spec.messages, workers=spec.workers, seed=spec.seed,
                               progress=progress)
    record["bystander"] = bystander.stop()
    replay_failures(tally.reproducers[:20], names, spec.seed, spec.workers, make_client(settle=0.5), subject.unhandled)
    try:
        record["after_fuzz_identical"] = bool(after())
    except Exception as error:  # noqa: BLE001 - a fresh honest client that fails is a finding, recorded
        record["after_fuzz_identical"], record["after_fuzz_error"] = False, f"{type(error).__name__}: {error}"[:300]
    late = subject.unhandled()
    alive = subject.alive()
    samples = sampler.stop()
    log_text = Path(subject.log_path).read_text(errors="replace") if Path(subject.log_path).is_file() else ""
    return finish_record(record, tally, seconds=seconds, late=late, log_text=log_text, samples=samples, server_alive=alive)


ANSWER_KINDS = [("error", "ERROR frame"), ("result", "valid RESULT"), ("ok", "OK"), ("close_1009", "close 1009"),
                ("http_4xx", "HTTP 4xx"), ("http_2xx", "HTTP 2xx"), ("http_closed", "closed"),
                ("served_meanwhile", "bystander served meanwhile"), ("inner_error", "sealed: trunk's ERROR"),
                ("inner_result", "sealed: valid RESULT"), ("inner_ok", "sealed: OK")]


def plot_fuzz_bench(record: dict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitveil.core.records import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(record["per_category"])
    rows = [record["per_category"][n] for n in names]
    bottom = [0] * len(names)
    for key, label in ANSWER_KINDS:
        values = [row.get(key, 0) for row in rows]
        if any(values):
            left.barh(names, values, left=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
    failures = [sum(v for k, v in row.items() if k.startswith("failure:")) for row in rows]
    if any(failures):
        left.barh(names, failures, left=bottom, color="red", label="failure")
    left.set_xlabel("answers")
    summary = record["summary"]
    target = record.get("target", "serve")
    left.set_title(f"{target}: {summary['messages_sent']} hostile messages, {summary['total_failures']} failures, "
                   f"{summary['hangs']} hangs", fontsize=10)
    left.legend(fontsize=7)
    timeline = record["rss"]["timeline"]
    right.plot([t for t, _ in timeline], [m for _, m in timeline], color="#444444")
    right.set_ylim(0, 1.15 * max([m for _, m in timeline] or [1]))
    right.set_xlabel("seconds")
    right.set_ylabel("server RSS, MiB")
    right.set_title(f"server memory; bystander identical: {record['bystander']['identical_to_unsplit']}", fontsize=10)
    return save_figure(fig, path)


def save_fuzz_bench(record: dict, out_dir, stem: str):
    from splitveil.core.records import write_json

    out_dir = Path(out_dir)
    return write_json(out_dir / f"{stem}.json", record), plot_fuzz_bench(record, out_dir / f"{stem}.png")
