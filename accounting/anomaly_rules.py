"""The eight anomaly rules as pure SQL builders over the ledger views.

Each `<rule>_sql(rule, since, until)` returns one SELECT over `events` (rule 3: over
`charges`) with the same columns, so the rules can be UNIONed:

    rule, severity, action, team, batch, task, attempt, first_seen, last_seen,
    subject, detail, evidence (JSON text), finding_id

`finding_id` = the first 32 hex digits of sha256(rule, team, batch, task, attempt,
subject) — the same finding always gets the same id, which is how the runner avoids
recording it twice. `subject` is what makes two findings of one rule in one attempt
different: the command (1), the file and category (7), the start of the quiet stretch
(8); the other rules give one finding per attempt.

Windows: events with `since <= time < until` (either bound optional). Rule 8 looks at
each attempt's latest state as of `until` (or `now()`), whatever `since` says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from accounting.policies import (
    AnomalyRule,
    CostOutlierRule,
    CpuPeggedRule,
    DeniedEgressRule,
    MemoryPressureRule,
    RepeatedCommandRule,
    RunawayLlmRule,
    SensitiveFilesRule,
    StuckRule,
)
from accounting.reports import nusd_to_usd_sql, time_filter_sql
from accounting.schemas import EventKind, TaskState

__all__ = [
    "FINDING_COLUMNS",
    "RULE_SQL",
    "cost_outlier_sql",
    "cpu_pegged_sql",
    "denied_egress_sql",
    "memory_pressure_sql",
    "repeated_command_sql",
    "runaway_llm_sql",
    "sensitive_files_sql",
    "stuck_sql",
]

FINDING_COLUMNS = (
    "rule",
    "severity",
    "action",
    "team",
    "batch",
    "task",
    "attempt",
    "first_seen",
    "last_seen",
    "subject",
    "detail",
    "evidence",
    "finding_id",
)

KEYS = "team, batch, task, attempt"
_PROGRESS = (
    EventKind.COMMAND_STARTED,
    EventKind.COMMAND_FINISHED,
    EventKind.FILE_CHANGED,
    EventKind.LLM_CALL,
)


def _q(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _minutes(m: float) -> str:
    return f"INTERVAL '{round(m * 60_000_000)} microseconds'"


def _num(x: float) -> str:
    return repr(float(x))


def _j(field: str, cast: str = "") -> str:
    expr = f"json_extract(payload, '$.{field}')"
    return f"CAST({expr} AS {cast})" if cast else f"json_extract_string(payload, '$.{field}')"


def _finding(name: str, rule: AnomalyRule, inner: str) -> str:
    """Wrap a rule's inner SELECT (keys, first_seen, last_seen, subject, detail, evidence)."""
    return f"""SELECT {_q(name)} AS rule, {_q(rule.severity.value)} AS severity,
  {_q(rule.action.value)} AS action, team, batch, task, CAST(attempt AS INTEGER) AS attempt,
  first_seen, last_seen, subject, detail, CAST(evidence AS VARCHAR) AS evidence,
  left(sha256(concat_ws(chr(31), {_q(name)}, team, batch, task, CAST(attempt AS VARCHAR),
                        subject)), 32) AS finding_id
FROM (
{inner}
) AS found"""


def _where(
    kind: EventKind | Sequence[EventKind], since: datetime | None, until: datetime | None
) -> str:
    kinds = [kind] if isinstance(kind, EventKind) else list(kind)
    kind_sql = ", ".join(_q(k.value) for k in kinds)
    return f"kind IN ({kind_sql}) AND {time_filter_sql(since, until)}"


def repeated_command_sql(
    rule: RepeatedCommandRule, since: datetime | None = None, until: datetime | None = None
) -> str:
    """(1) The same command (argv; numbers normalised) started >= min_repeats in a window."""
    argv = "CAST(json_extract(payload, '$.argv') AS VARCHAR)"
    cmd = argv
    if rule.normalize_numbers:
        cmd = f"regexp_replace({argv}, '0x[0-9a-fA-F]+|[0-9]+', '#', 'g')"
    inner = f"""WITH c AS (
  SELECT {KEYS}, time, {cmd} AS cmd FROM events
  WHERE {_where(EventKind.COMMAND_STARTED, since, until)}
), w AS (
  SELECT *, count(*) OVER (PARTITION BY {KEYS}, cmd ORDER BY time
    RANGE BETWEEN {_minutes(rule.window_minutes)} PRECEDING AND CURRENT ROW) AS n
  FROM c
)
SELECT {KEYS}, min(time) AS first_seen, max(time) AS last_seen, cmd AS subject,
  'command ' || cmd || ' started ' || max(n) || ' times within {rule.window_minutes:g} minutes'
    AS detail,
  json_object('command', cmd, 'max_in_window', max(n), 'starts', count(*),
              'window_minutes', {_num(rule.window_minutes)}) AS evidence
FROM w GROUP BY {KEYS}, cmd HAVING max(n) >= {int(rule.min_repeats)}"""
    return _finding("repeated_command", rule, inner)


def runaway_llm_sql(
    rule: RunawayLlmRule, since: datetime | None = None, until: datetime | None = None
) -> str:
    """(2) Too many calls in a window, or a minute's tokens far above the attempt's own.

    Robust z = 0.6745 (x - median) / MAD over the attempt's active minutes; when MAD is 0
    it falls back to (x - median) / (1.253314 x mean absolute deviation).
    """
    tokens = " + ".join(
        f"coalesce({_j(b, 'BIGINT')}, 0)"
        for b in ("input_uncached", "input_cache_read", "input_cache_write", "output", "reasoning")
    )
    inner = f"""WITH c AS (
  SELECT {KEYS}, time, {tokens} AS tokens FROM events
  WHERE {_where(EventKind.LLM_CALL, since, until)}
), rate AS (
  SELECT {KEYS}, max(n) AS max_calls, count(*) AS calls, min(time) AS first_seen,
    max(time) AS last_seen
  FROM (SELECT *, count(*) OVER (PARTITION BY {KEYS} ORDER BY time
        RANGE BETWEEN {_minutes(rule.window_minutes)} PRECEDING AND CURRENT ROW) AS n FROM c)
  GROUP BY {KEYS}
), m AS (
  SELECT {KEYS}, time_bucket(INTERVAL 1 MINUTE, time) AS minute, sum(tokens)::DOUBLE AS tok
  FROM c GROUP BY ALL
), med AS (
  SELECT {KEYS}, median(tok) AS med, count(*) AS minutes FROM m GROUP BY {KEYS}
), dev AS (
  SELECT m.*, med, minutes, abs(tok - med) AS ad FROM m JOIN med USING (team, batch, task, attempt)
), spread AS (
  SELECT {KEYS}, median(ad) AS mad, avg(ad) AS meanad FROM dev GROUP BY {KEYS}
), z AS (
  SELECT {KEYS}, max(rz) AS max_z, arg_max(minute, rz) AS peak_minute,
    arg_max(tok, rz) AS peak_tokens, any_value(med) AS med, any_value(minutes) AS minutes
  FROM (SELECT dev.*, CASE WHEN mad > 0 THEN 0.6745 * (tok - med) / mad
                           WHEN meanad > 0 THEN (tok - med) / (1.253314 * meanad) END AS rz
        FROM dev JOIN spread USING (team, batch, task, attempt))
  WHERE minutes >= {int(rule.min_history_minutes)} GROUP BY {KEYS}
)
SELECT {KEYS}, first_seen, last_seen, '' AS subject,
  CASE WHEN max_calls >= {int(rule.max_calls_per_window)}
       THEN max_calls || ' LLM calls within {rule.window_minutes:g} minutes'
       ELSE 'a minute with ' || CAST(peak_tokens AS BIGINT) || ' tokens, robust z '
            || round(max_z, 1) || ' against a median of ' || CAST(med AS BIGINT) END AS detail,
  json_object('max_calls_in_window', max_calls, 'calls', calls,
              'window_minutes', {_num(rule.window_minutes)}, 'max_robust_z', round(max_z, 3),
              'peak_minute', peak_minute, 'peak_tokens', peak_tokens,
              'median_tokens_per_minute', med, 'active_minutes', minutes) AS evidence
FROM rate LEFT JOIN z USING (team, batch, task, attempt)
WHERE max_calls >= {int(rule.max_calls_per_window)} OR max_z >= {_num(rule.robust_z)}"""
    return _finding("runaway_llm", rule, inner)


def cost_outlier_sql(
    rule: CostOutlierRule, since: datetime | None = None, until: datetime | None = None
) -> str:
    """(3) An attempt's known cost far above the median of its task_type (>= min_peers)."""
    min_nusd = int(rule.min_cost_usd * 1_000_000_000)
    inner = f"""WITH t AS (
  SELECT {KEYS}, task_type, sum(cost_nusd) AS c, min(period_start) AS first_seen,
    max(time) AS last_seen
  FROM charges WHERE {time_filter_sql(since, until)} AND cost_nusd IS NOT NULL AND task_type <> ''
  GROUP BY {KEYS}, task_type
), m AS (
  SELECT task_type, median(c::DOUBLE) AS med, count(*) AS peers FROM t GROUP BY task_type
), d AS (
  SELECT t.*, med, peers, abs(c::DOUBLE - med) AS ad FROM t JOIN m USING (task_type)
), s AS (
  SELECT task_type, median(ad) AS mad FROM d GROUP BY task_type
)
SELECT {KEYS}, first_seen, last_seen, '' AS subject,
  'cost ' || {nusd_to_usd_sql("c")} || ' USD vs a median of ' || round(med / 1e9, 6)
    || ' USD over ' || peers || ' ' || task_type || ' attempts' AS detail,
  json_object('task_type', task_type, 'cost_nusd', c, 'median_nusd', med, 'mad_nusd', mad,
              'peers', peers, 'robust_z',
              CASE WHEN mad > 0 THEN round(0.6745 * (c - med) / mad, 3) END) AS evidence
FROM d JOIN s USING (task_type)
WHERE peers >= {int(rule.min_peers)} AND c >= {min_nusd}
  AND ((mad > 0 AND 0.6745 * (c - med) / mad > {_num(rule.robust_z)})
       OR (mad = 0 AND c > {_num(rule.mad_zero_factor)} * med))"""
    return _finding("cost_outlier", rule, inner)


def cpu_pegged_sql(
    rule: CpuPeggedRule, since: datetime | None = None, until: datetime | None = None
) -> str:
    """(4) CPU >= min_pct_of_limit of the limit, sample after sample, for >= min_minutes.

    `cpu_usage_us` is the cgroup's cumulative counter: use between two samples =
    its increase / (elapsed us x limit cores).
    """
    pct = "100.0 * (u - prev_u) / (epoch_us(time) - epoch_us(prev_time)) / (lim / 1000.0)"
    hot = f"({pct}) >= {_num(rule.min_pct_of_limit)}"
    inner = f"""WITH s AS (
  SELECT {KEYS}, time, {_j("cpu_usage_us", "DOUBLE")} AS u,
    {_j("cpu_limit_millicores", "DOUBLE")} AS lim
  FROM events WHERE {_where(EventKind.RESOURCE_SAMPLE, since, until)}
), p AS (
  SELECT *, lag(time) OVER w AS prev_time, lag(u) OVER w AS prev_u FROM s
  WINDOW w AS (PARTITION BY {KEYS} ORDER BY time)
), h AS (
  SELECT *, {pct} AS pct, {hot} AS hot FROM p
  WHERE prev_time IS NOT NULL AND time > prev_time AND lim > 0
), g AS (
  SELECT *, sum(CASE WHEN hot THEN 0 ELSE 1 END) OVER (PARTITION BY {KEYS} ORDER BY time) AS grp
  FROM h
), runs AS (
  SELECT {KEYS}, grp, min(prev_time) AS first_seen, max(time) AS last_seen, avg(pct) AS avg_pct,
    count(*) AS samples, any_value(lim) AS lim
  FROM g WHERE hot GROUP BY {KEYS}, grp
  HAVING max(time) - min(prev_time) >= {_minutes(rule.min_minutes)}
  QUALIFY row_number() OVER (PARTITION BY {KEYS} ORDER BY max(time) - min(prev_time) DESC) = 1
)
SELECT {KEYS}, first_seen, last_seen, '' AS subject,
  'CPU at ' || round(avg_pct, 1) || '% of its ' || (lim / 1000.0) || '-CPU limit for '
    || round(epoch(last_seen - first_seen) / 60.0, 1) || ' minutes' AS detail,
  json_object('avg_pct_of_limit', round(avg_pct, 2), 'samples', samples,
              'minutes', round(epoch(last_seen - first_seen) / 60.0, 2),
              'limit_millicores', lim) AS evidence
FROM runs"""
    return _finding("cpu_pegged", rule, inner)


def memory_pressure_sql(
    rule: MemoryPressureRule, since: datetime | None = None, until: datetime | None = None
) -> str:
    """(5) Memory above a fraction of the limit, or a linear trend reaching it soon.

    The trend is `regr_slope(memory, time)` over the attempt's last trend_window_minutes.
    """
    horizon_s = _num(rule.oom_horizon_minutes * 60)
    inner = f"""WITH s AS (
  SELECT {KEYS}, time, {_j("memory_bytes", "DOUBLE")} AS m,
    {_j("memory_limit_bytes", "DOUBLE")} AS lim
  FROM events WHERE {_where(EventKind.RESOURCE_SAMPLE, since, until)}
), v AS (SELECT * FROM s WHERE lim > 0 AND m IS NOT NULL), peak AS (
  SELECT {KEYS}, max(m / lim) AS peak_frac, min(time) AS first_seen, max(time) AS last_seen,
    arg_max(m, time) AS m_last, arg_max(lim, time) AS lim_last
  FROM v GROUP BY {KEYS}
), tr AS (
  SELECT {KEYS}, regr_slope(m, epoch(time)) AS slope, count(*) AS n
  FROM v JOIN peak USING (team, batch, task, attempt)
  WHERE time >= last_seen - {_minutes(rule.trend_window_minutes)} GROUP BY {KEYS}
), j AS (
  SELECT *, CASE WHEN slope > 0 THEN (lim_last - m_last) / slope END AS secs_to_limit
  FROM peak JOIN tr USING (team, batch, task, attempt)
)
SELECT {KEYS}, first_seen, last_seen, '' AS subject,
  CASE WHEN peak_frac > {_num(rule.max_fraction_of_limit)}
       THEN 'memory reached ' || round(100 * peak_frac, 1) || '% of its limit'
       ELSE 'memory trending to its limit in ' || round(secs_to_limit / 60, 1) || ' minutes'
  END AS detail,
  json_object('peak_fraction', round(peak_frac, 4), 'last_bytes', m_last, 'limit_bytes', lim_last,
              'bytes_per_second', round(slope, 1), 'seconds_to_limit', round(secs_to_limit, 1),
              'trend_samples', n) AS evidence
FROM j
WHERE peak_frac > {_num(rule.max_fraction_of_limit)}
   OR (n >= {int(rule.min_samples)} AND secs_to_limit <= {horizon_s})"""
    return _finding("memory_pressure", rule, inner)


def denied_egress_sql(
    rule: DeniedEgressRule, since: datetime | None = None, until: datetime | None = None
) -> str:
    """(6) >= min_denied denied connections in a window, or one to a metadata host."""
    always = ", ".join(_q(h.lower()) for h in rule.always_flag_hosts) or "NULL"
    inner = f"""WITH d AS (
  SELECT {KEYS}, time, lower(trim({_j("host")}, '[]')) AS host, {_j("port")} AS port
  FROM events WHERE {_where(EventKind.EGRESS_DECISION, since, until)}
    AND {_j("allowed", "BOOLEAN")} = false
), w AS (
  SELECT *, count(*) OVER (PARTITION BY {KEYS} ORDER BY time
    RANGE BETWEEN {_minutes(rule.window_minutes)} PRECEDING AND CURRENT ROW) AS n
  FROM d
)
SELECT {KEYS}, min(time) AS first_seen, max(time) AS last_seen, '' AS subject,
  CASE WHEN bool_or(host IN ({always}))
       THEN 'egress to a metadata address refused (' || string_agg(DISTINCT host, ', ') || ')'
       ELSE max(n) || ' egress connections refused within {rule.window_minutes:g} minutes ('
            || string_agg(DISTINCT host, ', ') || ')' END AS detail,
  json_object('denied', count(*), 'max_in_window', max(n),
              'hosts', list(DISTINCT host ORDER BY host),
              'metadata', bool_or(host IN ({always}))) AS evidence
FROM w GROUP BY {KEYS}
HAVING max(n) >= {int(rule.min_denied)} OR bool_or(host IN ({always}))"""
    return _finding("denied_egress", rule, inner)


def _regex(patterns: Sequence[str]) -> str:
    return _q("|".join(f"(?:{p})" for p in patterns)) if patterns else "'$^'"


def sensitive_files_sql(
    rule: SensitiveFilesRule, since: datetime | None = None, until: datetime | None = None
) -> str:
    """(7) A credential path read, changed or named in a command; a hook / CI / rc file
    written (a read is a `file_changed` row with op `read` or `open`)."""
    cred, pers = _regex(rule.credential_patterns), _regex(rule.persistence_patterns)
    writes = "('create', 'modify', 'rename')"
    inner = f"""WITH f AS (
  SELECT {KEYS}, time, {_j("path")} AS path, {_j("from")} AS src, {_j("op")} AS op
  FROM events WHERE {_where(EventKind.FILE_CHANGED, since, until)}
), a AS (
  SELECT {KEYS}, time, regexp_replace(tok, '^~', '') AS path, argv
  FROM (SELECT {KEYS}, time, CAST(json_extract(payload, '$.argv') AS VARCHAR) AS argv,
          unnest(regexp_split_to_array(
            array_to_string(CAST(json_extract_string(payload, '$.argv[*]') AS VARCHAR[]), ' '),
            '[\\s;|&<>"''`()=]+')) AS tok
        FROM events WHERE {_where(EventKind.COMMAND_STARTED, since, until)})
), hits AS (
  SELECT {KEYS}, time, 'credential_access' AS category, path, 'file ' || op AS how FROM f
  WHERE regexp_matches(path, {cred})
  UNION ALL
  SELECT {KEYS}, time, 'credential_access', src, 'file ' || op FROM f
  WHERE src IS NOT NULL AND regexp_matches(src, {cred})
  UNION ALL
  SELECT {KEYS}, time, 'credential_access', path, 'command ' || argv FROM a
  WHERE path <> '' AND regexp_matches(path, {cred})
  UNION ALL
  SELECT {KEYS}, time, 'persistence_write', path, 'file ' || op FROM f
  WHERE op IN {writes} AND regexp_matches(path, {pers})
)
SELECT {KEYS}, min(time) AS first_seen, max(time) AS last_seen,
  category || ':' || path AS subject,
  replace(category, '_', ' ') || ': ' || path || ' (' || string_agg(DISTINCT how, '; ') || ')'
    AS detail,
  json_object('category', category, 'path', path, 'events', count(*),
              'how', list(DISTINCT how ORDER BY how)) AS evidence
FROM hits GROUP BY {KEYS}, category, path"""
    return _finding("sensitive_files", rule, inner)


def stuck_sql(rule: StuckRule, since: datetime | None = None, until: datetime | None = None) -> str:
    """(8) An attempt whose latest state is running, quiet for >= idle_minutes at `until`."""
    del since  # the latest state matters, however long ago it was recorded
    ref = "now()" if until is None else f"TIMESTAMPTZ '{until.isoformat()}'"
    upto = time_filter_sql(None, until)
    progress = ", ".join(_q(k.value) for k in _PROGRESS)
    inner = f"""WITH st AS (
  SELECT {KEYS}, arg_max({_j("state")}, time) AS state, max(time) AS state_time FROM events
  WHERE kind = {_q(EventKind.TASK_STATE.value)} AND {upto} GROUP BY {KEYS}
), act AS (
  SELECT {KEYS}, max(time) AS last_progress FROM events
  WHERE kind IN ({progress}) AND {upto} GROUP BY {KEYS}
), q AS (
  SELECT st.*, last_progress,
    CASE WHEN last_progress > state_time THEN last_progress ELSE state_time END AS quiet_since
  FROM st LEFT JOIN act USING (team, batch, task, attempt)
  WHERE state = {_q(TaskState.RUNNING.value)}
)
SELECT {KEYS}, quiet_since AS first_seen, {ref} AS last_seen,
  strftime(quiet_since, '%Y-%m-%dT%H:%M:%S.%fZ') AS subject,
  'running with no command, file or LLM event for '
    || round(epoch({ref} - quiet_since) / 60.0, 1) || ' minutes' AS detail,
  json_object('quiet_since', quiet_since, 'last_progress', last_progress,
              'idle_minutes', round(epoch({ref} - quiet_since) / 60.0, 2)) AS evidence
FROM q WHERE quiet_since <= {ref} - {_minutes(rule.idle_minutes)}"""
    return _finding("stuck", rule, inner)


RULE_SQL: dict[str, Callable[..., str]] = {
    "repeated_command": repeated_command_sql,
    "runaway_llm": runaway_llm_sql,
    "cost_outlier": cost_outlier_sql,
    "cpu_pegged": cpu_pegged_sql,
    "memory_pressure": memory_pressure_sql,
    "denied_egress": denied_egress_sql,
    "sensitive_files": sensitive_files_sql,
    "stuck": stuck_sql,
}
"""Rule name (as in policies.yaml `anomalies:`) -> its SQL builder."""
