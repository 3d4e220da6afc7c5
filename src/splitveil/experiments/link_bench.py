"""Decoding over an emulated network: `splitveil bench link`.

For each deployment (the plain Λ-split of SmolLM2 against a `splitveil serve` child process; SLIP's prompt
deployment with its executor and mask dealer as child processes) the device in this process connects to its servers
through in-process link emulators (`transport.link.Link`, one per server), and for each link condition (RTT,
bandwidth) generates the fixed prompts sequentially and with speculation, alternating, on the same connections.
Reported per run: tokens per second end to end (prefill included, as a user waits for it) and of the decode alone,
round trips per generated token, accepted drafts per pass; per condition and prompt kind: the speedup of
speculation over sequential decoding, and whether the tokens were identical (greedy).

The emulator runs on a thread of this process: its timers wake within about 1 ms, and it shares the GIL with the
device's loop (negligible at the RTTs of interest: the device waits on the network while packets cross).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from splitveil.core.errors import ConfigError
from splitveil.core.records import environment, save_figure, write_json
from splitveil.core.validate import at_least

#: the fixed prompt set: one of each kind (chat answers, a summary of a given text, rewriting a given text)
PROMPTS = {
    "chat": "What are some good habits for getting better sleep?",
    "summary": ("Summarize this text: The city council met on Tuesday to discuss the new bus routes. The council "
                "agreed to add two routes to the north of the city and to run buses every ten minutes during rush "
                "hour. The changes start in March, and tickets will cost the same as today."),
    "rewrite": ("Rewrite this text in a formal tone: hey team, the meeting is moved to friday at ten because the "
                "room is booked on thursday. bring your laptops and the sales numbers from last month."),
}
DEPLOYMENTS = ("split", "slip")


@dataclass(frozen=True)
class LinkCondition:
    rtt_ms: float
    bandwidth_mbit: float

    @property
    def label(self) -> str:
        return f"{self.rtt_ms:g} ms, {self.bandwidth_mbit:g} Mbit/s"


def conditions(rtts, bandwidths, *, wan_rtt: float = 80.0) -> tuple[LinkCondition, ...]:
    """The RTT sweep at the first (fastest) bandwidth, then the bandwidth sweep at `wan_rtt` (when it is swept)."""
    fast = bandwidths[0]
    rows = [LinkCondition(float(rtt), float(fast)) for rtt in rtts]
    if wan_rtt in rtts:
        rows += [LinkCondition(float(wan_rtt), float(bw)) for bw in bandwidths[1:]]
    return tuple(rows)


@dataclass(frozen=True)
class LinkBenchSpec:
    model: str = "smollm2-135m"
    split: tuple[int, int] = (2, 28)
    deployments: tuple[str, ...] = DEPLOYMENTS
    rtts: tuple[float, ...] = (0.0, 20.0, 80.0, 150.0)
    bandwidths: tuple[float, ...] = (1000.0, 50.0, 10.0)
    slip_rtts: tuple[float, ...] = (0.0, 20.0, 80.0)  # masked decoding: 54 round trips a pass (fused), so fewer conditions
    slip_bandwidths: tuple[float, ...] = (1000.0,)
    max_new_tokens: int = 48
    slip_max_new_tokens: int = 16
    drafter: str = "prompt-lookup"
    draft_tokens: int = 3
    draft_policy: str = "adaptive"  # edge.generate.DRAFT_POLICIES
    pairs: int = 1  # alternating (sequential, speculative) repeats per prompt and condition
    prompts: tuple[str, ...] = tuple(PROMPTS)

    def __post_init__(self):
        at_least(self, 1, "max_new_tokens", "slip_max_new_tokens", "pairs", "draft_tokens")
        unknown = set(self.deployments) - set(DEPLOYMENTS)
        if unknown or not self.deployments:
            raise ConfigError(f"bad deployments {sorted(unknown)}: choose from {', '.join(DEPLOYMENTS)}")
        if set(self.prompts) - set(PROMPTS) or not self.prompts:
            raise ConfigError(f"bad prompt kinds {list(self.prompts)}: choose from {', '.join(PROMPTS)}")
        for name in ("rtts", "slip_rtts"):
            if any(r < 0 for r in getattr(self, name)) or not getattr(self, name):
                raise ConfigError(f"{name} must be RTTs >= 0 ms")
        for name in ("bandwidths", "slip_bandwidths"):
            if any(b <= 0 for b in getattr(self, name)) or not getattr(self, name):
                raise ConfigError(f"{name} must be bandwidths > 0 Mbit/s")


def _run_pair(generate, prompt: str, spec: LinkBenchSpec, max_new_tokens: int) -> dict:
    from splitveil.edge.generate import GenerationConfig

    runs = {}
    for mode in ("off", spec.drafter):
        config = GenerationConfig(max_new_tokens=max_new_tokens, speculate=mode, draft_tokens=spec.draft_tokens,
                                  draft_policy=spec.draft_policy)
        result = generate(prompt, config)
        tokens = len(result.token_ids)
        runs["sequential" if mode == "off" else "speculative"] = {
            "token_ids": result.token_ids, "tokens": tokens, "seconds": round(result.seconds, 6),
            "tokens_per_second": tokens / result.seconds if result.seconds > 0 else None,
            "decode_tokens_per_second": result.decode_tokens_per_second,
            "round_trips": result.round_trips, "round_trips_per_token": result.round_trips / max(tokens, 1),
            "bytes_up": result.bytes_up, "bytes_down": result.bytes_down, "speculation": result.speculation,
        }
    return runs


def _sweep(deployment: str, generate, links, conditions_: tuple[LinkCondition, ...], spec: LinkBenchSpec,
           max_new_tokens: int, progress) -> list[dict]:
    from splitveil.transport.link import LinkSpec

    rows = []
    for condition in conditions_:
        for link in links:
            link.spec = LinkSpec(rtt_ms=condition.rtt_ms, bandwidth_mbit=condition.bandwidth_mbit)
        for kind in spec.prompts:
            pairs = []
            for pair in range(spec.pairs):
                if progress is not None:
                    progress(f"{deployment}: {condition.label}, {kind} prompt, pair {pair + 1}/{spec.pairs}")
                pairs.append(_run_pair(generate, PROMPTS[kind], spec, max_new_tokens))
            speedups = [p["speculative"]["tokens_per_second"] / p["sequential"]["tokens_per_second"] for p in pairs]
            rows.append({"deployment": deployment, **asdict(condition), "prompt": kind, "runs": pairs,
                         "speedup": statistics.median(speedups), "speedups": speedups,
                         "same_tokens": all(p["speculative"]["token_ids"] == p["sequential"]["token_ids"] for p in pairs),
                         "sequential_tokens_per_second": statistics.median(p["sequential"]["tokens_per_second"] for p in pairs),
                         "speculative_tokens_per_second": statistics.median(p["speculative"]["tokens_per_second"] for p in pairs),
                         "tokens_per_pass": statistics.median(p["speculative"]["speculation"]["tokens_per_pass"] or 1.0
                                                              for p in pairs)})
    return rows


def _split_rows(spec: LinkBenchSpec, progress) -> list[dict]:
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.plan.plan import SplitPlan
    from splitveil.serve.process import ServerProcess
    from splitveil.transport.link import Link, LinkSpec

    with ServerProcess(spec.model, spec.split) as server, Link(LinkSpec(), ("127.0.0.1", server.port)) as link:
        lm = SplitCausalLM.connect(f"wss://127.0.0.1:{link.port}", token=server.token, model=spec.model,
                                   plan=SplitPlan.from_cuts(spec.split), ca_file=server.cert)
        try:
            return _sweep("split", lambda prompt, config: lm.generate(prompt, config, chat=True), [link],
                          conditions(spec.rtts, spec.bandwidths), spec, spec.max_new_tokens, progress)
        finally:
            lm.close()


def _slip_rows(spec: LinkBenchSpec, progress) -> list[dict]:
    from splitveil.plan.parts import empty_causal_lm
    from splitveil.protect.slip.dealt import DealtDevice
    from splitveil.protect.slip.fused import resolve_fuse
    from splitveil.protect.slip.runtime import DealerProcess, ExecutorProcess, ensure_bundle
    from splitveil.protect.slip.trusted import SlipConfig
    from splitveil.transport.link import Link, LinkSpec

    # the servers' bundle must have the groups the device uses: fused where the model allows (the device's default)
    fuse = resolve_fuse(empty_causal_lm(spec.model)[0], "auto")
    config = SlipConfig(mode="fixed", rank=0, layers=tuple(spec.split), include_head=True, fuse=fuse)
    bundle = ensure_bundle(spec.model, config)
    with ExecutorProcess(bundle, "fixed") as executor, DealerProcess(bundle) as dealer, \
            Link(LinkSpec(), ("127.0.0.1", executor.port)) as executor_link, \
            Link(LinkSpec(), ("127.0.0.1", dealer.port)) as dealer_link:
        device = DealtDevice(spec.model, config,
                             executor=(f"wss://127.0.0.1:{executor_link.port}", executor.token, executor.cert, None),
                             dealer=(f"wss://127.0.0.1:{dealer_link.port}", dealer.token, dealer.cert, None),
                             fuse="on" if fuse else "off")
        with device:
            return _sweep("slip", lambda prompt, cfg: device.generate(prompt, cfg, chat=True)[0],
                          [executor_link, dealer_link], conditions(spec.slip_rtts, spec.slip_bandwidths), spec,
                          spec.slip_max_new_tokens, progress)


def run_link_bench(spec: LinkBenchSpec, *, progress=None) -> dict:
    rows = []
    if "split" in spec.deployments:
        rows += _split_rows(spec, progress)
    if "slip" in spec.deployments:
        rows += _slip_rows(spec, progress)
    return {"benchmark": "link", "spec": asdict(spec), "prompts": {k: PROMPTS[k] for k in spec.prompts},
            "environment": environment(), "rows": rows, "targets": targets(rows),
            "trust": "slip: the mask dealer and the executor do not collude (together they would unmask every input)",
            "note": "tokens per second end to end (prefill included); each condition's sequential and speculative "
                    "runs alternate on the same connections; links emulated in process (transport.link)"}


def targets(rows: list[dict], rtt: float = 80.0) -> dict:
    """The issue's targets at `rtt` and the fastest bandwidth: >= 1.5x on the summary and rewrite prompts, >= 1.0x
    on chat, for each deployment measured there."""
    found = {}
    for deployment in DEPLOYMENTS:
        at = [r for r in rows if r["deployment"] == deployment and r["rtt_ms"] == rtt]
        if not at:
            continue
        fastest = max(r["bandwidth_mbit"] for r in at)
        at = {r["prompt"]: r for r in at if r["bandwidth_mbit"] == fastest}
        copy = [at[k]["speedup"] for k in ("summary", "rewrite") if k in at]
        found[deployment] = {"rtt_ms": rtt, "bandwidth_mbit": fastest,
                             "speedups": {k: round(r["speedup"], 3) for k, r in at.items()},
                             "copy_prompts_met": bool(copy) and min(copy) >= 1.5,
                             "chat_met": at["chat"]["speedup"] >= 1.0 if "chat" in at else None,
                             "tokens_identical": all(r["same_tokens"] for r in at.values())}
    return found


def plot_link_bench(record: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    deployments = [d for d in DEPLOYMENTS if any(r["deployment"] == d for r in rows)]
    figure, axes = plt.subplots(len(deployments), 2, figsize=(12, 4 * len(deployments)), squeeze=False)
    colours = {"chat": "tab:blue", "summary": "tab:green", "rewrite": "tab:orange"}
    for line, deployment in enumerate(deployments):
        mine = [r for r in rows if r["deployment"] == deployment]
        fastest = max(r["bandwidth_mbit"] for r in mine)
        by_rtt = [r for r in mine if r["bandwidth_mbit"] == fastest]
        wan = [r for r in mine if r["rtt_ms"] == 80.0]
        for axis, subset, key, label in ((axes[line][0], by_rtt, "rtt_ms", "RTT (ms)"),
                                         (axes[line][1], wan, "bandwidth_mbit", "bandwidth (Mbit/s), RTT 80 ms")):
            for kind, colour in colours.items():
                points = sorted((r[key], r["sequential_tokens_per_second"], r["speculative_tokens_per_second"])
                                for r in subset if r["prompt"] == kind)
                if not points:
                    continue
                xs = [p[0] for p in points]
                axis.plot(xs, [p[1] for p in points], "--o", color=colour, label=f"{kind}: sequential", markersize=4)
                axis.plot(xs, [p[2] for p in points], "-o", color=colour, label=f"{kind}: speculative", markersize=4)
            if key == "bandwidth_mbit":
                axis.set_xscale("log")
            axis.set_xlabel(label)
            axis.set_ylabel("tokens / s (end to end)")
            axis.set_title(f"{deployment} ({fastest:g} Mbit/s)" if key == "rtt_ms" else f"{deployment}", fontsize=9)
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:  # a sweep with no 80 ms condition leaves the bandwidth panel empty
                axis.legend(fontsize=7)
    figure.suptitle(f"decoding over an emulated link: sequential vs speculative ({record['spec']['drafter']})",
                    fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def save_link_bench(record: dict, out_dir: Path) -> tuple[Path, Path]:
    policy = record["spec"].get("draft_policy", "adaptive")
    stem = "link_" + "-".join(record["spec"]["deployments"]) + ("" if policy == "adaptive" else f"_{policy}") + "_cpu-1thread"
    return write_json(out_dir / f"{stem}.json", record), plot_link_bench(record, out_dir / f"{stem}.png")
