"""The eight anomaly rules as streaming checks: fed one event at a time (pure).

Each check keeps a little state per attempt and returns a `Hit` when its pattern is seen,
with the same definition and thresholds as its SQL twin in `accounting.anomaly_rules`
(read those docstrings for the exact semantics; the comments here say where streaming
must differ). `scheduler.stream_rules.StreamRules` turns hits into `Finding`s.

Times are integer microseconds since the epoch (`us(t)`), as the ledger stores them.
"""

from __future__ import annotations

import bisect
import json
import re
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from accounting.policies import (
    CostOutlierRule,
    CpuPeggedRule,
    DeniedEgressRule,
    MemoryPressureRule,
    RepeatedCommandRule,
    RunawayLlmRule,
    SensitiveFilesRule,
)

__all__ = [
    "CostOutlier",
    "CpuPegged",
    "DeniedEgress",
    "Hit",
    "Key",
    "MemoryPressure",
    "RepeatedCommand",
    "RunawayLlm",
    "SensitiveFiles",
    "command_subject",
    "from_us",
    "us",
]

Key = tuple[str, str, str, int]
"""(team, batch, task, attempt): whom a check's state and hits belong to."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MINUTE_US = 60_000_000
_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|[0-9]+")
# DuckDB's '[\s;|&<>"''`()=]+' (RE2's \s is [\t\n\f\r ]).
_ARGV_SPLIT = re.compile(r"[\t\n\f\r ;|&<>\"'`()=]+")


def us(t: datetime) -> int:
    """A timestamp as integer microseconds since the epoch (exact)."""
    d = t - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def from_us(x: int) -> datetime:
    return _EPOCH + timedelta(microseconds=x)


def _w(minutes: float) -> int:
    return round(minutes * 60_000_000)


@dataclass(frozen=True)
class Hit:
    """A check firing: what makes it distinct within its attempt (`subject`), and why."""

    subject: str
    first_seen: datetime
    last_seen: datetime
    detail: str
    evidence: dict[str, Any] = field(hash=False)


def command_subject(argv: Any, normalize_numbers: bool) -> str:
    """The argv as the ledger's JSON text (as DuckDB prints it), numbers as `#`."""
    text = json.dumps(list(argv or []), ensure_ascii=False, separators=(",", ":"))
    return _NUMBERS.sub("#", text) if normalize_numbers else text


def _in_window(times: list[int], t: int, width: int) -> int:
    """How many of the sorted `times` fall in [t - width, t] (SQL RANGE ... PRECEDING)."""
    return bisect.bisect_right(times, t) - bisect.bisect_left(times, t - width)


class RepeatedCommand:
    """(1) The same command (numbers normalised) started >= min_repeats times in a window."""

    def __init__(self, rule: RepeatedCommandRule) -> None:
        self.rule, self.width = rule, _w(rule.window_minutes)
        self.state: dict[Key, dict[str, list[int]]] = {}

    def started(self, key: Key, t: datetime, argv: Any) -> Hit | None:
        cmd = command_subject(argv, self.rule.normalize_numbers)
        cmds = self.state.setdefault(key, {})
        x = us(t)
        if len(cmds) > 256:  # forget commands that have left the window
            for c in [c for c, ts in cmds.items() if ts[-1] < x - self.width]:
                del cmds[c]
        times = cmds.setdefault(cmd, [])
        bisect.insort(times, x)
        n = _in_window(times, x, self.width)
        while len(times) > 2 * self.rule.min_repeats and times[0] < x - self.width:
            times.pop(0)
        if n < self.rule.min_repeats:
            return None
        m = self.rule.window_minutes
        return Hit(
            cmd, from_us(times[0]), t, f"command {cmd} started {n} times within {m:g} minutes",
            {"command": cmd, "max_in_window": n, "window_minutes": m},
        )  # fmt: skip


class RunawayLlm:
    """(2) >= max_calls_per_window calls in a window, or a minute's tokens far above the
    attempt's own minutes (robust z over >= min_history_minutes active minutes)."""

    MAX_MINUTES = 24 * 60  # the z-score looks at the attempt's last day of minutes

    def __init__(self, rule: RunawayLlmRule) -> None:
        self.rule, self.width = rule, _w(rule.window_minutes)
        self.calls: dict[Key, list[int]] = {}
        self.minutes: dict[Key, dict[int, int]] = {}

    def call(self, key: Key, t: datetime, tokens: int) -> Hit | None:
        x = us(t)
        times = self.calls.setdefault(key, [])
        bisect.insort(times, x)
        n = _in_window(times, x, self.width)
        while len(times) > self.rule.max_calls_per_window and times[0] < x - self.width:
            times.pop(0)
        per_minute = self.minutes.setdefault(key, {})
        minute = x - x % _MINUTE_US
        per_minute[minute] = per_minute.get(minute, 0) + tokens
        while len(per_minute) > self.MAX_MINUTES:
            del per_minute[min(per_minute)]
        m = self.rule.window_minutes
        if n >= self.rule.max_calls_per_window:
            return Hit("", t, t, f"{n} LLM calls within {m:g} minutes",
                       {"max_calls_in_window": n, "window_minutes": m})  # fmt: skip
        if len(per_minute) < self.rule.min_history_minutes:
            return None
        toks = list(per_minute.values())
        med = statistics.median(toks)
        ads = [abs(v - med) for v in toks]
        mad, meanad = statistics.median(ads), statistics.fmean(ads)
        if mad > 0:
            scale = mad / 0.6745
        elif meanad > 0:
            scale = 1.253314 * meanad
        else:
            return None
        peak_minute, peak = max(per_minute.items(), key=lambda kv: kv[1])
        z = (peak - med) / scale
        if z < self.rule.robust_z:
            return None
        return Hit(
            "", from_us(peak_minute), t,
            f"a minute with {peak} tokens, robust z {z:.1f} against a median of {int(med)}",
            {"max_robust_z": round(z, 3), "peak_minute": from_us(peak_minute).isoformat(),
             "peak_tokens": peak, "median_tokens_per_minute": med,
             "active_minutes": len(per_minute)},
        )  # fmt: skip

    def forget(self, key: Key) -> None:
        self.calls.pop(key, None)
        self.minutes.pop(key, None)


@dataclass
class _CpuRun:
    prev: tuple[int, float | None] | None = None
    start: int | None = None
    pct_sum: float = 0.0
    samples: int = 0


class CpuPegged:
    """(4) CPU >= min_pct_of_limit of the limit, sample after sample, for >= min_minutes."""

    def __init__(self, rule: CpuPeggedRule) -> None:
        self.rule, self.width = rule, _w(rule.min_minutes)
        self.state: dict[Key, _CpuRun] = {}

    def sample(self, key: Key, t: datetime, p: Mapping[str, Any]) -> Hit | None:
        s = self.state.setdefault(key, _CpuRun())
        x, u, lim = us(t), p.get("cpu_usage_us"), p.get("cpu_limit_millicores") or 0
        prev, s.prev = s.prev, (x, None if u is None else float(u))
        if prev is None or x <= prev[0] or lim <= 0:
            return None  # not a row of the SQL's `h`: neither extends nor breaks a run
        if u is None or prev[1] is None:
            s.start = None
            return None
        pct = 100.0 * (float(u) - prev[1]) / (x - prev[0]) / (lim / 1000.0)
        if pct < self.rule.min_pct_of_limit:
            s.start, s.pct_sum, s.samples = None, 0.0, 0
            return None
        if s.start is None:
            s.start = prev[0]
        s.pct_sum += pct
        s.samples += 1
        if x - s.start < self.width:
            return None
        avg, minutes = s.pct_sum / s.samples, (x - s.start) / _MINUTE_US
        return Hit(
            "", from_us(s.start), t,
            f"CPU at {avg:.1f}% of its {lim / 1000:g}-CPU limit for {minutes:.1f} minutes",
            {"avg_pct_of_limit": round(avg, 2), "samples": s.samples,
             "minutes": round(minutes, 2), "limit_millicores": lim},
        )  # fmt: skip

    def forget(self, key: Key) -> None:
        self.state.pop(key, None)


@dataclass
class _Mem:
    origin: int
    first: int
    peak: float = 0.0
    window: deque[tuple[int, int]] = field(default_factory=deque)
    sx: int = 0
    sy: int = 0
    sxy: int = 0
    sxx: int = 0


class MemoryPressure:
    """(5) Memory above a fraction of its limit, or its linear trend (least squares over
    the last trend_window_minutes, exact integer sums) reaching the limit soon."""

    def __init__(self, rule: MemoryPressureRule) -> None:
        self.rule, self.width = rule, _w(rule.trend_window_minutes)
        self.state: dict[Key, _Mem] = {}

    def sample(self, key: Key, t: datetime, p: Mapping[str, Any]) -> Hit | None:
        m, lim = p.get("memory_bytes"), p.get("memory_limit_bytes") or 0
        if m is None or lim <= 0:
            return None
        x = us(t)
        s = self.state.setdefault(key, _Mem(origin=x, first=x))
        s.peak = max(s.peak, m / lim)
        xr = x - s.origin
        s.window.append((xr, m))
        s.sx, s.sy, s.sxy, s.sxx = s.sx + xr, s.sy + m, s.sxy + xr * m, s.sxx + xr * xr
        while s.window and s.window[0][0] < xr - self.width:
            ox, oy = s.window.popleft()
            s.sx, s.sy, s.sxy, s.sxx = s.sx - ox, s.sy - oy, s.sxy - ox * oy, s.sxx - ox * ox
        n = len(s.window)
        den = n * s.sxx - s.sx * s.sx
        slope = (n * s.sxy - s.sx * s.sy) / den * 1e6 if den > 0 else 0.0  # bytes per second
        secs = (lim - m) / slope if slope > 0 else None
        evidence = {"peak_fraction": round(s.peak, 4), "last_bytes": m, "limit_bytes": lim,
                    "bytes_per_second": round(slope, 1),
                    "seconds_to_limit": None if secs is None else round(secs, 1),
                    "trend_samples": n}  # fmt: skip
        if s.peak > self.rule.max_fraction_of_limit:
            detail = f"memory reached {100 * s.peak:.1f}% of its limit"
        elif (
            n >= self.rule.min_samples
            and secs is not None
            and secs <= self.rule.oom_horizon_minutes * 60
        ):
            detail = f"memory trending to its limit in {secs / 60:.1f} minutes"
        else:
            return None
        return Hit("", from_us(s.first), t, detail, evidence)

    def forget(self, key: Key) -> None:
        self.state.pop(key, None)


class DeniedEgress:
    """(6) >= min_denied denied connections in a window, or one to a metadata host."""

    def __init__(self, rule: DeniedEgressRule) -> None:
        self.rule, self.width = rule, _w(rule.window_minutes)
        self.always = {h.lower() for h in rule.always_flag_hosts}
        self.state: dict[Key, tuple[list[int], set[str]]] = {}

    def decision(self, key: Key, t: datetime, p: Mapping[str, Any]) -> Hit | None:
        if p.get("allowed") is not False:
            return None
        host = str(p.get("host", "")).lower().strip("[]")
        times, hosts = self.state.setdefault(key, ([], set()))
        x = us(t)
        bisect.insort(times, x)
        hosts.add(host)
        n = _in_window(times, x, self.width)
        while len(times) > self.rule.min_denied and times[0] < x - self.width:
            times.pop(0)
        metadata = bool(hosts & self.always)
        if not metadata and n < self.rule.min_denied:
            return None
        names = ", ".join(sorted(hosts))
        if metadata:
            detail = f"egress to a metadata address refused ({names})"
        else:
            detail = f"{n} egress connections refused within {self.rule.window_minutes:g} minutes"
            detail += f" ({names})"
        return Hit("", from_us(times[0]), t, detail,
                   {"max_in_window": n, "hosts": sorted(hosts), "metadata": metadata})  # fmt: skip

    def forget(self, key: Key) -> None:
        self.state.pop(key, None)


def _any(patterns: list[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns) if patterns else r"$^")


class SensitiveFiles:
    """(7) A credential path read, changed or named in a command; a hook / CI / rc file
    written. Reads arrive as `file_changed` with op `read` / `open` (sandbox.sensitive_watch)."""

    WRITES = frozenset({"create", "modify", "rename"})

    def __init__(self, rule: SensitiveFilesRule) -> None:
        self.cred, self.pers = _any(rule.credential_patterns), _any(rule.persistence_patterns)

    @staticmethod
    def _hit(t: datetime, category: str, path: str, how: str) -> Hit:
        detail = f"{category.replace('_', ' ')}: {path} ({how})"
        evidence = {"category": category, "path": path, "how": [how]}
        return Hit(f"{category}:{path}", t, t, detail, evidence)

    def file(self, t: datetime, p: Mapping[str, Any]) -> list[Hit]:
        path, src, op = str(p.get("path", "")), p.get("from"), str(p.get("op", ""))
        hits = []
        if self.cred.search(path):
            hits.append(self._hit(t, "credential_access", path, f"file {op}"))
        if src is not None and self.cred.search(str(src)):
            hits.append(self._hit(t, "credential_access", str(src), f"file {op}"))
        if op in self.WRITES and self.pers.search(path):
            hits.append(self._hit(t, "persistence_write", path, f"file {op}"))
        return hits

    def command(self, t: datetime, argv: Any) -> list[Hit]:
        words = [str(a) for a in argv or []]
        how = "command " + command_subject(words, normalize_numbers=False)
        hits, seen = [], set()
        for tok in _ARGV_SPLIT.split(" ".join(words)):
            path = tok[1:] if tok.startswith("~") else tok
            if path and path not in seen and self.cred.search(path):
                seen.add(path)
                hits.append(self._hit(t, "credential_access", path, how))
        return hits


@dataclass
class _Cost:
    task_type: str
    nusd: int
    first: datetime
    last: datetime


class CostOutlier:
    """(3) An attempt's known cost far above the median of its task_type (>= min_peers).

    Fed `charges` rows (cost known, task_type set); judged on `judge()`, for the task
    types whose costs changed since the last call. Keeps at most `max_attempts`.
    """

    def __init__(self, rule: CostOutlierRule, max_attempts: int = 200_000) -> None:
        self.rule, self.max_attempts = rule, max_attempts
        self.min_nusd = int(rule.min_cost_usd * 1_000_000_000)
        self.costs: dict[Key, _Cost] = {}
        self.dirty: set[str] = set()

    def charge(self, key: Key, task_type: str, nusd: int | None, start: datetime,
               end: datetime) -> None:  # fmt: skip
        if nusd is None or not task_type:
            return
        c = self.costs.get(key)
        if c is None:
            if len(self.costs) >= self.max_attempts:
                self.costs.pop(next(iter(self.costs)))
            self.costs[key] = _Cost(task_type, nusd, start, end)
        else:
            c.nusd, c.first, c.last = c.nusd + nusd, min(c.first, start), max(c.last, end)
        self.dirty.add(task_type)

    def judge(self) -> list[tuple[Key, Hit]]:
        out: list[tuple[Key, Hit]] = []
        dirty, self.dirty = self.dirty, set()
        for task_type in sorted(dirty):
            peers = [(k, c) for k, c in self.costs.items() if c.task_type == task_type]
            if len(peers) < self.rule.min_peers:
                continue
            med = statistics.median(float(c.nusd) for _, c in peers)
            mad = statistics.median(abs(c.nusd - med) for _, c in peers)
            for key, c in peers:
                z = 0.6745 * (c.nusd - med) / mad if mad > 0 else None
                if c.nusd < self.min_nusd:
                    continue
                if (z is not None and z > self.rule.robust_z) or (
                    mad == 0 and c.nusd > self.rule.mad_zero_factor * med
                ):
                    detail = (
                        f"cost {c.nusd / 1e9:.9f} USD vs a median of {med / 1e9:.6f} USD over "
                        f"{len(peers)} {task_type} attempts"
                    )
                    evidence = {"task_type": task_type, "cost_nusd": c.nusd, "median_nusd": med,
                                "mad_nusd": mad, "peers": len(peers),
                                "robust_z": None if z is None else round(z, 3)}  # fmt: skip
                    out.append((key, Hit("", c.first, c.last, detail, evidence)))
        return out
