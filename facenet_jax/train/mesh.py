"""The device mesh, and moving values between the host and the devices.

Data parallel over every device of every process: the state is replicated
and the batch sharded along a 1-D mesh axis "data" (`jax.make_mesh` +
`NamedSharding`), so BatchNorm statistics are computed over the global batch
without any `axis_name`. Multi-host: each process feeds whole P x K identity
groups through `jax.make_array_from_process_local_data`.
"""

import dataclasses
from typing import Any, Mapping, Optional

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Sharding:
  """A 1-D data-parallel mesh over all devices of all processes."""
  mesh: jax.sharding.Mesh

  @classmethod
  def create(cls, devices: Optional[list] = None) -> "Sharding":
    """A mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    # Auto axes: the compiler propagates the batch sharding through the model
    # (Explicit axes would demand sharding annotations on every batch-mixing op,
    # e.g. the triplet loss distance matrix).
    return cls(jax.make_mesh((len(devices),), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,),
                             devices=devices))

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  @property
  def data(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh,
                                      jax.sharding.PartitionSpec("data"))

  def global_batch(self, local: Mapping[str, np.ndarray]) -> dict:
    """Assembles each process's share into global arrays sharded on 'data'."""
    return {k: jax.make_array_from_process_local_data(self.data, v)
            for k, v in local.items() if v.dtype.kind in "fiub"}


def to_host(tree: Any) -> Any:
  """Fetches replicated arrays to NumPy, also when they span several hosts.

  `jax.device_get` refuses arrays with devices on other processes; a
  replicated array's local shard already holds the whole value.
  """
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError("to_host needs replicated arrays on multiple hosts")
      return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)


def put_replicated(tree: Any,
                   sharding: jax.sharding.NamedSharding) -> Any:
  """Host values (identical on every process) -> replicated global arrays."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def with_sharding(abstract: Any, shardings: Any) -> Any:
  """Abstract arrays (jax.eval_shape) with the given shardings: a restore target."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


def describe_devices() -> str:
  """E.g. "8 x TPU v4 on 2 hosts", for the console."""
  devices = jax.devices()
  hosts = f" on {jax.process_count()} hosts" if jax.process_count() > 1 else ""
  return f"{len(devices)} x {devices[0].device_kind}{hosts}"
