"""sandbox: one node — images, templates, hardened containers, workspaces, the gateway
and activity capture. No Ray here."""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module that defines it; imported on first use (PEP 562),
# so `import sandbox.<module>` never pays for the heavy ones.
_EXPORTS = {
    "ActivityCapture": "sandbox.activity",
    "agent_env": "sandbox.forwarder",
    "AttemptChannel": "sandbox.gateway",
    "AttemptGrant": "sandbox.gateway",
    "AttemptHooks": "sandbox.attempt",
    "AttemptOutcome": "sandbox.attempt",
    "AttemptRef": "sandbox.credentials",
    "AttemptResult": "sandbox.attempt",
    "Budget": "sandbox.gateway",
    "build_images": "sandbox.images",
    "CaptureIdentity": "sandbox.activity",
    "CaptureReport": "sandbox.activity",
    "collect_diff": "sandbox.workspace",
    "container_spec": "sandbox.container_spec",
    "current_owner": "sandbox.liveness",
    "DENIED_SYSCALLS": "sandbox.seccomp",
    "DiffSummary": "sandbox.workspace",
    "DockerBackend": "sandbox.docker_backend",
    "egress_scope": "sandbox.credentials",
    "ensure_engine": "sandbox.engine",
    "ExecResult": "sandbox.backend",
    "FakeBackend": "sandbox.fake_backend",
    "FakeRun": "sandbox.fake_backend",
    "Gateway": "sandbox.gateway",
    "GatewayThread": "sandbox.gateway_thread",
    "image_ref": "sandbox.images",
    "KeyRing": "sandbox.credentials",
    "ledger_sink": "sandbox.activity",
    "LedgerSink": "sandbox.recorder",
    "list_templates": "sandbox.templates",
    "load_providers": "sandbox.providers",
    "load_providers_config": "sandbox.providers",
    "load_template": "sandbox.templates",
    "MemorySink": "sandbox.recorder",
    "NetlinkProcHub": "sandbox.proc_hub",
    "OpenAIProvider": "sandbox.openai_provider",
    "Owner": "sandbox.liveness",
    "owner_is_live": "sandbox.liveness",
    "prepare_workspace": "sandbox.workspace",
    "Provider": "sandbox.providers",
    "ProvidersConfig": "sandbox.providers",
    "reap": "sandbox.reaper",
    "ReapReport": "sandbox.reaper",
    "remove_workspace": "sandbox.workspace",
    "Resolver": "sandbox.egress",
    "Resources": "sandbox.templates",
    "run_attempt_in_sandbox": "sandbox.attempt",
    "sandbox_labels": "sandbox.container_spec",
    "sandbox_name": "sandbox.container_spec",
    "SandboxBackend": "sandbox.backend",
    "SandboxInfo": "sandbox.backend",
    "SandboxSpec": "sandbox.backend",
    "SandboxStatus": "sandbox.backend",
    "SCOPE_LLM": "sandbox.credentials",
    "ScriptedProvider": "sandbox.scripted",
    "Stats": "sandbox.backend",
    "TaskCredentials": "sandbox.credentials",
    "Template": "sandbox.templates",
    "UpstreamError": "sandbox.providers",
    "WaitResult": "sandbox.backend",
    "Workspace": "sandbox.workspace",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
