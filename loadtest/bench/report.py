"""The ``lma bench`` report: Markdown (targets, the graph alone, closed and open loop) and a latency plot."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.bench.config import CONFIRM_STEP, CONFIRM_TRIES, DRIFT_LIMIT, OPEN_PROBE_S, OPEN_PROBES, SUSTAINED
from loadtest.bench.results import BenchReport, RunRecord

KEEP_START, KEEP_END = "<!-- keep -->", "<!-- /keep -->"
LOPSIDED_CORES = 1.15  # a server of several processes at no more CPU than this ran its cell on one of them


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def _status(load: dict[str, Any]) -> str:
    parts = [f"{code}: {n:,}" for code, n in sorted(load["status"].items(), key=lambda kv: int(kv[0]))]
    return ", ".join(parts) or "–"


def _failures(load: dict[str, Any]) -> str:
    parts = [f"{kind} {n:,}" for kind, n in sorted(load["errors"].items())]
    return ", ".join(parts) or "0"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


# --- the numbers the targets are judged on ---


def _servers(report: BenchReport) -> tuple[list[str], str | None]:
    names = list(dict.fromkeys(r.server for r in report.runs if r.mode == "closed"))
    project = [n for n in names if n.startswith("lma serve")]
    reference = next((n for n in names if n.startswith("reference")), None)
    return project, reference


def _default_project(report: BenchReport) -> str | None:
    """The project's server with its own settings (not a ``--variant``), the most workers first."""
    project = [n for n in _servers(report)[0] if ", " not in n]
    return max(project, key=lambda n: next(r.workers for r in report.runs if r.server == n), default=None)


def cell(report: BenchReport, server: str, kind: str, c: int, key: str) -> float:
    """The median over rounds of one closed-loop number (``ok_per_s``, ``samples_per_s``, ``p99``, ``cpu``)."""
    runs = report.closed(server, kind, c)
    if key == "p99":
        return _median([r.load["latency_ms"]["p99"] for r in runs])
    if key == "cpu":
        return _median([r.server_cpu_us_per_request for r in runs])
    return _median([r.load[key] for r in runs])


def targets(report: BenchReport) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, the target's bound, met) rows of the serving-speed and overload issues."""
    out: list[tuple[str, str, str, bool | None]] = []
    project = _default_project(report)
    _, ref = _servers(report)
    if project is None:
        return out
    concurrency = sorted({r.load["concurrency"] for r in report.closed(project, "single")})
    hi = max(concurrency)
    lo = min(concurrency)
    if ref is not None:
        ratio = cell(report, project, "single", hi, "ok_per_s") / cell(report, ref, "single", hi, "ok_per_s")
        out.append((f"single-sample requests/s vs the reference, c={hi}", f"{ratio:.2f}x", ">= 2.0x", ratio >= 2.0))
    for c, bound in ((lo, 10.0), (hi, 20.0)):
        p99 = cell(report, project, "single", c, "p99")
        out.append((f"single-sample p99, c={c}", f"{p99:.1f} ms", f"<= {bound:g} ms", p99 <= bound))
    batch_runs = report.closed(project, "batch")
    if batch_runs:
        samples = batch_runs[0].samples_per_request
        best_c = max(concurrency, key=lambda c: cell(report, project, "batch", c, "samples_per_s"))
        sps = cell(report, project, "batch", best_c, "samples_per_s")
        if ref is not None:
            ref_sps = max(cell(report, ref, "batch", c, "samples_per_s") for c in concurrency)
            out.append(
                (f"{samples}-sample raw requests, samples/s vs the reference (hashed keys)", f"{sps / ref_sps:.2f}x",
                 ">= 1.5x", sps / ref_sps >= 1.5)
            )  # fmt: skip
        ceiling = report.ceiling(256, 2)
        if ceiling is not None:
            share = sps / ceiling["samples_per_s"]
            out.append(
                (f"{samples}-sample requests vs the graph alone at batch 256, 2 threads", f"{share:.2f}x", ">= 0.6x",
                 share >= 0.6)
            )  # fmt: skip
        graph = report.ceiling(256, 1)
        if graph is not None:
            per_sample = cell(report, project, "batch", best_c, "cpu") / samples - graph["cpu_us_per_sample"]
            out.append(
                (f"server CPU per raw sample above the graph's own (batch 256, 1 thread), {samples}-sample requests",
                 f"{per_sample:.1f} µs", "<= 10 µs", per_sample <= 10)
            )  # fmt: skip
    cpu = min(cell(report, project, "single", c, "cpu") for c in concurrency)
    out.append(("server CPU per single-sample request (best cell)", f"{cpu:.0f} µs", "<= 100 µs", cpu <= 100))
    floor = next((r.server for r in report.runs if r.floor and r.mode == "closed"), None)
    if floor is not None:
        cpu = min(cell(report, floor, "single", c, "cpu") for c in concurrency)
        out.append((f"for scale: {floor}, CPU per answer (best cell)", f"{cpu:.0f} µs", "–", None))
    for r in (r for r in report.runs if r.mode == "open"):
        if r.floor:
            _floor_open(r, out)
        else:
            _overload_targets(r, out)
    return out


def _floor_open(r: RunRecord, out: list[tuple[str, str, str, bool | None]]) -> None:
    """What the floor managed at an open-loop rate: the bound on any refusal there (rows judged on nothing)."""
    load = r.load
    capacity = load.get("capacity_per_s") or 0.0
    where = f"{r.server}, {load['rate'] / capacity:.1f}x" if capacity else r.server
    out.append(
        (f"for scale: answered / offered, 503 p99 ({where})",
         f"{load['requests_per_s'] / load['rate']:.2f}, {load['latency_503_ms']['p99']:.1f} ms", "–", None)
    )  # fmt: skip


def _overload_targets(r: RunRecord, out: list[tuple[str, str, str, bool | None]]) -> None:
    load = r.load
    capacity = load.get("capacity_per_s") or 0.0
    factor = load["rate"] / capacity if capacity else math.nan
    where = f"{r.server}, {factor:.1f}x, deadline {r.deadline_ms:g} ms"
    p99 = load["latency_ms"]["p99"]
    if not math.isnan(p99):
        out.append(
            (f"accepted p99 ({where})", f"{p99:.1f} ms", f"<= {r.deadline_ms:g} ms", p99 <= (r.deadline_ms or 0))
        )
    refused = load["latency_503_ms"]["p99"]
    if factor >= 4.5 and not math.isnan(refused):
        out.append((f"503 p99 ({where})", f"{refused:.1f} ms", "<= 10 ms", refused <= 10))
    if factor >= 1.5 and capacity:
        share = load["goodput_per_s"] / capacity
        out.append((f"goodput / capacity ({where})", f"{share:.2f}", ">= 0.90", share >= 0.9))
    growth = r.rss_end_mb / r.rss_start_mb - 1 if r.rss_start_mb else 0.0
    bad = load["errors"] or any(int(s) >= 500 and int(s) != 503 for s in load["status"])
    out.append(
        (f"RSS growth, transport errors, 5xx other than 503 ({where})",
         f"{growth * 100:+.0f}%, {sum(load['errors'].values())}, "
         f"{sum(n for s, n in load['status'].items() if int(s) >= 500 and int(s) != 503)}",
         "<= 10%, 0, 0", growth <= 0.1 and not bad)
    )  # fmt: skip


# --- tables ---


def _ceiling_table(report: BenchReport) -> list[str]:
    lines = ["| batch size | threads | samples/s | µs per call | CPU µs per sample |", "|--:|--:|--:|--:|--:|"]
    for r in report.raw:
        lines.append(
            f"| {r['batch_size']} | {r['threads']} | {_fmt(r['samples_per_s'])} | {_fmt(r['us_per_call'])} "
            f"| {_fmt(r['cpu_us_per_sample'], 1)} |"
        )
    return lines


def _drift_lines(report: BenchReport) -> list[str]:
    """The graph timed again at the end: how far the machine's speed moved during the run, flagged past DRIFT_LIMIT."""
    drift = report.drift()
    if not drift:
        return []
    cells = ", ".join(f"batch {b}: {ratio:.2f}" for b, ratio in drift)
    lines = ["", f"Timed again after the last load run (1 thread), samples/s at the end / at the start: {cells}."]
    if any(abs(ratio - 1) > DRIFT_LIMIT for _, ratio in drift):
        lines.append(
            f"**The machine's speed moved by more than {DRIFT_LIMIT:.0%} during this run:** compare the ratios of"
            " servers measured in the same rounds, not absolute numbers, with other runs."
        )
    return lines


def _closed_table(runs: Sequence[RunRecord]) -> list[str]:
    lines = [
        "| server | round | concurrency | requests/s | samples/s | p50 ms | p95 ms | p99 ms | max ms "
        "| status | failures | server CPU | CPU µs/request | RSS MB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|--:|--:|--:|",
    ]
    for r in runs:
        load = r.load
        lat = load["latency_503_ms"] if r.floor else load["latency_ms"]  # the floor answers only 503s
        answered = load["requests_per_s"] if r.floor else load["ok_per_s"]
        samples = "–" if r.floor else _fmt(load["samples_per_s"])
        lines.append(
            f"| {r.server} | {r.round + 1} | {load['concurrency']} | {_fmt(answered)} "
            f"| {samples} | {_fmt(lat['p50'], 2)} | {_fmt(lat['p95'], 2)} | {_fmt(lat['p99'], 2)} "
            f"| {_fmt(lat['max'], 1)} | {_status(load)} | {_failures(load)} | {r.server_cpu_percent:.0f}% "
            f"| {_fmt(r.server_cpu_us_per_request)} | {r.rss_max_mb:.0f} |"
        )
    return lines


def _ratio_table(report: BenchReport) -> list[str]:
    project, ref = _servers(report)
    if ref is None:
        return []
    lines = [
        "| request kind | concurrency | " + " | ".join(f"{p} / reference" for p in project) + " |",
        "|---|--:|" + "--:|" * len(project),
    ]
    for kind, key in (("single", "ok_per_s"), ("batch", "samples_per_s")):
        for c in sorted({r.load["concurrency"] for r in report.closed(ref, kind)}):
            base = cell(report, ref, kind, c, key)
            ratios = [cell(report, p, kind, c, key) / base if base else math.nan for p in project]
            lines.append(f"| {kind} | {c} | " + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
    for r in lopsided(report):
        lines.append(
            f"\nIn round {r.round + 1}, {r.server} ran the {r.kind} cell at c={r.load['concurrency']} on "
            f"{r.server_cpu_percent:.0f}% CPU with {r.workers} processes (most likely one of them accepted its "
            "connections), so that round's ratios flatter the other servers."
        )
    return lines


def lopsided(report: BenchReport) -> list[RunRecord]:
    """Closed-loop runs of a compared server of several processes that used little more than one core (at most
    LOPSIDED_CORES): its connections landed on one process (a shared listening socket can do that). The floor,
    which is judged on nothing and often waits on the generator, is left out."""
    return [
        r for r in report.runs
        if r.mode == "closed" and r.workers > 1 and not r.floor and r.load["completed"]
        and r.server_cpu_percent <= 100 * LOPSIDED_CORES
    ]  # fmt: skip


def _capacity_lines(report: BenchReport) -> list[str]:
    lines = [
        f"| configuration | deadline ms | closed-loop capacity /s | {OPEN_PROBE_S:g}-s probes' rate /s "
        "| open-loop capacity /s | open / closed | confirmed |",
        "|---|--:|--:|--:|--:|--:|:-:|",
    ]
    for c in report.open_capacity:
        closed, capacity = c["closed_per_s"], c["capacity_per_s"]
        ratio = f"{capacity / closed:.2f}" if closed else "–"
        lines.append(
            f"| {c['server']} | {c['deadline_ms']:g} | {_fmt(closed)} | {_fmt(c['bisected_per_s'])} | {_fmt(capacity)} "
            f"| {ratio} | {'yes' if c['confirmed'] else 'NO'} |"
        )
    return lines


def _open_table(runs: Sequence[RunRecord]) -> list[str]:
    lines = [
        "| server | deadline ms | offered /s (x capacity) | answered /s | goodput /s (of capacity) "
        "| p50 / p99 ms (200) | p99 ms (503) | p99 ms (all arrivals) | status | failures | waited for a connection "
        "| send lag p99 ms "
        "| server CPU | RSS start → max → end MB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|---|--:|--:|--:|---|",
    ]
    for r in runs:
        load, lat = r.load, r.load["latency_ms"]
        capacity = load.get("capacity_per_s") or 0.0
        factor = f" ({load['rate'] / capacity:.1f}x)" if capacity else ""
        good = f" ({load['goodput_per_s'] / capacity:.2f})" if capacity else ""
        goodput = "–" if r.floor else f"{_fmt(load['goodput_per_s'])}{good}"
        deadline = "–" if r.deadline_ms is None else f"{r.deadline_ms:g}"
        lines.append(
            f"| {r.server} | {deadline} | {_fmt(load['rate'])}{factor} | {_fmt(load['requests_per_s'])} "
            f"| {goodput} | {_fmt(lat['p50'], 1)} / {_fmt(lat['p99'], 1)} "
            f"| {_fmt(load['latency_503_ms']['p99'], 1)} | {_fmt(load['latency_arrivals_ms']['p99'], 1)} "
            f"| {_status(load)} | {_failures(load)} | {load['waited_for_connection']:,} "
            f"| {load['send_lag_ms_p99']:.1f} "
            f"| {r.server_cpu_percent:.0f}% | {r.rss_start_mb:.0f} → {r.rss_max_mb:.0f} → {r.rss_end_mb:.0f} |"
        )
    return lines


def _keep_block(previous: str | None) -> str:
    if previous and KEEP_START in previous and KEEP_END in previous:
        start = previous.index(KEEP_START)
        end = previous.index(KEEP_END, start) + len(KEEP_END)
        return previous[start:end]
    placeholder = "_(analysis written by hand goes here; `lma bench` keeps it when it rewrites this file)_"
    return f"{KEEP_START}\n{placeholder}\n{KEEP_END}"


def render_markdown(report: BenchReport, previous: str | None = None, plot_name: str | None = None) -> str:
    """The Markdown report; ``previous`` is the file it replaces (its hand-written block is kept)."""
    m, model = report.machine, report.model
    out = [
        "# Benchmarks",
        "",
        f"Generated by `lma bench` on {report.started} in {report.wall_s:.0f} s. Every number below comes from that",
        "run; the load generator (loadtest/loadgen.py: raw HTTP/1.1 keep-alive, uvloop) ran on the same machine",
        "as the servers, so they share its cores.",
        "",
        "## Setup",
        "",
        "```",
        report.command or "lma bench",
        "```",
        "",
        f"- machine: {m.get('nproc')} cores ({m.get('cpu', '?')}), {m.get('memory_gb', '?')} GB; "
        f"load average at start {m.get('load_average_start')}, at end {m.get('load_average_end', '?')} "
        "(it counts every runnable process: this bench alone adds about 2, the rest is other jobs)",
        f"- software: Python {m.get('python')}, ONNX Runtime {m.get('onnxruntime', '?')}, "
        f"uvicorn {m.get('uvicorn', '?')}, FastAPI {m.get('fastapi', '?')}, NumPy {m.get('numpy', '?')}; "
        f"commit {m.get('git_commit', '?')}",
        f"- model: `{model['name']}` version {model['version']} ({model['embedding']}, d = {model['embedding_dim']}, "
        f"{model['num_dense']} dense + {model['num_fields']} categorical features, "
        f"{_fmt(model.get('total_bytes'))} bytes of parameters, embedding compression "
        f"{_fmt(model.get('embedding_compression'), 1)}x), ONNX Runtime on CPU",
        "- project server settings: "
        + ", ".join(f"`{k}={v}`" for k, v in sorted(report.server_env.items()))
        + "; everything else at its default (DESIGN section 7)",
        "- the reference server (when measured): FastAPI + ONNX Runtime, one model call per request, inline, one "
        "process per core, given hashed keys and transformed dense values (loadtest/bench/reference.py)",
        "- the floor (with the reference): a bare ASGI app on the same uvicorn stack, one process per core, that "
        "answers every request with a canned 503 without reading it; no Python server on uvicorn answers for less, "
        'so its rows ("for scale") show what this machine allows at all, and are judged on nothing',
        f"- each run lasts {report.duration_s:g} s after a warm-up; latency is measured by the client, from the send "
        "(closed loop) or the scheduled send (open loop) to the last byte of the answer",
        "- server CPU is summed over the server's processes (100% = one core); CPU µs/request = server CPU time / "
        "answered requests, the number least disturbed by other jobs on the machine",
        "",
        "## Targets",
        "",
        "| target | measured | bound | met |",
        "|---|--:|--:|:-:|",
    ]
    for name, measured, bound, met in targets(report):
        out.append(f"| {name} | {measured} | {bound} | {'–' if met is None else 'yes' if met else 'NO'} |")
    out += [
        "",
        "## The graph alone (in process)",
        "",
        "ONNX Runtime session on the bundle's `model.onnx` with the server's session options",
        "(`export.onnx_runtime.session_options`), inputs featurized once: the ceiling a server is judged against.",
        "",
        *_ceiling_table(report),
        *_drift_lines(report),
    ]
    ratios = _ratio_table(report)
    if ratios:
        out += ["", "## Side by side: project / reference (median of the rounds)", "", *ratios]
    for kind, title in (("single", "single-sample requests"), ("batch", "batched requests")):
        runs = [r for r in report.runs if r.kind == kind and r.mode == "closed"]
        if not runs:
            continue
        out += [
            "",
            f"## Closed loop: {title} ({runs[0].samples_per_request} per request)",
            "",
            "N connections, each sending its next request as soon as the answer to the last one is in; the servers",
            "take turns cell by cell (round 1 of every server, then round 2). The floor's latencies are those of its",
            "503s.",
            "",
            *_closed_table(sorted(runs, key=lambda r: (r.load["concurrency"], r.server, r.round))),
        ]
    opened = [r for r in report.runs if r.mode == "open"]
    if opened:
        out += [
            "",
            "## Open loop: Poisson arrivals at multiples of the capacity (single-sample requests)",
            "",
            "Rates are multiples of each configuration's open-loop capacity at each deadline: the highest Poisson",
            f"rate at which at least {SUSTAINED:.0%} of the arrivals got a 200 within the deadline, sought on that",
            f"deadline's server by bisection ({OPEN_PROBES} probes of up to {OPEN_PROBE_S:g} s below the best",
            "closed-loop single-sample throughput), then confirmed by a run as long as the runs below, or by up to",
            f"{CONFIRM_TRIES - 1} more, each {1 - CONFIRM_STEP:.0%} lower ('confirmed': one of them sustained it).",
            "Latency counts from each arrival's scheduled send time. Every arrival is accounted for: an arrival",
            "that finds all of the generator's connections busy waits for one on the client (still timed from its",
            "schedule), and one the client gives up on counts as a timeout inside 'all arrivals'. Goodput: 200",
            "answers within the deadline, per second. The floor runs at the rates of the project's default",
            "configuration at its first deadline.",
            "",
            *_capacity_lines(report),
            "",
            *_open_table(opened),
        ]
    failed = [run for run in report.runs if run.error_sample]
    if failed:
        out += ["", "First non-200 answer of each run that had one:", ""]
        for run in failed:
            if run.mode == "closed":
                where = f"c={run.load['concurrency']}, round {run.round + 1}"
            else:
                deadline = "no deadline" if run.deadline_ms is None else f"deadline {run.deadline_ms:g} ms"
                where = f"{run.load['rate']:.0f}/s, {deadline}"
            out.append(f"- {run.server}, {run.kind}, {run.mode} {where}: `{run.error_sample}`")
    if plot_name:
        out += ["", f"![latency vs throughput]({plot_name})"]
    out += ["", "## Analysis", "", _keep_block(previous), ""]
    return "\n".join(out)


def plot(report: BenchReport, path: Path) -> None:
    """Latency (p50 and p99) against throughput: one line per server and request kind; open-loop goodput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    servers = list(dict.fromkeys(r.server for r in report.runs if not r.floor))  # the floor has no 200s to plot
    colors = {s: f"C{i}" for i, s in enumerate(servers)}
    for ax, kind, unit in ((axes[0], "single", "requests/s"), (axes[1], "batch", "samples/s")):
        for server in servers:
            runs = sorted(report.closed(server, kind), key=lambda r: (r.load["concurrency"], r.round))
            if not runs:
                continue
            x = [r.load["ok_per_s"] if kind == "single" else r.load["samples_per_s"] for r in runs]
            for q, style in (("p50", "o"), ("p99", "s")):
                ax.plot(x, [r.load["latency_ms"][q] for r in runs], style, color=colors[server], label=f"{server} {q}")
            for r, xi in zip(runs, x, strict=True):
                ax.annotate(f"c={r.load['concurrency']}", (xi, r.load["latency_ms"]["p99"]), fontsize=7)
        ax.set_xlabel(f"throughput ({unit}, 200 answers)")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"closed loop, {'single-sample' if kind == 'single' else 'batched'} requests")
        ax.legend(fontsize=7)
    ax = axes[2]
    for server in servers:
        deadlines = sorted({r.deadline_ms or 0.0 for r in report.runs if r.mode == "open" and r.server == server})
        for k, deadline in enumerate(deadlines):
            runs = [r for r in report.runs if r.mode == "open" and r.server == server and r.deadline_ms == deadline]
            runs.sort(key=lambda r: r.load["rate"])
            ax.plot(
                [r.load["rate"] for r in runs], [r.load["goodput_per_s"] for r in runs], "o-" if k == 0 else "s--",
                color=colors[server], label=f"{server}, deadline {deadline:g} ms",
            )  # fmt: skip
    ax.set_xlabel("offered requests/s (open loop)")
    ax.set_ylabel("goodput (200 within the deadline, /s)")
    ax.grid(True, alpha=0.3)
    ax.set_title("overload: goodput against offered load")
    ax.legend(fontsize=7)
    m = report.machine
    fig.suptitle(f"lma bench, {m.get('nproc')} cores, load average at start {m.get('load_average_start')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: BenchReport, out: Path, plot_path: Path | None) -> None:
    """Write the Markdown report (keeping the hand-written block of the file it replaces) and the plot."""
    previous = out.read_text() if out.is_file() else None
    plot_name = None
    if plot_path is not None:
        plot(report, plot_path)
        plot_name = os.path.relpath(plot_path, out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(report, previous, plot_name))


def dump_json(report: BenchReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=1, default=str))
