"""Where training runs: the tf.distribute strategy, the cluster's coordination service, the precision policy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tapeline.cluster import Cluster, check_port_free
from tapeline.config import TrainConfig
from tapeline.errors import ConfigError
from tapeline.hardware import cpu, cpu_name, cpu_precision, gpu_precision

# ---------------------------------------------------------------- environment

def make_strategy(config: TrainConfig, cluster: Cluster | None = None) -> Any:
    """The tf.distribute strategy for `train.strategy`: MultiWorkerMirroredStrategy on a TF_CONFIG cluster (its
    collectives time out after `worker_timeout_seconds`), mirrored over several GPUs, else the default. Created
    before any other TensorFlow op: a multi-worker strategy cannot join a cluster after the runtime started."""
    import tensorflow as tf

    if cluster is not None and config.strategy not in ("auto", "multi_worker"):
        raise ConfigError(f"train.strategy={config.strategy} cannot train on the TF_CONFIG cluster; use auto or "
                          "multi_worker")
    if cluster is not None or config.strategy == "multi_worker":
        if cluster is not None:
            check_port_free(cluster)
            _configure_coordination(cluster, config.worker_timeout_seconds)
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=config.worker_timeout_seconds)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    gpus = tf.config.list_logical_devices("GPU")
    name = ("mirrored" if len(gpus) > 1 else "default") if config.strategy == "auto" else config.strategy
    if name == "default":
        return tf.distribute.get_strategy()
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices)


def _configure_coordination(cluster: Cluster, timeout: float) -> None:
    """Have TensorFlow's coordination service give up on a worker that never joins after `timeout` seconds
    (its default is an hour) and on one silent for min(timeout, 10 s). The strategy would configure the
    service itself with the defaults; this goes through the runtime's private API, so failing is harmless."""
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.eager import context
    except ImportError:
        return
    with contextlib.suppress(Exception):
        context.context().configure_coordination_service(
            service_type="standalone", service_leader="/job:worker/replica:0/task:0",
            cluster_register_timeout_in_ms=int(timeout * 1000),
            heartbeat_timeout_in_ms=int(min(timeout, 10) * 1000),
            coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name="worker", num_tasks=cluster.size)],
        )


def _tensorflow_gpus() -> list[dict[str, Any]]:
    """The GPUs TensorFlow sees, [{name, capability}] (what decides the device and `auto` precision)."""
    import tensorflow as tf

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        gpus.append({"name": details.get("device_name", device.name),
                     "capability": tuple(capability) if capability else None})
    return gpus


def _training_device(gpus: list[dict[str, Any]]) -> str:
    """The device that trains, as the run log and the train manifest name it."""
    if gpus:
        first = gpus[0]
        more = f" (and {len(gpus) - 1} more)" if len(gpus) > 1 else ""
        return f"GPU {first['name']}{more}"
    return f"CPU {cpu_name(cpu())}, {cpu()['cores']} cores"


def precision_decision(name: str, gpus: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`train.precision` resolved for this machine (the GPUs TensorFlow sees, or a given list), with the reason,
    the device that trains and the CPU (model, cores, ISA features), as the train manifest and model card record."""
    gpus = _tensorflow_gpus() if gpus is None else gpus
    if name != "auto":
        resolved, reason = name, "set explicitly"
    elif gpus:
        resolved, reason = gpu_precision(gpus[0]["name"], gpus[0]["capability"])
    else:
        resolved, reason = cpu_precision()
    return {"requested": name, "resolved": resolved, "reason": reason, "device": _training_device(gpus), "cpu": cpu()}


def resolve_precision(name: str, gpus: list[dict[str, Any]] | None = None) -> str:
    """`train.precision` with `auto` decided for this machine: on a GPU what its tensor cores do well
    (`hardware.gpu_precision`), on a CPU mixed_bfloat16 with AMX or AVX-512 BF16, float32 elsewhere."""
    return precision_decision(name, gpus)["resolved"]


@contextlib.contextmanager
def precision_policy(name: str) -> Iterator[None]:
    """Set Keras's global dtype policy for the block, restoring the previous one after."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
