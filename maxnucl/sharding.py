"""Meshes, logical axis rules and sharding of params and activations (MaxText style).

Every parameter declares logical axis names next to its shape (`"embed"`, `"mlp"`, ...) and
activations are constrained with `"activation_*"` names.  Rules (from gin) map logical names to
the mesh axes `data`, `fsdp` and `tensor`; the mesh shape comes from gin too, with one axis
allowed to be -1 (auto-sized to the devices left over).

A rule whose mesh axes do not divide a dimension falls back to replicating that dimension
(e.g. the single K/V head of multi-query attention on a tensor-parallel mesh), so one rule set
serves every model size.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator, Optional, Sequence

import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("norm", None),
)


@gin.configurable
def logical_axis_rules(rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Rules:
  """The logical-to-mesh rules in force (bind `logical_axis_rules.rules` in gin to change)."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"logical axis rule {rule!r}: expected a pair (logical_name, mesh_axes)")
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"logical axis rule for {name!r} names mesh axis {axis!r}; "
                         f"mesh axes are {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


@gin.configurable
def create_mesh(shape: Sequence[int] = (-1, 1, 1),
                axis_names: Sequence[str] = MESH_AXES,
                devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A device mesh over the given (default: all) devices; one entry of `shape` may be -1.

  A shape without -1 that needs fewer devices than given uses the first ones.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {shape} has {len(shape)} entries but axis_names "
                     f"{tuple(axis_names)} has {len(axis_names)}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1 (auto-sized)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape}: {len(devices)} devices are not divisible by {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) > len(devices):
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, "
                     f"but {len(devices)} are available")
  # A fully specified smaller mesh (e.g. single_device.gin on a multi-GPU host) uses the first
  # devices.
  devices = devices[:math.prod(shape)]
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # non-physical topologies (e.g. a subset of simulated CPU devices)
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, tuple(axis_names))


def parse_mesh_shape(value: Any, flag: str = "--mesh_shape") -> tuple[int, ...]:
  """A mesh shape given on a command line or in gin: "1,-1,1" or a sequence of three integers
  (data, fsdp, tensor); one may be -1 (the devices left over).  ValueError names `flag`."""
  text = value if isinstance(value, str) else ",".join(str(v) for v in value)
  try:
    shape = tuple(int(tok) for tok in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"{flag} {text!r}: expected three integers {','.join(MESH_AXES)}, e.g. "
                     f"1,-1,1 (fsdp over every device)")
  return shape


def mesh_for_flag(mesh_shape: Any, flag: str = "--mesh_shape") -> Optional[Mesh]:
  """The mesh a tool restores its model onto: None (one device) when no shape is given in a
  single process; several processes need one spanning them, (1, -1, 1) (fsdp over every device)
  unless given.  ValueError names `flag` for a malformed shape or one the devices cannot fill."""
  if mesh_shape is None:
    if jax.process_count() == 1:
      return None
    mesh_shape = (1, -1, 1)
  shape = parse_mesh_shape(mesh_shape, flag)
  try:
    return create_mesh(shape)
  except ValueError as e:
    raise ValueError(f"{flag} {','.join(map(str, shape))}: {e}") from None


def logical_to_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dims carry `logical_axes`.

  A mesh axis is used at most once per array, and only where it divides the dimension.
  """
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  rule_map = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    mapped = rule_map.get(name) if name is not None else None
    axes = mapped if isinstance(mapped, tuple) else ((mapped,) if mapped else ())
    chosen = []
    for axis in axes:
      size = mesh.shape[axis]
      if axis in used or size == 1:
        continue
      if dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
        chosen.append(axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


# ---- the sharding context that activation constraints read at trace time -------------------------

_CONTEXT = threading.local()


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Within this context, `constrain` places activations on `mesh` according to `rules`."""
  previous = getattr(_CONTEXT, "value", None)
  _CONTEXT.value = (mesh, tuple(rules))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _CONTEXT.value = previous


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `activate` (single device)."""
  context = getattr(_CONTEXT, "value", None)
  if context is None:
    return x
  mesh, rules = context
  spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def tree_shardings(logical_tree: Any, shape_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of arrays (or ShapeDtypeStructs) given their logical axes."""
  return jax.tree.map(
      lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)),
      logical_tree, shape_tree, is_leaf=lambda node: isinstance(node, tuple))
