"""`bench fuzz --target edge`: hostile HTTP against `splitveil edge` (the OpenAI-compatible front, as shipped: a child
process `splitveil edge --local` with its API key in a file it makes) while an honest client asks it for greedy
completions.

The cases are `edge_cases`' (malformed JSON, wrong types for every field, huge fields, unknown fields, wrong methods
and paths, bad Authorization and Host headers, Content-Length lies, chunked bodies past the cap, slowloris, slow and
vanishing streaming clients, floods of hundreds of streams at once); each request goes out on its own TCP connection
from raw sockets, and its answer is read and judged here (`judge`): a well-formed HTTP answer, 4xx with the OpenAI
error JSON for bad input, 2xx only for valid requests (a streamed one ending `data: [DONE]`), never 5xx, never a
silence longer than the timeout. Malformed HTTP itself (a bad Content-Length, a broken chunk size) is refused by
uvicorn before the application with its own plain-text 400, which is right too. A traceback or ERROR line in the
edge's log is an unhandled path. The bystander asks for `temperature: 0` completions of token-id prompts through its
own connections and must get the unsplit model's greedy tokens every time; while hostile requests fill the edge's
places it is answered 429 and retries (counted), as an OpenAI client does.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from splitveil.harness.fuzz_core import Outcome
from splitveil.harness.fuzz_service import Target, category_names
from splitveil.harness.fuzz_targets.common import weighted
from splitveil.harness.fuzz_targets.edge_cases import (
    CATEGORIES,
    DEFAULT_WEIGHT,
    EITHER,
    HTTP_LAYER,
    KEY,
    NO_ANSWER,
    OK,
    REFUSED,
    WEIGHTS,
    EdgeRequest,
)
from splitveil.serve.process import stop_process

_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?$")


@dataclass
class Answer:
    """What came back on one connection. `status` None: closed (or left) before a status line."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False  # the whole body was read
    malformed: str = ""  # why the bytes are not an HTTP answer


def read_answer(sock: socket.socket, timeout: float, *, head_only: bool = False, slow: float = 0.0) -> Answer:
    """Reads one HTTP answer (Content-Length, chunked or until close); `slow`: a few bytes at a time, with pauses.
    Raises TimeoutError when nothing comes for `timeout` seconds."""
    answer, buffer = Answer(), b""
    step = 64 if slow else 65536

    def more() -> bytes:
        sock.settimeout(timeout)
        try:
            data = sock.recv(step)
        except socket.timeout:
            raise TimeoutError(f"no answer within {timeout:g} s") from None
        except (ConnectionError, OSError):
            return b""
        if slow:
            time.sleep(slow)
        return data

    while b"\r\n\r\n" not in buffer:
        data = more()
        if not data:
            if buffer:
                answer.malformed = f"closed inside the head: {buffer[:80]!r}"
            return answer
        buffer += data
        if len(buffer) > 65536:
            answer.malformed = "a head over 64 KiB"
            return answer
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    match = _STATUS.match(lines[0])
    if match is None:
        answer.malformed = f"not a status line: {lines[0][:80]!r}"
        return answer
    answer.status = int(match.group(1))
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            answer.malformed = f"not a header: {line[:80]!r}"
            return answer
        answer.headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if head_only:
        answer.body = rest
        return answer
    if "content-length" in answer.headers:
        size = int(answer.headers["content-length"])
        while len(rest) < size and (data := more()):
            rest += data
        answer.body, answer.complete = rest[:size], len(rest) >= size
    elif answer.headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            while b"\r\n" not in rest and (data := more()):
                rest += data
            size_line, _, rest = rest.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                break  # closed mid-stream (or garbage): incomplete
            while len(rest) < size + 2 and (data := more()):
                rest += data
            if size == 0:
                answer.complete = True
                break
            body += rest[:size]
            rest = rest[size + 2:]
        answer.body = bytes(body)
    else:
        while data := more():
            rest += data
        answer.body, answer.complete = rest, True
    return answer


def openai_error(body: bytes) -> str:
    """Why `body` is not the OpenAI error JSON ("" when it is)."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"not the OpenAI error JSON: {body[:120]!r}"
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"error fields {sorted(error) if isinstance(error, dict) else type(error).__name__}"
    if not isinstance(error["message"], str) or not error["message"].strip() or "Traceback" in error["message"]:
        return f"error message {str(error['message'])[:120]!r}"
    return ""


def served(answer: Answer) -> str:
    """Why a 2xx answer is not a served completion or model list ("" when it is)."""
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in answer.body.decode("utf-8", "replace").split("\n") if line.startswith("data: ")]
        if not answer.complete:
            return ""  # the client left or read only part of it
        if not events or events[-1] != "[DONE]":
            return f"a stream that does not end with [DONE]: {events[-1:]}"
        for event in events[:-1]:
            if "error" in json.loads(event):
                return f"an error event in a 200 stream: {event[:200]}"
        return ""
    try:
        data = json.loads(answer.body)
    except ValueError:
        return f"a 2xx answer that is not JSON: {answer.body[:120]!r}"
    return "" if isinstance(data, dict) and ("choices" in data or "data" in data or data.get("object") == "model") else (
        f"a 2xx answer that is no completion: {answer.body[:120]!r}")


def judge(request: EdgeRequest, answer: Answer, outcome: Outcome) -> bool:
    """Whether `answer` is right for `request` (its label goes into `outcome.answers`); else the failure is set."""
    if answer.malformed:
        outcome.fail("bad_reply", answer.malformed)
        return False
    status = answer.status
    if status is None:
        over_cap = request.statuses == (413,)  # a reset while the body past the cap was still being sent
        if request.send == "hold" or request.expect in (NO_ANSWER, HTTP_LAYER) or over_cap or request.send == "stream_leave":
            outcome.answers.append("http_closed")
            return True
        outcome.fail("closed_without_error", "closed without an answer")
        return False
    if status >= 500:
        outcome.fail("http_5xx", f"{status}: {answer.body[:300]!r}")
        return False
    if 200 <= status < 300:
        if request.expect in (REFUSED, HTTP_LAYER):
            outcome.fail("accepted_malformed", f"{status} to a request that must be refused")
            return False
        problem = served(answer) if request.send not in ("stream_leave", "flood") else ""
        if problem:
            outcome.fail("bad_reply", problem)
            return False
        outcome.answers.append("http_2xx")
        return True
    if not 400 <= status < 500:
        outcome.fail("bad_reply", f"status {status}")
        return False
    outcome.answers.append(f"http_4xx:{status}")
    if request.expect == HTTP_LAYER:
        return True
    problem = openai_error(answer.body) if answer.complete else ""
    if problem:
        outcome.fail("bad_reply", f"{status}: {problem}")
        return False
    header_checks = set(request.statuses) & {401, 403}  # checked before the places in flight: never 429
    if status == 429 and not header_checks:
        return True
    if request.expect == OK:
        outcome.fail("bad_reply", f"a valid request refused: {status} {answer.body[:200]!r}")
        return False
    if request.statuses and status not in request.statuses:
        outcome.fail("bad_reply", f"answered {status} where {request.statuses} was due: {answer.body[:200]!r}")
        return False
    return True


class EdgeFuzzClient:
    """Sends `edge_cases` cases to the edge at 127.0.0.1:`port` from raw sockets and judges the answers.

    Args:
        port: the edge's port; key: its API key.
        extra: the `Target.extra` of every case (host, model, vocab, context, cap, max_tokens).
        timeout: seconds to wait for any one answer before calling it a hang.
        unhandled: returns the edge's new log lines that show an unhandled path.
        settle: seconds to wait after a case before reading the log.
    """

    def __init__(self, port: int, *, key: str, extra: dict, timeout: float, unhandled=lambda: [], settle: float = 0.0):
        self.port, self.key, self.extra, self.timeout = port, key, dict(extra), timeout
        self.unhandled, self.settle = unhandled, settle

    def run_case(self, category: str, rng, *, index: int | None = None) -> Outcome:
        """Runs one case of `category` drawn from `rng`, each request on its own connection; never raises."""
        outcome = Outcome(category, index)
        try:
            requests = CATEGORIES.get(category).generate(rng, Target(extra=dict(self.extra)))
            if requests and requests[0].send == "flood":
                self._flood(requests, outcome)
            else:
                for request in requests:
                    if not self._one(request, outcome):
                        break
        except TimeoutError as error:
            outcome.fail("hang", str(error))
        except Exception as error:  # noqa: BLE001 - a defect of this harness: counted, never hidden
            outcome.fail("harness_error", f"{type(error).__name__}: {error}")
        if self.settle:
            time.sleep(self.settle)
        lines = self.unhandled()
        if lines and outcome.failure is None:
            outcome.fail("unhandled", " | ".join(lines[:3]))
        return outcome

    def _bytes(self, request: EdgeRequest) -> bytes:
        return request.data.replace(KEY.encode(), self.key.encode())

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _one(self, request: EdgeRequest, outcome: Outcome) -> bool:
        data = self._bytes(request)
        outcome.messages.append(data)
        with self._connect() as sock:
            try:
                if request.send == "dribble":
                    for at in range(len(data)):
                        sock.sendall(data[at:at + 1])
                        if request.pause:
                            time.sleep(request.pause)
                else:
                    sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered and closed before the whole request was sent: read what came
            if request.send == "hold":  # the client waits a moment, then leaves; an answer meanwhile is judged
                sock.settimeout(request.pause)
                try:
                    first = sock.recv(1, socket.MSG_PEEK)
                except socket.timeout:
                    first = b""
                except OSError:
                    first = b""
                if not first:
                    return judge(request, Answer(), outcome)
            answer = read_answer(sock, self.timeout, head_only=request.send == "stream_leave",
                                 slow=request.pause if request.send == "stream_slow" else 0.0)
        return judge(request, answer, outcome)

    def _flood(self, requests: list[EdgeRequest], outcome: Outcome) -> None:
        """Every request on its own connection at once; then each status is read, and every client leaves."""
        sockets = []
        try:
            for request in requests:
                data = self._bytes(request)
                outcome.messages.append(data)
                sock = self._connect()
                sockets.append(sock)
                sock.sendall(data)
            for request, sock in zip(requests, sockets):
                answer = read_answer(sock, self.timeout, head_only=True)
                if answer.status is not None and answer.status != 200 and not answer.malformed:
                    answer = _with_body(sock, answer, self.timeout)
                if not judge(request, answer, outcome):
                    return
        finally:
            for sock in sockets:
                sock.close()


def _with_body(sock: socket.socket, answer: Answer, timeout: float) -> Answer:
    """`answer` (read head only) with its Content-Length body."""
    size = int(answer.headers.get("content-length", "0"))
    body = answer.body
    sock.settimeout(timeout)
    while len(body) < size:
        data = sock.recv(65536)
        if not data:
            break
        body += data
    answer.body, answer.complete = body[:size], len(body) >= size
    return answer


def is_unhandled(line: str) -> bool:
    """A traceback, or a record at ERROR/CRITICAL level in uvicorn's format ("ERROR:    Exception in ASGI application")."""
    return "Traceback (most recent call last)" in line or line.startswith(("ERROR:", "CRITICAL:"))


class EdgeProcess:
    """`splitveil edge --local` as a child process on 127.0.0.1 (any free port), its API key in a file it makes,
    its output in a log file (never a pipe nobody reads)."""

    def __init__(self, model: str, cuts: tuple[int, ...], *, extra_args: tuple[str, ...] = (), startup_timeout: float = 300.0):
        self.model, self.cuts, self.extra_args, self.startup_timeout = model, cuts, extra_args, startup_timeout

    def __enter__(self) -> "EdgeProcess":
        import os

        self._folder = tempfile.TemporaryDirectory(prefix="splitveil-fuzz-edge-")
        folder = Path(self._folder.name)
        self.key_file, self.log_path = folder / "api-key", folder / "edge.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "splitveil.cli.main", "edge", "--local", "--model", self.model, "--split",
                   ",".join(map(str, self.cuts)), "--host", "127.0.0.1", "--port", "0", "--api-key-file",
                   str(self.key_file), *self.extra_args]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while (found := re.search(r"OpenAI API on http://127\.0\.0\.1:(\d+)/v1", self.log_path.read_text())) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text().strip().splitlines()[-1:] or ["no output"]
                self.__exit__()
                raise RuntimeError(f"splitveil edge did not start: {tail[0]}")
            time.sleep(0.2)
        self.port = int(found.group(1))
        self.key = self.key_file.read_text().strip()
        return self

    def __exit__(self, *_) -> None:
        stop_process(self.process, 15)
        self._log.close()
        self._folder.cleanup()


class HonestClient:
    """Greedy completions of token-id prompts over HTTP (one connection each), retrying 429 as OpenAI clients do."""

    def __init__(self, port: int, *, key: str, model: str, max_tokens: int, timeout: float):
        self.port, self.key, self.model, self.max_tokens, self.timeout = port, key, model, max_tokens, timeout
        self.retries_429 = 0

    def __call__(self, prompt_ids: list[int]) -> list[int]:
        import http.client

        body = json.dumps({"model": self.model, "prompt": prompt_ids, "max_tokens": self.max_tokens, "temperature": 0})
        deadline = time.monotonic() + self.timeout
        while True:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                connection.request("POST", "/v1/completions", body=body, headers={
                    "Content-Type": "application/json", "Authorization": f"Bearer {self.key}"})
                response = connection.getresponse()
                data = response.read()
            finally:
                connection.close()
            if response.status == 429 and time.monotonic() < deadline:
                self.retries_429 += 1
                time.sleep(0.05)
                continue
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
            return json.loads(data)["splitveil"]["token_ids"]


PROMPTS = ("The capital of France is", "List three facts about the moon.")


def run(spec, *, progress=None) -> dict:
    """`bench fuzz --target edge`: see the module's docstring."""
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.edge.openai.app import DEFAULT_MAX_PENDING, DEFAULT_MAX_REQUEST_BYTES
    from splitveil.harness.fuzz_core import Subject, fuzz_subject, locked, log_watcher
    from splitveil.harness.fuzz_service import load_lm
    from splitveil.harness.fuzz_targets.common import CallAsLM
    from splitveil.harness.load_service import Bystander
    from splitveil.core.records import environment

    names = category_names(CATEGORIES, spec.categories)
    # the flood (hundreds of messages in one case) last in each round: a short run still runs every other category
    plan = weighted(sorted(names, key=lambda name: name == "flood"), WEIGHTS, default=DEFAULT_WEIGHT)
    if len(spec.cuts) != 2:
        raise ValueError("the edge runs head and tail itself: give a Λ-split --split A,B")
    model, tokenizer = load_lm(spec.model)
    if tokenizer is None:
        raise ValueError(f"the edge serves text: {spec.model} has no tokenizer")
    unsplit = SplitCausalLM(model, tokenizer=tokenizer)
    prompts = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in PROMPTS]
    expected = [unsplit.generate(p, max_new_tokens=spec.bystander_tokens).token_ids for p in prompts]
    served_name = Path(spec.model).name if Path(spec.model).is_dir() else spec.model
    vocab = int(model.get_output_embeddings().weight.shape[0])
    context = int(getattr(model.config, "max_position_embeddings", 0) or 8192)
    valid_budget = max(1, min(4, spec.bystander_tokens // 4))
    record = {"benchmark": "fuzz", "target": "edge", "spec": asdict(spec), "environment": environment(),
              "categories": names, "edge": {"model": served_name, "cuts": list(spec.cuts), "case_weights": WEIGHTS,
                                            "max_request_bytes": DEFAULT_MAX_REQUEST_BYTES, "max_pending": DEFAULT_MAX_PENDING,
                                            "valid_request_max_tokens": valid_budget}}
    with EdgeProcess(spec.model, spec.cuts) as edge:
        unhandled = locked(log_watcher(edge.log_path, is_unhandled))
        extra = {"host": f"127.0.0.1:{edge.port}", "model": served_name, "vocab": vocab, "context": context,
                 "cap": DEFAULT_MAX_REQUEST_BYTES, "max_tokens": valid_budget}

        def honest() -> HonestClient:
            return HonestClient(edge.port, key=edge.key, model=served_name, max_tokens=spec.bystander_tokens,
                                timeout=spec.timeout_seconds)

        first = honest()
        record["edge"]["undisturbed_run_equals_reference"] = [first(p) for p in prompts] == expected
        asker = honest()
        bystander = Bystander(CallAsLM(asker), prompts, expected, spec.bystander_tokens)

        def make_client(settle: float = 0.0) -> EdgeFuzzClient:
            return EdgeFuzzClient(edge.port, key=edge.key, extra=extra, timeout=spec.timeout_seconds,
                                  unhandled=unhandled, settle=settle)

        def after() -> bool:
            return [honest()(p) for p in prompts] == expected

        subject = Subject(edge.process.pid, edge.log_path, lambda: edge.process.poll() is None, unhandled)
        result = fuzz_subject(spec, subject, make_client, bystander, after, names=plan, record=record, progress=progress)
        result["edge"]["bystander_429_retries"] = asker.retries_429
        return result
