"""ExecSync: run a command in a container and return its output and exit code.

Output is bounded: the runtime keeps at most 16 MiB of each stream (CRI-O's limit) and drops the
rest, and the reply keeps under kubelet's 16 MiB message limit. What was cut is said at the end
of stderr, and the call still succeeds with the command's exit code.
"""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.oci.runtime import EXEC_OUTPUT_LIMIT, ExecResult
from pycrio.server.daemon import Daemon

# kubelet's (and our server's) gRPC message limit, less room for the rest of the reply
REPLY_LIMIT = 16 * 1024 * 1024 - 64 * 1024


def exec_sync(daemon: Daemon, request: api_pb2.ExecSyncRequest) -> api_pb2.ExecSyncResponse:
    result = daemon.containers.exec_sync(request.container_id, list(request.cmd), request.timeout)
    stdout, stderr = bounded_output(result)
    return api_pb2.ExecSyncResponse(stdout=stdout, stderr=stderr, exit_code=result.exit_code)


def bounded_output(result: ExecResult, limit: int = REPLY_LIMIT) -> tuple[bytes, bytes]:
    """stdout and stderr fitting in `limit` bytes together, with a note on stderr when cut."""
    out, err = result.stdout, result.stderr
    cut = {"stdout": result.stdout_truncated, "stderr": result.stderr_truncated}
    room = limit - 512  # for the note
    if len(out) + len(err) > room:
        keep_err = min(len(err), max(room // 2, room - len(out)))
        keep_out = room - keep_err
        cut["stdout"] |= keep_out < len(out)
        cut["stderr"] |= keep_err < len(err)
        out, err = out[:keep_out], err[:keep_err]
    streams = [name for name, was_cut in cut.items() if was_cut]
    if streams:
        sizes = ", ".join(f"{name} to {len(out if name == 'stdout' else err)} bytes" for name in streams)
        mib = EXEC_OUTPUT_LIMIT // (1024 * 1024)
        note = f"\n[pycrio: ExecSync output truncated: {sizes} (replies hold at most {mib} MiB)]\n"
        err += note.encode()
    return out, err
