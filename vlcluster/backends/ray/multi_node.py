"""A stage on several Ray nodes (``resources.nodes > 1``), run from inside
its Ray job: a STRICT_SPREAD placement group reserves one bundle of the
stage's CPUs and GPUs per node, one Ray task per bundle starts torchrun with
a static rendezvous on the first bundle's node (the same rendezvous the
SLURM backend uses), and the job waits for all of them.

The rendezvous address is the first node's IP as Ray reports it, or
``$VLCLUSTER_RAY_MASTER_ADDR`` when set (the driver passes it on to the job):
Ray reports a host's primary interface as its IP even when the node was
started with ``--node-ip-address=127.0.0.1``, so several nodes on one host
(the tests) set it to 127.0.0.1 to keep the ranks' traffic on loopback.

When a node ends badly the others get a grace period to fail on their own
(their ranks lose their peers), then their tasks are cancelled; a lost node
or a rank killed by a signal lets the caller start all nodes again, from the
latest checkpoint.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from vlcluster.backends.node_shape import node_shape
from vlcluster.backends.stage_process import child_env, run_once, write_header
from vlcluster.errors import EXIT_OK
from vlcluster.launch import Rendezvous, stage_command
from vlcluster.ports import free_ports

MASTER_ADDR_ENV = "VLCLUSTER_RAY_MASTER_ADDR"
READY_TIMEOUT_S = 600
PEER_GRACE_S = 45  # > torchrun's 30 s grace between SIGTERM and SIGKILL of its ranks


@dataclass(frozen=True)
class NodeResult:
    node_rank: int
    code: int
    rank_codes: list[int]
    node_id: str


def _rendezvous_address() -> tuple[str, int, str]:
    import ray

    address = os.environ.get(MASTER_ADDR_ENV) or ray.util.get_node_ip_address()
    return address, free_ports(1, host="")[0], ray.get_runtime_context().get_node_id()


def _run_node(run_dir: str, stage: str, kind: str, procs: int, rendezvous: Rendezvous) -> NodeResult:
    """One node's torchrun; node 0 writes the stage log."""
    import ray

    from vlcluster.stages.rundir import stage_dir

    directory = stage_dir(run_dir, stage)
    node = rendezvous.node_rank
    log_file = directory.log_file if node == 0 else directory.root / "logs" / f"node_{node}.log"
    command = stage_command(kind, run_dir, stage, procs, rendezvous=rendezvous)
    node_id = ray.get_runtime_context().get_node_id()
    with open(log_file, "a") as log:
        write_header(log, f"node {node}/{rendezvous.nnodes} on Ray node {node_id} ({socket.gethostname()}):", command)
        code, rank_codes = run_once(command, child_env(kind, procs), log)
    return NodeResult(node, code, rank_codes, node_id)


def run_nodes(run_dir: str, stage: str, spec, stopping: Callable[[], bool]) -> list[NodeResult]:
    """One attempt on every node of the stage; a node whose task was lost
    counts as killed (exit code -9). ``stopping()`` true (the job is being
    stopped) kills the node tasks, and with them their torchrun."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    res = spec.resources
    shape = node_shape(res, spec.kind)
    cpus = shape.cpus
    bundle = {"CPU": cpus, **({"GPU": shape.gpus} if shape.gpus else {})}
    ray.init(address="auto")  # node tasks' output reaches the job log
    group = placement_group([bundle] * res.nodes, strategy="STRICT_SPREAD")
    try:
        ray.get(group.ready(), timeout=READY_TIMEOUT_S)

        def on(index: int, func, **options):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
            return ray.remote(func).options(scheduling_strategy=strategy, max_retries=0, **options)

        address, port, _ = ray.get(on(0, _rendezvous_address, num_cpus=0).remote())
        tasks = {
            on(node, _run_node, num_cpus=cpus, num_gpus=res.gpus_per_node).remote(
                run_dir, stage, spec.kind, res.ranks_per_node, Rendezvous(res.nodes, node, address, port)): node
            for node in range(res.nodes)
        }
        return _gather(tasks, stopping)
    finally:
        remove_placement_group(group)
        ray.shutdown()


def _gather(tasks: dict, stopping: Callable[[], bool]) -> list[NodeResult]:
    import ray

    results, pending, cancelled = [], list(tasks), set()
    failed_at: float | None = None

    def cancel_pending() -> None:
        for ref in pending:
            if ref not in cancelled:
                ray.cancel(ref, force=True)  # kills the task's worker; torchrun gets SIGTERM with it
                cancelled.add(ref)

    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
        # Peers of a failed node usually fail on their own within seconds and
        # report how (a rank killed by a signal is what makes a restart
        # worthwhile); only ranks stuck on the lost ones are cancelled.
        if stopping() or (failed_at is not None and time.monotonic() - failed_at > PEER_GRACE_S):
            cancel_pending()
        if not done:
            continue
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayError:
            # Cancelled here: not a cause of its own. Otherwise the node or
            # its worker process was lost, as if its ranks were killed.
            lost = done[0] not in cancelled
            result = NodeResult(tasks[done[0]], -9 if lost else 1, [-9] if lost else [], "")
        results.append(result)
        if result.code != EXIT_OK and failed_at is None:
            failed_at = time.monotonic()
    return sorted(results, key=lambda result: result.node_rank)
