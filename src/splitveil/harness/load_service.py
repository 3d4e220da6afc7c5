"""`splitveil bench load`: many concurrent sessions against a real `splitveil serve`, then a SIGKILL and a restart.

1. Steady load: `sessions` asyncio clients on one event loop, each on its own TLS WebSocket, for `seconds`. Each
   session prefills a short prompt and then decodes step by step by sending the trunk's FORWARD frames directly,
   with the real head part's hidden states of the unsplit model's own greedy continuation (precomputed; the device
   side computes nothing during the run, so that the client does not hide the server). Every RESULT is compared
   with the trunk's output computed in-process. Recorded: errors, step latency (send to RESULT), steps/s per
   second, the server's RSS over time.
2. Restart: `restart_clients` real `SplitCausalLM` clients (head and tail on this side, one thread each) generate;
   once every one of them is mid-generation the server gets SIGKILL and is started again with the same port,
   certificate and token. Each client's `RemoteStage` replays its history into a new session; every client's
   greedy tokens must equal the unsplit model's.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from splitveil.core import validate
from splitveil.core.records import environment, save_figure, write_json
from splitveil.plan.plan import DEFAULT_LM_CUTS

PROMPTS = (
    "The capital of France is",
    "List three facts about the moon.",
    "Explain in detail how a refrigerator works.",
    "Write a short poem about the sea.",
    "What is the difference between a virus and a bacterium?",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Summarise the plot of Hamlet in two sentences.",
)


class Bystander:
    """A real split client generating greedily again and again in a thread; each run is compared with the unsplit tokens.

    Args:
        lm: a `SplitCausalLM` whose remote part runs on the server under test (recovery off, so that any harm to
            its session shows as an error).
        prompts: token-id prompts, used in turn; expected: the unsplit model's tokens for each.
        max_new_tokens: tokens per run.
    """

    def __init__(self, lm, prompts: list, expected: list[list[int]], max_new_tokens: int):
        self.lm, self.prompts, self.expected, self.max_new_tokens = lm, prompts, expected, max_new_tokens
        self.generations = 0
        self.mismatches: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bystander")

    @property
    def session(self) -> bytes | None:
        """The live session of its remote stage (what a hostile peer would try to hijack)."""
        from splitveil.wire.frame import NO_SESSION

        for stage in self.lm.stages:
            session = getattr(stage, "session", None)
            if session is not None and session != NO_SESSION:
                return session
        return None

    def start(self) -> "Bystander":
        self._thread.start()
        return self

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            which = index % len(self.prompts)
            try:
                tokens = self.lm.generate(self.prompts[which], max_new_tokens=self.max_new_tokens, eos_token_ids=()).token_ids
            except Exception as error:  # recorded: the bystander must never fail
                self.errors.append(f"{type(error).__name__}: {error}"[:300])
                time.sleep(0.5)
            else:
                self.generations += 1
                if tokens != self.expected[which]:
                    self.mismatches.append({"prompt": which, "got": tokens, "expected": self.expected[which]})
            index += 1

    def stop(self, timeout: float = 300.0) -> dict:
        self._stop.set()
        self._thread.join(timeout)
        return {"generations": self.generations, "identical_to_unsplit": self.generations > 0 and not self.mismatches
                and not self.errors, "mismatches": self.mismatches[:5], "mismatch_count": len(self.mismatches),
                "errors": self.errors[:5], "error_count": len(self.errors), "tokens_per_generation": self.max_new_tokens}


# -- the reference: real head states and trunk outputs ----------------------------------------------------------


@dataclass
class Reference:
    """For each prompt: the unsplit model's greedy continuation, the head's states and the trunk's outputs in-process."""

    prompt_ids: list[list[int]]
    tokens: list[list[int]]  # generated tokens (unsplit greedy)
    head_states: list  # [1, prompt + generated, hidden] per prompt
    trunk_outputs: list


def build_reference(model, tokenizer, cuts: tuple[int, int], prompts, new_tokens: int) -> Reference:
    import torch

    from splitveil.edge.generate import SplitCausalLM
    from splitveil.models.causal_lm import CausalLMSplittable
    from splitveil.plan.plan import SplitPlan, apply

    unsplit = SplitCausalLM(model, tokenizer=tokenizer)
    head, trunk, _ = apply(CausalLMSplittable(model), SplitPlan.from_cuts(cuts))
    ids_list, tokens, states, outputs = [], [], [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = unsplit.encode_prompt(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            generated = unsplit.generate(ids, max_new_tokens=new_tokens, eos_token_ids=()).token_ids
            head.reset(), trunk.reset()
            hidden = head(torch.tensor([ids + generated]))
            ids_list.append(ids), tokens.append(generated), states.append(hidden), outputs.append(trunk(hidden))
    return Reference(ids_list, tokens, states, outputs)


# -- phase 1: steady load with light clients ---------------------------------------------------------------------


@dataclass
class LoadTally:
    started: float = field(default_factory=time.monotonic)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, step latency s)
    prefills: int = 0
    generations: int = 0
    errors: list[str] = field(default_factory=list)
    max_relative_difference: float = 0.0  # |RESULT - in-process trunk| / max |in-process trunk|


async def _light_session(index: int, url: str, token: str, ssl_context, reference: Reference, codec_id: int,
                         stop_at: float, tally: LoadTally, timeout: float) -> None:
    import numpy as np
    from websockets.asyncio.client import connect

    from splitveil.harness.common import float_payload, raw_frame
    from splitveil.wire.frame import FrameKind, decode_frame

    def check(reply: bytes, expected) -> None:
        frame = decode_frame(reply, max_bytes=64 * 1024 * 1024, finite=False)
        if frame.kind != FrameKind.RESULT:
            raise RuntimeError(f"{frame.kind.name}: {frame.message}")
        scale = float(expected.abs().max()) or 1.0
        tally.max_relative_difference = max(tally.max_relative_difference, float((frame.tensor - expected).abs().max()) / scale)

    cycle = index
    try:
        async with connect(url, ssl=ssl_context, additional_headers={"Authorization": f"Bearer {token}"},
                           compression=None, max_size=None, open_timeout=timeout) as ws:
            while time.monotonic() < stop_at:
                which = cycle % len(reference.tokens)
                states, expected = reference.head_states[which], reference.trunk_outputs[which]
                length = len(reference.prompt_ids[which])
                await ws.send(raw_frame(kind=FrameKind.OPEN, part=0))
                session = decode_frame(await asyncio.wait_for(ws.recv(), timeout)).session
                await ws.send(raw_frame(session=session, seq=0, codec=codec_id, shape=(1, length, states.shape[-1]),
                                        payload=float_payload(np.asarray(states[:, :length]), "fp32")))
                check(await asyncio.wait_for(ws.recv(), timeout), expected[:, :length])
                tally.prefills += 1
                for position in range(length, states.shape[1]):
                    if time.monotonic() >= stop_at:
                        break
                    frame = raw_frame(session=session, seq=position - length + 1, codec=codec_id, shape=(1, 1, states.shape[-1]),
                                      payload=float_payload(np.asarray(states[:, position : position + 1]), "fp32"))
                    sent = time.monotonic()
                    await ws.send(frame)
                    reply = await asyncio.wait_for(ws.recv(), timeout)
                    tally.latencies.append((sent - tally.started, time.monotonic() - sent))
                    check(reply, expected[:, position : position + 1])
                else:
                    tally.generations += 1
                await ws.send(raw_frame(kind=FrameKind.CLOSE, session=session))
                decode_frame(await asyncio.wait_for(ws.recv(), timeout))
                cycle += len(reference.tokens) + 1
    except Exception as error:  # every error is reported; the run must have none
        tally.errors.append(f"session {index}: {type(error).__name__}: {error}"[:300])


def run_light_load(url: str, token: str, ca_file, reference: Reference, *, sessions: int, seconds: float,
                   warmup: float, timeout: float = 120.0, progress: Callable[[float], None] | None = None) -> dict:
    """Runs `sessions` light clients for `warmup + seconds`; statistics cover the last `seconds`."""
    from splitveil.transport.tls import client_context

    ssl_context = client_context(ca_file=ca_file)
    tally = LoadTally()
    stop_at = tally.started + warmup + seconds

    async def main():
        tasks = [asyncio.create_task(_light_session(i, url, token, ssl_context, reference, 1, stop_at, tally, timeout))
                 for i in range(sessions)]
        while not all(task.done() for task in tasks):
            await asyncio.sleep(1.0)
            if progress is not None:
                progress(min(time.monotonic() - tally.started, warmup + seconds))
        await asyncio.gather(*tasks)

    asyncio.run(main())
    window = [(at, latency) for at, latency in tally.latencies if warmup <= at < warmup + seconds]
    ordered = sorted(latency for _, latency in window)
    per_second = [0] * int(warmup + seconds + 1)
    for at, _ in tally.latencies:
        per_second[min(int(at), len(per_second) - 1)] += 1

    def quantile(q):
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

    return {"client": "asyncio light clients: trunk FORWARD frames with the real head's states, one TLS WebSocket each",
            "sessions": sessions, "seconds": seconds, "warmup_seconds": warmup, "errors": tally.errors[:10],
            "error_count": len(tally.errors), "decode_steps": len(window), "steps_per_second": len(window) / seconds,
            "p50_step_ms": quantile(0.50), "p90_step_ms": quantile(0.90), "p99_step_ms": quantile(0.99),
            "max_step_ms": 1000 * ordered[-1] if ordered else None, "prefills": tally.prefills,
            "completed_generations": tally.generations, "max_relative_difference_to_inprocess_trunk": tally.max_relative_difference,
            "steps_per_second_timeline": per_second, "window_latencies_ms": [round(1000 * l, 2) for _, l in window]}


# -- phase 2: SIGKILL and restart under real clients -------------------------------------------------------------


def restart_like(process: subprocess.Popen, log_path: Path, *, startup_timeout: float = 180.0) -> subprocess.Popen:
    """Starts the same `splitveil serve` command again (same port, certificate, token file); returns once it reports
    that it listens (on a fresh `--ready-fd`)."""
    from splitveil.serve.worker import start_command

    arguments = list(process.args)
    arguments = arguments[arguments.index("splitveil.cli.main") + 1:]
    if "--ready-fd" in arguments:  # the first run's pipe is closed: the restart gets its own
        at = arguments.index("--ready-fd")
        del arguments[at:at + 2]
    return start_command(arguments, log_path=log_path, timeout=startup_timeout, what="the restarted server")[0]


def run_clients_through_restart(clients: list, prompts: list, expected: list[list[int]], *, max_new_tokens: int,
                                kill_after: int, kill: Callable[[], None], restart: Callable[[], None], hold: bool = False,
                                timeout: float = 600.0) -> dict:
    """Every client generates (client i: prompts[i % len]); the server is killed once each has sent `kill_after` frames.

    Args:
        clients: `SplitCausalLM`s on the server under test, with recovery on.
        kill, restart: stop the server hard (SIGKILL), then start it again where the clients expect it.
        hold: each client waits before its `kill_after`-th frame until the kill, so that all are surely
            mid-generation (tests); else the kill comes when the last one gets there, under full load (benchmark).
    """
    count = len(clients)
    sent = [0] * count
    times: list[float] = []
    results: list[list[int] | None] = [None] * count
    errors: list[str | None] = [None] * count
    lock, reached, killed = threading.Lock(), threading.Event(), threading.Event()
    started = time.monotonic()

    def wrap(index, request):
        def counted(frame):
            with lock:
                sent[index] += 1
                mine = sent[index]
                times.append(time.monotonic() - started)
                if all(n >= kill_after for n in sent):
                    reached.set()
            if hold and mine == kill_after:
                killed.wait(timeout)
            return request(frame)
        return counted

    def generate(index):
        try:
            results[index] = clients[index].generate(prompts[index % len(prompts)], max_new_tokens=max_new_tokens,
                                                     eos_token_ids=()).token_ids
        except Exception as error:  # recorded: every client must finish
            errors[index] = f"{type(error).__name__}: {error}"[:300]

    for index, client in enumerate(clients):
        client.transport.request = wrap(index, client.transport.request)
    threads = [threading.Thread(target=generate, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    if not reached.wait(timeout):
        raise RuntimeError(f"the clients never all reached frame {kill_after}: {sent}")
    with lock:
        at_kill = list(sent)
    finished_before = sum(r is not None for r in results)
    kill_at = time.monotonic() - started
    kill()
    killed.set()
    restart()
    up_at = time.monotonic() - started
    for thread in threads:
        thread.join(timeout)
    identical = [results[i] == expected[i % len(expected)] for i in range(count)]
    recoveries = [sum(getattr(stage, "recoveries", 0) for stage in client.stages) for client in clients]
    return {"clients": count, "max_new_tokens": max_new_tokens, "kill_after_frames": kill_after,
            "frames_sent_at_kill": at_kill, "finished_before_kill": finished_before, "killed_at_seconds": kill_at,
            "listening_again_at_seconds": up_at, "identical_to_unsplit": identical, "all_identical": all(identical),
            "recoveries": recoveries, "errors": [e for e in errors if e][:10],
            "error_count": sum(e is not None for e in errors), "frame_times": times}


# -- the benchmark -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadBenchSpec:
    model: str = "smollm2-135m"
    cuts: tuple[int, int] = DEFAULT_LM_CUTS
    sessions: int = 64  # concurrent light sessions in the steady phase
    seconds: float = 60.0  # measured window
    warmup_seconds: float = 5.0  # before the window: connections, first prefills
    decode_tokens: int = 48  # decode steps per light-client generation (then CLOSE, OPEN again)
    restart_clients: int = 64  # real SplitCausalLM clients in the restart phase
    restart_tokens: int = 24  # tokens each of them generates
    kill_after_frames: int = 10  # OPEN + prefill + 8 decode steps before the SIGKILL
    # each restart client waits before that frame until the kill, so that all sessions are live at the SIGKILL: without
    # it, prefills served one per round let the first 32 of 64 clients finish before the last one started decoding
    hold_at_kill: bool = True
    rss_period_seconds: float = 0.5

    def __post_init__(self):
        """Refuses, with one line, what no run could do."""
        validate.lambda_cuts(self.cuts)
        validate.at_least(self, 1, "sessions", "decode_tokens", "restart_clients", "restart_tokens", "kill_after_frames")
        validate.at_least(self, 0, "warmup_seconds")
        validate.positive(self, "seconds", "rss_period_seconds")


def run_load_bench(spec: LoadBenchSpec, *, progress: Callable[[str, float, float], None] | None = None) -> dict:
    """Runs both phases against one `splitveil serve` process (restarted in phase 2); returns the record."""
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.harness.fuzz_core import log_watcher
    from splitveil.models.loading import load_causal_lm
    from splitveil.plan.plan import SplitPlan
    from splitveil.serve.process import ServerProcess
    from splitveil.transport.network import WebSocketTransport

    def note(stage, done, total):
        if progress is not None:
            progress(stage, done, total)

    note("reference: unsplit generations and the head's states", 0, 1)
    model, tokenizer = load_causal_lm(spec.model)
    reference = build_reference(model, tokenizer, spec.cuts, PROMPTS, max(spec.decode_tokens, spec.restart_tokens))
    record = {"benchmark": "load", "spec": asdict(spec), "environment": environment(), "prompts": list(PROMPTS)}
    extra = ["--max-sessions", str(max(spec.sessions, spec.restart_clients) + 8)]
    with ServerProcess(spec.model, spec.cuts, extra_args=extra) as server:
        sampler = RssSampler(server.process.pid, spec.rss_period_seconds).start()
        unhandled = log_watcher(server.log_path)
        total = spec.warmup_seconds + spec.seconds
        record["load"] = run_light_load(server.url, server.token, server.cert, reference, sessions=spec.sessions,
                                        seconds=spec.seconds, warmup=spec.warmup_seconds,
                                        progress=lambda done: note(f"load: {spec.sessions} sessions", done, total))
        record["load"]["rss_phase_end_seconds"] = time.monotonic() - sampler.started
        record["load"]["server_unhandled_log_lines"] = unhandled()[:10]
        if spec.restart_clients > 0:
            note("restart: real clients, SIGKILL, restart", 0, 1)
            plan = SplitPlan.from_cuts(spec.cuts)
            clients = []
            for _ in range(spec.restart_clients):
                lm = SplitCausalLM(model, plan, tokenizer=tokenizer,
                                   transport=WebSocketTransport(server.url, token=server.token, ca_file=server.cert, timeout=300))
                for stage in lm.stages:
                    if hasattr(stage, "recover_seconds"):
                        stage.recover_seconds = 300.0
                clients.append(lm)
            prompts = reference.prompt_ids
            restart_log = Path(server.log_path).with_name("server-restarted.log")
            killed = {}

            def kill():
                killed["rss_mib_before"] = (rss_kib(server.process.pid) or 0) / 1024
                killed["at"] = time.monotonic() - sampler.started
                server.process.send_signal(signal.SIGKILL)
                server.process.wait(30)
                killed["returncode"] = server.process.returncode

            def restart():
                old = server.process
                server.process = restart_like(old, restart_log)
                sampler.pid = server.process.pid
                killed["up_at"] = time.monotonic() - sampler.started

            expected = [tokens[: spec.restart_tokens] for tokens in reference.tokens]
            restart_record = run_clients_through_restart(clients, prompts, expected, max_new_tokens=spec.restart_tokens,
                                                         kill_after=spec.kill_after_frames, kill=kill, restart=restart,
                                                         hold=spec.hold_at_kill)
            for lm in clients:
                lm.close()
            restart_record.update({"rss_timeline_kill_at_seconds": killed.get("at"), "restart_listening_at_seconds": killed.get("up_at"),
                                   "killed_returncode": killed.get("returncode"), "client": "SplitCausalLM (head and tail here) in threads",
                                   "server_unhandled_log_lines": log_watcher(restart_log)()[:10]})
            record["restart"] = restart_record
        samples = sampler.stop()
    record["rss"] = {"timeline": samples, **rss_summary([s for s in samples if s[0] <= record["load"]["rss_phase_end_seconds"]])}
    restart = record.get("restart", {"all_identical": True, "error_count": 0})
    record["passed"] = bool(record["load"]["error_count"] == 0 and not record["load"]["server_unhandled_log_lines"]
                            and record["rss"]["bounded"] and restart["all_identical"] and restart["error_count"] == 0)
    return record


def plot_load_bench(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load, restart, rss = record["load"], record.get("restart"), record["rss"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    timeline = load["steps_per_second_timeline"]
    ax.plot(range(len(timeline)), timeline, "-", color="#3b7dd8")
    ax.axvspan(0, load["warmup_seconds"], color="#dddddd", label="warm-up (not counted)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("trunk decode steps/s (all sessions)")
    ax.set_title(f"{load['sessions']} sessions over TLS: {load['steps_per_second']:.1f} steps/s, {load['error_count']} errors")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.hist([ms for ms in _latencies_ms(record)], bins=60, color="#d8743b")
    for q, style in (("p50_step_ms", "--"), ("p99_step_ms", ":")):
        if load[q] is not None:
            ax.axvline(load[q], color="black", linestyle=style, label=f"{q[:3]} {load[q]:.0f} ms")
    ax.set_xlabel("step latency, ms (send to RESULT)")
    ax.set_ylabel("steps")
    ax.set_title("decode step latency in the window")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.plot([t for t, _ in rss["timeline"]], [m for _, m in rss["timeline"]], color="#444444")
    ax.axvline(load["rss_phase_end_seconds"], color="#3b7dd8", linestyle="--", label="end of the load phase")
    if restart and restart.get("rss_timeline_kill_at_seconds") is not None:
        ax.axvline(restart["rss_timeline_kill_at_seconds"], color="red", linestyle=":", label="SIGKILL")
        ax.axvline(restart["restart_listening_at_seconds"], color="green", linestyle=":", label="restarted")
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS, MiB")
    ax.set_ylim(0, 1.15 * max([m for _, m in rss["timeline"]] or [1]))
    ax.set_title("server memory (VmRSS)")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    if not restart:
        ax.set_axis_off()
        return save_figure(fig, path)
    times = sorted(restart["frame_times"])
    ax.plot(times, range(1, len(times) + 1), color="#444444")
    ax.axvline(restart["killed_at_seconds"], color="red", linestyle=":", label="SIGKILL")
    ax.axvline(restart["listening_again_at_seconds"], color="green", linestyle=":", label="listening again")
    ax.set_xlabel("seconds")
    ax.set_ylabel("frames sent by all clients (incl. retries)")
    ax.set_title(f"restart: {sum(restart['identical_to_unsplit'])}/{restart['clients']} clients identical to unsplit")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _latencies_ms(record: dict) -> list[float]:
    return record["load"].get("window_latencies_ms", [])


def save_load_bench(record: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    return write_json(out_dir / f"{stem}.json", record), plot_load_bench(record, out_dir / f"{stem}.png")
