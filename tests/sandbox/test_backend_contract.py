"""The SandboxBackend contract, run against FakeBackend and DockerBackend alike."""

from __future__ import annotations

import pytest

from accounting.errors import ImageError, SandboxError
from sandbox.backend import SandboxBackend, SandboxStatus
from sandbox.container_spec import LABEL_BATCH


def run_to_end(rig, spec, timeout=None):
    box = rig.backend.create(spec)
    try:
        rig.backend.start(box)
        waited = rig.backend.wait(box, timeout=timeout)
        out = b"".join(rig.backend.logs(box, "stdout"))
        err = b"".join(rig.backend.logs(box, "stderr"))
        return waited, out, err
    finally:
        rig.backend.remove(box)


def test_both_backends_satisfy_the_protocol(rig):
    assert isinstance(rig.backend, SandboxBackend)


def test_exit_code_and_separate_streams_come_back(rig, minimal, batch_id, host_workspace):
    spec = rig.spec(
        minimal, batch_id, ["sh", "-c", "echo out; echo err >&2; exit 3"], host_workspace
    )
    waited, out, err = run_to_end(rig, spec)
    assert (waited.exit_code, waited.oom, waited.timed_out) == (3, False, False)
    assert out == b"out\n"
    assert err == b"err\n"


def test_writes_to_workspace_reach_the_host_directory(rig, minimal, batch_id, host_workspace):
    spec = rig.spec(minimal, batch_id, ["sh", "-c", "echo hi > note.txt"], host_workspace)
    waited, _, err = run_to_end(rig, spec)
    assert waited.exit_code == 0, err
    assert (host_workspace / "note.txt").read_text() == "hi\n"


def test_writes_outside_the_workspace_fail_read_only(rig, minimal, batch_id, host_workspace):
    spec = rig.spec(minimal, batch_id, ["sh", "-c", "echo x > /etc/evil"], host_workspace)
    waited, _, err = run_to_end(rig, spec)
    assert waited.exit_code != 0
    assert b"Read-only file system" in err


def test_wait_kills_at_the_timeout_and_says_so(rig, minimal, batch_id, host_workspace):
    spec = rig.spec(
        minimal, batch_id, ["sh", "-c", "echo before; sleep 60; echo after"], host_workspace
    )
    waited, out, _ = run_to_end(rig, spec, timeout=1.0)
    assert waited.timed_out is True
    assert waited.exit_code == 137
    assert waited.oom is False
    assert out == b"before\n"


def test_exec_runs_inside_a_running_sandbox(rig, minimal, batch_id, host_workspace):
    box = rig.backend.create(rig.spec(minimal, batch_id, ["sleep", "60"], host_workspace))
    try:
        rig.backend.start(box)
        result = rig.backend.exec(box, ["sh", "-c", "echo inside; exit 4"])
        assert (result.exit_code, result.stdout) == (4, b"inside\n")
    finally:
        rig.backend.remove(box)


def test_list_finds_sandboxes_by_label_and_remove_is_idempotent(
    rig, minimal, batch_id, host_workspace
):
    box = rig.backend.create(rig.spec(minimal, batch_id, ["true"], host_workspace))
    try:
        (info,) = rig.backend.list({LABEL_BATCH: batch_id})
        assert info.id == box
        assert info.status is SandboxStatus.CREATED
        assert info.labels[LABEL_BATCH] == batch_id
    finally:
        rig.backend.remove(box)
    rig.backend.remove(box)  # already gone: no error
    assert rig.backend.list({LABEL_BATCH: batch_id}) == []


def test_a_missing_image_names_the_build_command(rig, minimal, batch_id, host_workspace):
    spec = rig.spec(minimal, batch_id, ["true"], host_workspace)
    kwargs = spec.create_kwargs() | {"image": "sandfleet/nonexistent:0000"}
    with pytest.raises(ImageError, match="sandfleet images build"):
        rig.backend.create(type(spec)(kwargs))


def test_a_taken_name_is_refused(rig, minimal, batch_id, host_workspace):
    spec = rig.spec(minimal, batch_id, ["true"], host_workspace)
    box = rig.backend.create(spec)
    try:
        with pytest.raises(SandboxError):
            rig.backend.create(spec)
    finally:
        rig.backend.remove(box)


def test_operations_on_a_removed_sandbox_raise_sandbox_error(
    rig, minimal, batch_id, host_workspace
):
    box = rig.backend.create(rig.spec(minimal, batch_id, ["true"], host_workspace))
    rig.backend.remove(box)
    with pytest.raises(SandboxError, match="no such sandbox"):
        rig.backend.start(box)


def test_stats_report_the_memory_limit_of_a_running_sandbox(rig, minimal, batch_id, host_workspace):
    box = rig.backend.create(rig.spec(minimal, batch_id, ["sleep", "60"], host_workspace))
    try:
        rig.backend.start(box)
        stats = rig.backend.stats(box)
        assert stats.memory_limit_bytes == minimal.resources.memory
        assert stats.pids >= 1
    finally:
        rig.backend.remove(box)


def test_exec_and_log_following_outlast_the_clients_request_timeout(
    docker_client, base_image, rig_for, minimal, batch_id, host_workspace
):
    import threading

    import docker

    from sandbox.docker_backend import DockerBackend

    impatient = DockerBackend(client=docker.from_env(timeout=1))  # 1 s read timeout
    rig = rig_for(impatient, base_image)
    main = "echo before; while [ ! -e /tmp/go ]; do sleep 0.2; done; echo after"
    box = impatient.create(rig.spec(minimal, batch_id, ["sh", "-c", main], host_workspace))
    followed: list[bytes] = []
    try:
        impatient.start(box)
        follower = threading.Thread(
            target=lambda: followed.extend(impatient.logs(box, "stdout", follow=True))
        )
        follower.start()
        result = impatient.exec(box, ["sh", "-c", "sleep 3; touch /tmp/go; echo done"])
        assert impatient.wait(box, timeout=60).exit_code == 0
        follower.join(60)
    finally:
        impatient.remove(box)
        impatient.close()
    assert (result.exit_code, result.stdout) == (0, b"done\n")
    assert b"".join(followed) == b"before\nafter\n"


def test_an_engine_that_does_not_answer_names_make_setup(tmp_path):
    import docker

    from accounting.errors import EngineError
    from sandbox.docker_backend import DockerBackend

    silent = docker.DockerClient(base_url=f"unix://{tmp_path}/no-engine.sock", version="1.41")
    backend = DockerBackend(client=silent)
    try:
        with pytest.raises(EngineError, match="make setup"):
            backend.list({})
    finally:
        backend.close()


@pytest.mark.docker
def test_the_engine_client_reuses_its_connections_across_containers(docker_client) -> None:
    import uuid

    from docker.errors import NotFound

    from sandbox.engine import docker_client as make_client

    client = make_client()
    try:
        for _ in range(30):  # 30 URLs: docker-py alone would keep 25 pools, a socket each
            with pytest.raises(NotFound):
                client.api.inspect_container(uuid.uuid4().hex)
        adapter = client.api.get_adapter("http+docker://localhost/")
        assert len(adapter.pools) == 1
        pool = adapter.get_connection("http+docker://localhost/anything")
        opened = [conn for conn in list(pool.pool.queue) if conn is not None]
        assert len(opened) == 1 and pool.num_requests >= 30  # one socket, reused
    finally:
        client.close()


def test_an_unregistered_runtime_is_refused_with_the_fix(
    docker_backend, base_image, rig_for, minimal, batch_id, host_workspace
):
    gvisor = minimal.model_copy(update={"runtime": "runsc"})
    rig = rig_for(docker_backend, base_image)
    known = docker_backend.client.info().get("Runtimes") or {}
    if "runsc" in known:
        pytest.skip("runsc is registered on this engine")
    with pytest.raises(SandboxError, match=r"runtime 'runsc' is not registered.*runtime: runc"):
        docker_backend.create(rig.spec(gvisor, batch_id, ["true"], host_workspace))
