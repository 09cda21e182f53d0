"""sandfleet's reference agent: ask an OpenAI-compatible model for shell commands, run them.

Stdlib only; installed in the `python` image as /opt/sandfleet/agent.py.

The task: the prompt is read from the file named by `--prompt-file` (or env
`SANDFLEET_PROMPT_FILE`), else from env `SANDFLEET_PROMPT`. Also read from the env:
`OPENAI_BASE_URL`, `OPENAI_API_KEY` (the task token), `SANDFLEET_TASK` (for the log),
`SANDFLEET_MODEL` (default `scripted`), `SANDFLEET_MAX_STEPS` (30),
`SANDFLEET_COMMAND_TIMEOUT` (seconds per command, 300), `SANDFLEET_MAX_TOKENS` (output
cap per call, 1024), `SANDFLEET_WORKDIR` (`/workspace`), `SANDFLEET_RETRY_BASE_S` (1: a
failed LLM call is retried after 1, 2 and 4 times this).

Reply protocol (what the model must answer, checked in this order):
- a fenced block (```sh, ```bash, ```shell or bare ```): its body is run with `sh -c` in
  the work directory; the next user message is `exit code: N` and the (truncated) stdout
  and stderr. Only the first block of a reply runs.
- a line `DONE` or `DONE: summary`: the task is finished (exit 0).
- a line `GIVE UP: reason`: the agent stops without finishing (exit 1).
- anything else: the agent restates the protocol and asks again (it costs a step).

Exit codes: 0 done, 1 gave up, 2 bad setup (no prompt, no endpoint), 3 step limit
reached, 4 the gateway refused for budget (HTTP 402), 5 the LLM endpoint kept failing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

SYSTEM = """You are a coding agent working in a git checkout at {workdir}.
Each reply does exactly one of:
- run one shell command: put it in a fenced block (```sh ... ```); you get its exit code
  and output back;
- finish: a line `DONE: <what you changed>` once the task is done and verified;
- stop: a line `GIVE UP: <why>` if you cannot finish the task.
No interactive programs. Keep commands short."""
FORMAT_REMINDER = "Reply with one ```sh block, or `DONE: summary`, or `GIVE UP: reason`."
FENCE = re.compile(r"```(?:sh|bash|shell)?[ \t]*\n(.*?)```", re.DOTALL)
DONE = re.compile(r"^DONE\b:?\s*(.*)$", re.MULTILINE)
GIVE_UP = re.compile(r"^GIVE UP\b:?\s*(.*)$", re.MULTILINE)
RETRYABLE = {408, 409, 429, 500, 502, 503, 504}
RETRY_DELAYS = (1, 2, 4)  # times SANDFLEET_RETRY_BASE_S (default 1 second)
KEEP_HEAD, KEEP_TAIL = 500, 2500


class Refused(Exception):
    """The LLM endpoint said no: `code` is the agent's exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def log(text: str) -> None:
    print(text, flush=True)


def truncate(text: str) -> str:
    if len(text) <= KEEP_HEAD + KEEP_TAIL:
        return text
    cut = len(text) - KEEP_HEAD - KEEP_TAIL
    return f"{text[:KEEP_HEAD]}\n... [{cut} characters cut] ...\n{text[-KEEP_TAIL:]}"


def ask(base_url: str, key: str, body: dict) -> tuple[str, dict]:
    """One chat completion: (reply, usage). Retries transient failures (and malformed
    answers); raises Refused when it gives up."""
    request = urllib.request.Request(  # noqa: S310 -- main() allows http(s) URLs only
        base_url.rstrip("/") + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via the proxy
    base_s = float(os.environ.get("SANDFLEET_RETRY_BASE_S", "1"))
    for attempt, delay in enumerate((*RETRY_DELAYS, None), 1):
        try:
            with opener.open(request, timeout=300) as response:
                answer = json.load(response)
            return answer["choices"][0]["message"].get("content") or "", answer.get("usage") or {}
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:1000]
            if e.code == 402:
                raise Refused(4, f"budget exhausted (HTTP 402): {detail}") from None
            problem = f"HTTP {e.code}: {detail}"
            if e.code not in RETRYABLE:
                raise Refused(5, problem) from None
        except (urllib.error.URLError, OSError, ValueError, LookupError, TypeError) as e:
            problem = f"{type(e).__name__}: {e}"
        if delay is None:
            raise Refused(5, f"the LLM endpoint failed {attempt} times; last: {problem}")
        log(f"   LLM call failed ({problem}); retrying in {delay * base_s:g}s")
        time.sleep(delay * base_s)
    raise AssertionError("unreachable")


def run(command: str, workdir: str, timeout_s: float) -> str:
    """Run `command` with `sh -c`; the report fed back to the model."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["sh", "-c", command], cwd=workdir, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout_s)
        code, note = proc.returncode, ""
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code, note = 124, f" (killed after the {timeout_s:g}s command timeout)"
    if code < 0:  # killed by a signal: report it the way a shell would
        note = f" (killed by signal {-code})"
        code = 128 - code
    stdout = truncate(out.decode(errors="replace"))
    stderr = truncate(err.decode(errors="replace"))
    log(f"{stdout}{stderr}".rstrip())
    log(f"== exit {code}{note} in {time.monotonic() - t0:.1f}s")
    return f"exit code: {code}{note}\nstdout:\n{stdout}\nstderr:\n{stderr}"


def read_prompt(prompt_file: str | None) -> str:
    if prompt_file:
        with open(prompt_file, encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get("SANDFLEET_PROMPT", "").strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-file", default=os.environ.get("SANDFLEET_PROMPT_FILE"))
    args = parser.parse_args(argv)
    env = os.environ
    prompt = read_prompt(args.prompt_file)
    base_url, key = env.get("OPENAI_BASE_URL", ""), env.get("OPENAI_API_KEY", "")
    if not prompt:
        log("sandfleet-agent: no task; set SANDFLEET_PROMPT or pass --prompt-file")
        return 2
    if not base_url.startswith(("http://", "https://")):
        log(f"sandfleet-agent: OPENAI_BASE_URL must be an http(s) URL, not {base_url!r}")
        return 2
    workdir = env.get("SANDFLEET_WORKDIR", "/workspace")
    try:
        max_steps = int(env.get("SANDFLEET_MAX_STEPS", "30"))
        timeout_s = float(env.get("SANDFLEET_COMMAND_TIMEOUT", "300"))
        max_tokens = int(env.get("SANDFLEET_MAX_TOKENS", "1024"))
    except ValueError as e:
        log(f"sandfleet-agent: a SANDFLEET_* setting is not a number: {e}")
        return 2
    body = {"model": env.get("SANDFLEET_MODEL", "scripted"), "max_tokens": max_tokens}
    messages = [
        {"role": "system", "content": SYSTEM.format(workdir=workdir)},
        {"role": "user", "content": prompt},
    ]
    log(f"== task {env.get('SANDFLEET_TASK', '?')}: {prompt}")
    for step in range(1, max_steps + 1):
        try:
            reply, usage = ask(base_url, key, {**body, "messages": messages})
        except Refused as e:
            log(f"== stopped at step {step}: {e}")
            return e.code
        tokens = f"{usage.get('prompt_tokens', '?')} in, {usage.get('completion_tokens', '?')} out"
        log(f"== step {step}/{max_steps}: model ({tokens} tokens)\n{reply.strip()}")
        messages.append({"role": "assistant", "content": reply})
        if block := FENCE.search(reply):
            command = block.group(1).strip()
            log(f"== step {step}/{max_steps}: $ {command}")
            messages.append({"role": "user", "content": run(command, workdir, timeout_s)})
        elif done := DONE.search(reply):
            log(f"== done: {done.group(1) or 'finished'}")
            return 0
        elif gave_up := GIVE_UP.search(reply):
            log(f"== gave up: {gave_up.group(1) or 'no reason given'}")
            return 1
        else:
            messages.append({"role": "user", "content": FORMAT_REMINDER})
    log(f"== stopped: the step limit ({max_steps}) was reached")
    return 3


if __name__ == "__main__":
    sys.exit(main())
