"""init_rpc: a missing peer, duplicate names, rank and world size from launchers' environments,
and init through env:// (MASTER_ADDR/MASTER_PORT)."""

from __future__ import annotations

import logging

import _remote_fns as fns
import pytest
from _harness import Failure, Group, free_port
from conftest import GroupFactory

from thenable import rpc
from thenable.rpc._group.rendezvous import first_host, master_address
from thenable.rpc._options import resolve_rank_and_world_size

INIT_TIMEOUT_S = 3.0


def _is(failure: Failure, cls: type[BaseException], *fragments: str) -> None:
    assert failure.type_name == f"{cls.__module__}.{cls.__qualname__}", failure.traceback
    for fragment in fragments:
        assert fragment in failure.message, (fragment, failure.message)


def test_missing_peer_fails_init_on_every_worker_naming_it(make_group: GroupFactory) -> None:
    """world_size=3 but only ranks 0 and 1 start: both fail within about rpc_timeout, rank 0
    naming rank 2; RPC is left uninitialized (with no threads), so init_rpc works again."""
    group: Group = make_group(2)
    tickets = [
        group.submit(rank, fns.init_failure, rank, 3, group.port, rpc_timeout=INIT_TIMEOUT_S)
        for rank in (0, 1)
    ]
    outcomes = [group.result(ticket) for ticket in tickets]
    for rank, (failure, elapsed, cleared, threads) in enumerate(outcomes):
        _is(failure, rpc.RpcTimeoutError)
        assert INIT_TIMEOUT_S * 0.9 <= elapsed < INIT_TIMEOUT_S + 7.0, (rank, elapsed)
        assert cleared is True, rank
        assert threads == [], rank
    _is(outcomes[0][0], rpc.RpcTimeoutError, "rank(s) [2] did not join")
    # Both can start a complete group afterwards.
    group.init_all(fns.init_worker, port=free_port(), rpc_timeout=30.0)
    assert group.call(1, fns.roundtrip, "worker0", 1) == 2
    group.call_all(fns.shutdown_worker)
    group.close()


def test_duplicate_worker_names_are_refused(make_group: GroupFactory) -> None:
    group: Group = make_group(2)
    tickets = [
        group.submit(
            rank, fns.init_failure, rank, 2, group.port, name="twin", rpc_timeout=INIT_TIMEOUT_S
        )
        for rank in (0, 1)
    ]
    (first, first_elapsed, first_cleared, _), (second, second_elapsed, second_cleared, _) = [
        group.result(ticket) for ticket in tickets
    ]
    # Every worker fails at once (rank 0 too, instead of waiting for a rank 1 that never
    # comes), with an error naming the duplicate, that torch code catches as RuntimeError.
    for failure in (first, second):
        _is(failure, rpc.WorkerNameError, "'twin'", "ranks 0 and 1", "unique")
        assert "builtins.RuntimeError" in failure.bases
    assert second_elapsed < INIT_TIMEOUT_S  # refused, not timed out
    assert first_elapsed < INIT_TIMEOUT_S
    assert first_cleared is True
    assert second_cleared is True
    group.close()


def test_init_through_env_master_addr_and_port(make_group: GroupFactory) -> None:
    port = free_port()
    envs = [
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
        }
        for rank in range(2)
    ]
    group: Group = make_group(2, env=envs)
    assert group.call_all(fns.init_from_env) == [("worker0", 0), ("worker1", 1)]
    assert group.call(0, fns.listener_address) == ("127.0.0.1", port)
    assert group.call(0, fns.roundtrip, "worker1", 1) == 2
    assert group.call(1, fns.roundtrip, "worker0", 2) == 3
    group.call_all(fns.shutdown_worker)
    group.close()


def test_env_init_without_master_address_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT") as info:
        rpc.init_rpc("worker0", rank=0, world_size=1)
    assert type(info.value) is ValueError
    with pytest.raises(RuntimeError, match="init_rpc"):
        rpc.get_worker_info()  # nothing was left running


# -- resolve_rank_and_world_size (no processes) ---------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RANK": "2", "WORLD_SIZE": "4"}, (2, 4)),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "3"}, (1, 3)),
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, (0, 2)),
        ({"PMI_RANK": "5", "PMI_SIZE": "6"}, (5, 6)),
        # torchrun's variables win over Slurm's, Slurm's over Open MPI's.
        ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "7", "SLURM_NTASKS": "8"}, (1, 2)),
        (
            {
                "SLURM_PROCID": "3",
                "SLURM_NTASKS": "4",
                "OMPI_COMM_WORLD_RANK": "0",
                "OMPI_COMM_WORLD_SIZE": "9",
            },
            (3, 4),
        ),
        # A launcher's pair counts only when complete.
        ({"RANK": "1", "SLURM_PROCID": "2", "SLURM_NTASKS": "5"}, (2, 5)),
    ],
)
def test_rank_and_world_size_from_launcher_env(
    env: dict[str, str], expected: tuple[int, int]
) -> None:
    assert resolve_rank_and_world_size(-1, None, env) == expected


def test_explicit_rank_and_world_size_win_over_env() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "4"}
    assert resolve_rank_and_world_size(3, None, env) == (3, 4)
    assert resolve_rank_and_world_size(-1, 2, env) == (1, 2)
    assert resolve_rank_and_world_size(0, 1, env) == (0, 1)
    assert resolve_rank_and_world_size(2, 3, {}) == (2, 3)


@pytest.mark.parametrize(
    ("rank", "world_size", "env", "fragment"),
    [
        (-1, None, {}, "RANK/WORLD_SIZE"),
        (-1, None, {"WORLD_SIZE": "2"}, "SLURM_PROCID/SLURM_NTASKS"),
        (-1, None, {"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        (-1, None, {"SLURM_PROCID": "0", "SLURM_NTASKS": "n"}, "SLURM_NTASKS='n'"),
        (-1, None, {"RANK": "2", "WORLD_SIZE": "2"}, "rank must be an int in [0, 2)"),
        (5, 3, {}, "rank must be an int in [0, 3)"),
        (0, 0, {}, "world_size must be an int >= 1"),
    ],
)
def test_bad_rank_or_world_size_is_a_clear_value_error(
    rank: int, world_size: int | None, env: dict[str, str], fragment: str
) -> None:
    with pytest.raises(ValueError) as info:
        resolve_rank_and_world_size(rank, world_size, env)
    assert type(info.value) is ValueError
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("options", "error", "fragment"),
    [
        ({"init_method": "file:///tmp/x"}, ValueError, "init_method must be 'env://'"),
        ({"rpc_timeout": "10"}, TypeError, "rpc_timeout must be seconds"),
        ({"rpc_timeout": -1}, ValueError, "rpc_timeout must be >= 0"),
        ({"num_worker_threads": 0}, ValueError, "num_worker_threads must be >= 1"),
        ({"num_worker_threads": True}, TypeError, "num_worker_threads must be an int"),
        ({"auth_key": 123}, TypeError, "auth_key must be bytes or str"),
        ({"same_host_ipc": 1}, TypeError, "same_host_ipc must be True or False"),
        ({"busy_poll_us": 0.5}, TypeError, "busy_poll_us must be an int (microseconds)"),
        ({"busy_poll_us": False}, TypeError, "busy_poll_us must be an int"),
        ({"busy_poll_us": -1}, ValueError, "busy_poll_us must be between 0 (never poll)"),
        ({"busy_poll_us": 2_000_000}, ValueError, "and 1000000, got 2000000"),
        ({"max_send_queue_bytes": 1.5e9}, TypeError, "max_send_queue_bytes must be an int"),
        ({"max_send_queue_bytes": True}, TypeError, "max_send_queue_bytes must be an int"),
        ({"max_send_queue_bytes": 4096}, ValueError, "at least 1 MiB (1048576), got 4096"),
        ({"heartbeat_s": "10"}, TypeError, "heartbeat_s must be seconds, got '10'"),
        ({"heartbeat_s": True}, TypeError, "heartbeat_s must be seconds"),
        ({"heartbeat_s": 0.01}, ValueError, "0 (no heartbeat) or between 0.1 and 3600"),
        ({"heartbeat_s": -1}, ValueError, "got -1"),
        ({"devices": ["cuda:0"]}, NotImplementedError, "move tensors to CPU"),
        ({"_transports": "uv"}, TypeError, "_transports must be a list of str (or None)"),
        ({"_channels": ["basic", 1]}, TypeError, "_channels must be a list of str (or None)"),
    ],
)
def test_bad_backend_options_are_refused_naming_the_option(
    options: dict[str, object], error: type[BaseException], fragment: str
) -> None:
    with pytest.raises(error) as info:
        rpc.RpcBackendOptions(**options)  # type: ignore[arg-type]
    assert type(info.value) is error
    assert fragment in str(info.value)


def test_options_of_another_class_are_refused_in_torch_s_words() -> None:
    class OtherOptions:
        init_method = "env://"

    with pytest.raises(TypeError, match=r"^Could not infer backend for options .*OtherOptions"):
        rpc.init_rpc("worker0", rank=0, world_size=1, rpc_backend_options=OtherOptions())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="init_rpc"):  # nothing was started
        rpc.get_worker_info()


@pytest.mark.parametrize(
    ("transports", "same_host_ipc"),
    [(["uv"], False), ([], False), (["shm", "uv"], True), (["ibv", "uv"], True), (None, True)],
)
def test_torch_s_tensorpipe_transports_choose_tcp_only_or_not(
    transports: list[str] | None, same_host_ipc: bool
) -> None:
    """Without "shm" (or "ibv"), torch's workers talk over TCP only: ours too."""
    options = rpc.TensorPipeRpcBackendOptions(_transports=transports)
    assert options.same_host_ipc is same_host_ipc
    assert options._transports == transports


def test_torch_s_channels_and_unknown_transports_are_ignored_in_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="thenable.rpc"):
        options = rpc.TensorPipeRpcBackendOptions(
            init_method="tcp://127.0.0.1:1", _transports=["uv", "ibv"], _channels=["basic"]
        )
    assert options.same_host_ipc is True  # "ibv": a fast path is allowed, as shm is
    assert options._channels == ["basic"]
    assert [(r.name, r.levelno) for r in caplog.records] == [("thenable.rpc", logging.INFO)]
    assert caplog.records[0].getMessage() == (
        "RpcBackendOptions: ignored _transports ['ibv'] (thenable's are TCP, torch's 'uv', and "
        "same-host shared memory, torch's 'shm'); _channels=['basic'] (thenable has no "
        "TensorPipe channels: payloads travel in its own frames)"
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="thenable.rpc"):
        rpc.TensorPipeRpcBackendOptions(_transports=["uv"])  # nothing ignored: nothing said
    assert caplog.records == []


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node[007-009,012],login1", "node007"),
        ("rack[1-2]-gpu[03-04],x", "rack1-gpu03"),
        ("a01,b02", "a01"),
        ("solo", "solo"),
        ("n[5]", "n5"),
    ],
)
def test_the_first_host_of_a_slurm_node_list(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "x[1-3", "x]1[", "a[[1]]"])
def test_a_malformed_slurm_node_list_is_refused(nodelist: str) -> None:
    with pytest.raises(ValueError, match="cannot read the Slurm node list"):
        first_host(nodelist)


def test_slurm_gives_the_master_when_master_addr_and_port_are_unset() -> None:
    env = {"SLURM_PROCID": "2", "SLURM_JOB_ID": "4812345", "SLURM_JOB_NODELIST": "localhost"}
    assert master_address("env://", env) == ("127.0.0.1", 15000 + 2345)
    # MASTER_ADDR / MASTER_PORT win; a job id that is not a number gives no port.
    assert master_address("env://", {**env, "MASTER_PORT": "5000"}) == ("127.0.0.1", 5000)
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT"):
        master_address("env://", {**env, "SLURM_JOB_ID": "abc"})
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT"):
        master_address("env://", {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "localhost"})


def test_launcher_variables_name_every_variable_init_rpc_reads() -> None:
    """``LAUNCHER_VARIABLES`` (which the tests strip from workers) lists every environment
    variable the modules that start RPC read."""
    import re
    from pathlib import Path

    from thenable.rpc import _options
    from thenable.rpc._group import rendezvous as _rendezvous
    from thenable.rpc._group import store as _store

    read: set[str] = set()
    for module in (_options, _rendezvous, _store):
        source = Path(module.__file__ or "").read_text()
        read.update(re.findall(r'env(?:\.get\(|\[)"([A-Z_]+)"', source))
        read.update(re.findall(r'_ENV = "([A-Z_]+)"', source))
    read.update(name for pair in _options._LAUNCHER_ENV for name in pair)
    assert {"MASTER_ADDR", "TORCHELASTIC_USE_AGENT_STORE", "THENABLE_AUTH_KEY"} <= read
    assert read <= set(_options.LAUNCHER_VARIABLES)
