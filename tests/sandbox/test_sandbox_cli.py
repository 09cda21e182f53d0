"""`sandfleet sandbox run | ls | reap` against the real engine."""

from __future__ import annotations

import socket
from pathlib import Path

from click.testing import CliRunner

from sandbox.sandbox_cli import sandbox_group
from sandbox.workspace import prepare_workspace, remove_workspace


def invoke(*args: str):
    return CliRunner().invoke(sandbox_group, list(args), catch_exceptions=False)


def test_run_streams_output_and_exits_with_the_commands_code(
    docker_backend, base_image, data_dir, batch_id, tmp_path
):
    given = tmp_path / "given"
    given.mkdir()
    (given / "a.txt").write_text("a\n")
    result = invoke("run", "--template", "minimal", "--data-dir", str(data_dir),
                    "--batch", batch_id, "--workspace", str(given), "--",
                    "sh", "-c", "cat a.txt; echo oops >&2; echo b >> a.txt; exit 7")  # fmt: skip
    assert result.exit_code == 7
    assert result.stdout == "a\n"
    assert "oops" in result.stderr
    assert "1 file(s) changed (+1 -0)" in result.stderr
    archive = result.stderr.rsplit("archive: ", 1)[1].strip()
    assert (Path(archive) / "diff.patch").read_text().count("+b") == 1


def test_run_says_timed_out_and_exits_124(docker_backend, base_image, data_dir, batch_id):
    result = invoke("run", "--template", "minimal", "--data-dir", str(data_dir),
                    "--batch", batch_id, "--timeout", "1", "--", "sleep", "600")  # fmt: skip
    assert result.exit_code == 124
    assert "timed out after 1 s" in result.stderr


def test_run_says_out_of_memory_and_exits_137(docker_backend, base_image, data_dir, batch_id):
    result = invoke("run", "--template", "minimal", "--data-dir", str(data_dir),
                    "--batch", batch_id, "--", "python3", "-c", "bytearray(2**30)")  # fmt: skip
    assert result.exit_code == 137
    assert "killed: out of memory (limit 512m)" in result.stderr


def test_reap_removes_a_dead_workspace_and_ls_shows_it_first(docker_backend, data_dir, batch_id):
    ws = prepare_workspace(data_dir, batch=batch_id, task="t", attempt=1,
                           owner=f"{socket.gethostname()}:0:0", size_bytes=8 * 2**20)  # fmt: skip
    try:
        ls = invoke("ls", "--data-dir", str(data_dir))
        assert ls.exit_code == 0
        assert f"dead  {ws.root}" in ls.stdout
        reaped = invoke("reap", "--data-dir", str(data_dir), "--batch", batch_id)
        assert reaped.exit_code == 0
        assert f"removed workspace {ws.root}" in reaped.stdout
        assert not ws.root.exists()
    finally:
        remove_workspace(ws.root)
