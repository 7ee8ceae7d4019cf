"""Workers started by other launchers than ``thenable launch``: torchrun (whose agent serves a
c10d store on MASTER_PORT), a torch process group sharing MASTER_PORT with RPC, Slurm's srun
(simulated on this host: its variables, no MASTER_ADDR/MASTER_PORT) and Open MPI's mpirun
(simulated likewise).

Every run is a session of its own, killed if it outlives its time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
from _harness import free_port, without_launcher_variables

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 120.0


def _clean_env(**extra: str) -> dict[str, str]:
    env = without_launcher_variables(os.environ)
    env.update(extra)
    return env


def _run_all(commands: Sequence[tuple[list[str], dict[str, str]]]) -> list[tuple[int, str]]:
    """Start every command, each in a session of its own; (exit code, output) of each."""
    processes = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for command, env in commands
    ]
    try:
        outputs = [process.communicate(timeout=RUN_TIMEOUT_S)[0] for process in processes]
        return [(p.returncode, out) for p, out in zip(processes, outputs, strict=True)]
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _script(tmp_path: Path, text: str) -> str:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(text))
    return str(path)


# Each worker calls the next one, then all shut down: enough to show the group works.
RING = """
    import os
    from thenable import rpc
    rank = int(os.environ[RANK_VARIABLE])
    rpc.init_rpc(f"worker{rank}")  # rank and world size from the launcher's variables
    size = len(rpc.api._get_current_rpc_agent().get_worker_infos())
    print("ring", rank, rpc.rpc_sync(f"worker{(rank + 1) % size}", os.getpid) != os.getpid())
    rpc.shutdown()
"""


def _ring(tmp_path: Path, rank_variable: str) -> str:
    return _script(tmp_path, RING.replace("RANK_VARIABLE", repr(rank_variable)))


def test_torchrun_runs_the_demo() -> None:
    """torchrun's agent holds MASTER_PORT with its store; the workers join through it."""
    pytest.importorskip("torch")
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3"]
    command += ["--master-port", str(port), str(ROOT / "examples" / "async_execution.py")]
    [(code, output)] = _run_all([(command, _clean_env())])
    assert code == 0, output
    for line in ("async_add_chained: tensor([3., 3.])", "bound method: tensor([4., 4.])"):
        assert line in output.splitlines(), output


def test_a_process_group_and_rpc_share_master_port(tmp_path: Path) -> None:
    """As torch allows: init_process_group("gloo", "env://") and init_rpc on one port."""
    pytest.importorskip("torch")
    script = _script(
        tmp_path,
        """
        import os, torch, torch.distributed as dist
        from thenable import rpc
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("gloo", init_method="env://")
        rpc.init_rpc(f"worker{rank}")
        total = torch.ones(1) * rank
        dist.all_reduce(total)
        added = rpc.rpc_sync(f"worker{(rank + 1) % size}", torch.add, args=(torch.ones(1), rank))
        print("result", rank, int(total.item()), int(added.item()), flush=True)
        rpc.shutdown()
        dist.destroy_process_group()
        """,
    )
    port = str(free_port())
    runs = [
        (
            [sys.executable, script],
            _clean_env(RANK=str(r), WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for r in range(3)
    ]
    results = _run_all(runs)
    for rank, (code, output) in enumerate(results):
        assert code == 0, output
        assert f"result {rank} 3 {rank + 1}" in output.splitlines(), output


def test_slurm_variables_alone_give_the_master(tmp_path: Path) -> None:
    """srun sets SLURM_PROCID/SLURM_NTASKS/SLURM_JOB_NODELIST/SLURM_JOB_ID, no MASTER_*:
    the master is the node list's first host, its port 15000 + the job id's last 4 digits."""
    port = free_port(15000, 24999)
    job_id = str(1_000_000 + port - 15000)  # its last four digits give the port
    script = _ring(tmp_path, "SLURM_PROCID")
    runs = [
        (
            [sys.executable, script],
            _clean_env(
                SLURM_PROCID=str(r),
                SLURM_NTASKS="3",
                SLURM_JOB_ID=job_id,
                SLURM_JOB_NODELIST="localhost",
            ),
        )
        for r in range(3)
    ]
    for rank, (code, output) in enumerate(_run_all(runs)):
        assert code == 0, output
        assert f"ring {rank} True" in output.splitlines(), output


def test_open_mpi_variables_give_rank_and_world_size(tmp_path: Path) -> None:
    """mpirun sets OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE; MASTER_ADDR/MASTER_PORT are
    passed with ``-x`` (here: set directly)."""
    port = str(free_port())
    script = _ring(tmp_path, "OMPI_COMM_WORLD_RANK")
    runs = [
        (
            [sys.executable, script],
            _clean_env(
                OMPI_COMM_WORLD_RANK=str(r),
                OMPI_COMM_WORLD_SIZE="3",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
        )
        for r in range(3)
    ]
    for rank, (code, output) in enumerate(_run_all(runs)):
        assert code == 0, output
        assert f"ring {rank} True" in output.splitlines(), output
