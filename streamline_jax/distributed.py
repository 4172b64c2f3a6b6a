"""Process setup: multi-host start, the compilation cache, and process-0 helpers.

On TPU pod slices `jax.distributed.initialize()` finds everything itself. On GPU and CPU clusters the coordinator
address, the process count and this process's id come from arguments or the environment
(`STREAMLINE_COORDINATOR_ADDRESS`, `STREAMLINE_NUM_PROCESSES`, `STREAMLINE_PROCESS_ID`). Only process 0 writes
reports, plots and exports (`main_only`); every process takes part in Orbax saves and restores, which write and
read each process's own shards (`save_params`, `restore_params`).
"""

from __future__ import annotations

import functools
import os
import socket
import time
import warnings
from pathlib import Path

import jax
import numpy as np

ENV_ADDRESS = "STREAMLINE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "STREAMLINE_NUM_PROCESSES"
ENV_PROCESS_ID = "STREAMLINE_PROCESS_ID"
ENV_COMPILATION_CACHE = "STREAMLINE_JAX_COMPILATION_CACHE"
DEFAULT_COMPILATION_CACHE = Path("~/.cache/streamline_jax/xla")


class DistributedError(RuntimeError):
    pass


def _on_tpu_vm() -> bool:
    return any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID")) or \
        Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists()


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"coordinator address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once the coordinator accepts TCP connections; a clear error after `timeout_s` (JAX itself would abort
    the process with a fatal log when it cannot register, so a non-zero process checks first)."""
    host, port = _parse_address(address)
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(0.1, deadline - time.monotonic()))):
                return
        except OSError as e:
            last = e
            time.sleep(0.2)
    raise DistributedError(f"coordinator {address} could not be reached within {timeout_s:g} s ({last}); start "
                           f"process 0 first, and check the address, the port and the firewall")


def _check_bindable(address: str) -> None:
    host, port = _parse_address(address)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("" if host in ("0.0.0.0", "::") else host, port))
    except OSError as e:
        raise DistributedError(f"process 0 cannot serve as coordinator on {address}: {e}") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None, timeout_s: int = 300,
               platform: str | None = None) -> bool:
    """Join the processes of a multi-host run; call before any other JAX call. Returns True when this is a
    multi-process run. TPU: no arguments needed. GPU/CPU: address, count and id from the arguments or the
    environment. A single process without an address is left alone."""
    address = coordinator_address or os.environ.get(ENV_ADDRESS)
    n = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
    if address is None:
        if platform == "tpu" or (platform is None and _on_tpu_vm()):
            jax.distributed.initialize(initialization_timeout=timeout_s)
            return jax.process_count() > 1
        if n not in (None, 1):
            raise DistributedError(f"{n} processes need a coordinator address (--coordinator-address or "
                                   f"{ENV_ADDRESS})")
        return False
    if n is None or pid is None:
        raise DistributedError(f"coordinator {address} given without the process count and this process's id "
                               f"({ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    if n < 1 or not 0 <= pid < n:
        raise DistributedError(f"process id {pid} is not in [0, {n})")
    if pid == 0:
        _check_bindable(address)
    else:
        wait_for_coordinator(address, timeout_s)
    jax.distributed.initialize(address, num_processes=n, process_id=pid, local_device_ids=local_device_ids,
                               initialization_timeout=int(timeout_s))
    return n > 1


def add_arguments(parser) -> None:
    """--coordinator-address / --num-processes / --process-id for a command line (the environment is the fallback)."""
    g = parser.add_argument_group("multi-host (GPU/CPU; TPU pods need none)")
    g.add_argument("--coordinator-address", help=f"host:port of process 0 (or {ENV_ADDRESS})")
    g.add_argument("--num-processes", type=int, help=f"number of processes (or {ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, help=f"this process's id, 0 first (or {ENV_PROCESS_ID})")
    g.add_argument("--coordinator-timeout", type=int, default=300, help="seconds to wait for the coordinator")


def initialize_from_args(args) -> bool:
    return initialize(args.coordinator_address, args.num_processes, args.process_id,
                      timeout_s=args.coordinator_timeout)


def _int_env(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"{name}={v!r} is not an integer") from None


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Keep compiled programs on disk (jax's persistent compilation cache), so a later run with the same shapes
    loads them instead of compiling again, as MaxText does. `directory`: a folder, or "off"; default
    $STREAMLINE_JAX_COMPILATION_CACHE, else a folder jax was already given (JAX_COMPILATION_CACHE_DIR), else
    ~/.cache/streamline_jax/xla. Returns the folder in use, or None. A folder that cannot be made only warns: the
    cache saves time, and a run does not need it."""
    from jax.experimental.compilation_cache import compilation_cache

    choice = os.fspath(directory) if directory is not None else os.environ.get(ENV_COMPILATION_CACHE, "")
    if choice.lower() in ("off", "none", "false", "0"):
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
        return None
    if not choice and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    path = Path(choice or DEFAULT_COMPILATION_CACHE).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(f"compilation cache off: cannot create {path} ({e})", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    compilation_cache.reset_cache()  # drop any cache state jax set up before the folder was given
    return path


def shutdown() -> None:
    if jax.process_count() > 1:
        jax.distributed.shutdown()


# --------------------------------------------------------------------------------------------------------------
# Process 0 writes


def is_main_process() -> bool:
    return jax.process_index() == 0


def main_only(fn):
    """Run `fn` on process 0 only (reports, plots, the Hugging Face export); other processes get None. All
    processes wait for process 0 to finish, so what it wrote is there when they go on."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs) if is_main_process() else None
        barrier(f"main_only:{fn.__qualname__}")
        return result

    return wrapper


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(tree):
    """Global arrays as numpy on every process (gathering shards other processes hold)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda a: np.asarray(a) if not isinstance(a, jax.Array) or a.is_fully_replicated else
                        np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)


def host_readable(tree):
    """Arrays this process can read whole, for writing files: in one process the tree as it is (each array comes to
    the host when its turn to be written comes, so a model is never on the host whole); across processes, gathered
    (`to_host`)."""
    return tree if jax.process_count() == 1 else to_host(tree)


def global_batch(mesh, arrays):
    """A batch every process holds in full (the same numpy arrays) as global arrays split over data × fsdp; each
    process places only its own devices' rows."""
    from .sharding import batch_sharding

    out = []
    for a in arrays:
        a = np.asarray(a)
        sharding = batch_sharding(mesh, a.ndim, a.shape[0])
        out.append(jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index]))
    return tuple(out)


# --------------------------------------------------------------------------------------------------------------
# Orbax, multi-host


def save_params(path, params) -> None:
    """Save a (sharded) parameter tree with Orbax; every process calls it and writes its own shards."""
    import orbax.checkpoint as ocp

    from .host_memory import save_concurrent_gb

    path = Path(path).absolute()
    with ocp.StandardCheckpointer(save_concurrent_gb=save_concurrent_gb(params)) as ckptr:
        ckptr.save(path, params)
        ckptr.wait_until_finished()
    barrier(f"save_params:{path}")


def restore_params(path, abstract):
    """Restore a tree saved by `save_params` onto `abstract`'s shardings (ShapeDtypeStructs with `sharding`),
    whatever the number of processes and devices that saved it."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no Orbax checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, abstract)
