"""Multi-process runs through `jax.distributed`: flags, environment, or a detected cluster.

The same command runs on every process. The coordinator address, process count and process id
come from `--coordinator-address/--num-processes/--process-id`, else from the environment
(`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), else from a cluster JAX
detects itself (Slurm, Open MPI, Kubernetes, Cloud TPU). With none of these the run is one process.
On CPU the processes exchange collectives through gloo, so `2 processes x 4 CPU devices` is one
8-device mesh on a laptop.
"""
from __future__ import annotations

import argparse
import os

from rsdjax.config import ConfigError

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
CLUSTER_HINTS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--coordinator-address", help="host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, help="number of processes (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="this process's id, 0-based (env JAX_PROCESS_ID)")
    g.add_argument("--local-devices", type=int,
                   help="CPU only: virtual devices in this process (default: mesh size / number of processes)")


def resolve(coordinator_address=None, num_processes=None, process_id=None) -> dict | None:
    """The explicit settings from arguments then environment; None for a single process."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    for key, env in ENV.items():
        if given[key] is None and os.environ.get(env):
            given[key] = os.environ[env] if key == "coordinator_address" else _int(env, os.environ[env])
    present = [k for k, v in given.items() if v is not None]
    if not present:
        return None
    if len(present) != 3:
        missing = [f"--{k.replace('_', '-')}" for k in given if given[k] is None]
        raise ConfigError(f"multi-process run: {', '.join(missing)} missing (give all three, or the env vars "
                          f"{', '.join(ENV.values())})")
    if given["num_processes"] < 1 or not 0 <= given["process_id"] < given["num_processes"]:
        raise ConfigError(f"--process-id={given['process_id']} is not in [0, --num-processes={given['num_processes']})")
    return given


def _int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer") from None


def initialize(coordinator_address=None, num_processes=None, process_id=None, local_devices: int | None = None,
               mesh_size: int | None = None) -> int:
    """Start the distributed runtime if asked; return the number of processes. Call before any JAX work."""
    import jax

    settings = resolve(coordinator_address, num_processes, process_id)
    auto = settings is None and any(os.environ.get(k) for k in CLUSTER_HINTS)
    if settings is None and not auto:
        return 1
    n = settings["num_processes"] if settings else None
    if settings and n == 1:
        return 1
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        count = local_devices or (mesh_size // n if mesh_size and n else None)
        if count:
            jax.config.update("jax_num_cpu_devices", count)  # only affects the CPU backend
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if settings:
        jax.distributed.initialize(settings["coordinator_address"], n, settings["process_id"])
    else:
        jax.distributed.initialize()  # Slurm / Open MPI / TPU: JAX reads the cluster's own variables
    return jax.process_count()
