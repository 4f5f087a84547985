"""Pytrees of arrays to bytes and back, without pickle, with a checksum.

Payload layout (little-endian):

  b'PDSSP2'                magic and format version
  uint32                   length H of the header
  uint32                   CRC-32 of the H header bytes followed by the body
  H bytes                  JSON header: {"compression": "none" | "zlib", "size": S,
                           "leaves": [{"path", "dtype", "shape", "offset",
                           "nbytes"}, ...]}
  body                     the leaves' raw C-order buffers, concatenated (S bytes),
                           zlib-compressed as one stream if "compression" is "zlib"

Leaves are named by their key path (`jax.tree_util.keystr`), so decoding does
not need the sender's treedef: `decode(payload, like=tree)` matches leaves by
path and rebuilds `tree`'s structure; without `like` it returns a flat
{path: array} dict. Decoded arrays are read-only views of the payload when it
is not compressed (no copy).

Decoding trusts nothing: the CRC is checked before the header is parsed, every
header field is validated, and a compressed body is inflated to at most its
declared size. Any malformed payload raises `PayloadError`, and nothing else.

Float32 deltas have high-entropy mantissas, so zlib level 1 saves only ~7% at
a far higher CPU cost: raw float32 ('none') is the default; 'zlib' remains for
slow networks and `cast_floats_to='bfloat16'` halves the bytes, lossily.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any
import zlib

import jax
import ml_dtypes
import numpy as np

MAGIC = b'PDSSP2'
COMPRESSIONS = ('none', 'zlib')
# Header length and CRC-32 (of header + body), right after MAGIC.
PREFIX = struct.Struct('<II')
_ML_DTYPES = frozenset(
    name for name in dir(ml_dtypes)
    if isinstance(getattr(ml_dtypes, name), type)
    and issubclass(getattr(ml_dtypes, name), np.generic))
_MAX_INFLATION = 1032  # zlib's largest possible compression ratio.


class PayloadError(ValueError):
  """A payload is malformed, corrupted or does not match the expected structure."""


def _dtype_from_name(name: Any) -> np.dtype:
  """The numeric dtype called ``name`` (a numpy name or an ml_dtypes type)."""
  if isinstance(name, str) and name in _ML_DTYPES:
    return np.dtype(getattr(ml_dtypes, name))
  try:
    dtype = np.dtype(name) if isinstance(name, str) else None
  except Exception:  # pylint: disable=broad-except  # np.dtype parses many odd strings.
    dtype = None
  if dtype is None or dtype.kind not in 'biufc' or dtype.name != name:
    raise PayloadError(f'Unknown or non-numeric dtype {name!r} in payload header.')
  return dtype


def _flatten(tree: Any) -> list[tuple[str, np.ndarray]]:
  leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for path, leaf in leaves_with_path:
    out.append((jax.tree_util.keystr(path), np.asarray(leaf)))
  paths = [p for p, _ in out]
  if len(set(paths)) != len(paths):
    raise ValueError('Pytree has duplicate key paths; cannot serialise it.')
  return out


def encode(tree: Any,
           *,
           compression: str = 'none',
           level: int = 1,
           cast_floats_to: str | None = None) -> bytes:
  """Serialises a pytree of arrays (numpy, jax or scalars) to bytes.

  Args:
    tree: pytree whose leaves are array-likes. jax arrays are copied to host.
    compression: 'none' (default) or 'zlib'.
    level: zlib level (1 fastest .. 9 smallest).
    cast_floats_to: optional dtype name (e.g. 'bfloat16', 'float16') that
      floating-point leaves are cast to before encoding. Lossy.

  Returns:
    The payload.

  Raises:
    ValueError: on an unknown compression or a tree with duplicate paths.
  """
  if compression not in COMPRESSIONS:
    raise ValueError(
        f'compression must be one of {COMPRESSIONS}, got {compression!r}.')
  cast = None if cast_floats_to is None else _dtype_from_name(cast_floats_to)
  leaves = []
  buffers = []
  offset = 0
  for path, array in _flatten(tree):
    if cast is not None and np.issubdtype(array.dtype, np.floating):
      array = array.astype(cast)
    array = np.require(array, requirements='C')  # Keeps 0-d arrays 0-d.
    if array.dtype.hasobject:
      raise ValueError(f'Leaf {path} has object dtype; only numeric arrays '
                       'can be serialised.')
    leaves.append({'path': path, 'dtype': array.dtype.name,
                   'shape': list(array.shape), 'offset': offset,
                   'nbytes': array.nbytes})
    buffers.append(array.reshape(-1).view(np.uint8))
    offset += array.nbytes
  if compression == 'zlib':
    buffers = [zlib.compress(b''.join(buffers), level)]
  header = json.dumps({'compression': compression, 'size': offset,
                       'leaves': leaves}, separators=(',', ':')).encode()
  crc = zlib.crc32(header)
  for buffer in buffers:
    crc = zlib.crc32(buffer, crc)
  # One copy of the leaves' bytes, straight into the payload.
  return b''.join([MAGIC, PREFIX.pack(len(header), crc), header, *buffers])


def _field(record: dict[str, Any], key: str, kind: type, where: str) -> Any:
  value = record.get(key) if isinstance(record, dict) else None
  if not isinstance(value, kind) or isinstance(value, bool):
    raise PayloadError(f'Payload header: {where} needs {key!r} of type {kind.__name__}, '
                       f'got {value!r:.80}.')
  return value


def _parse_header(raw: memoryview) -> tuple[str, int, list[tuple[str, np.dtype, tuple, int]]]:
  """Validated ``(compression, size, [(path, dtype, shape, offset)])`` of a header."""
  try:
    header = json.loads(bytes(raw))
  except (ValueError, RecursionError) as e:
    raise PayloadError(f'Corrupt payload header: {e}') from None
  compression = _field(header, 'compression', str, 'the header')
  if compression not in COMPRESSIONS:
    raise PayloadError(f'Unknown compression {compression!r} in payload header.')
  size = _field(header, 'size', int, 'the header')
  leaves, offset, seen = [], 0, set()
  for i, leaf in enumerate(_field(header, 'leaves', list, 'the header')):
    where = f'leaf {i}'
    path = _field(leaf, 'path', str, where)
    dtype = _dtype_from_name(_field(leaf, 'dtype', str, where))
    shape = _field(leaf, 'shape', list, where)
    if (len(shape) > 32 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d
                                   < 2**62 for d in shape)):
      raise PayloadError(f'Payload header: leaf {path} has an invalid shape {shape!r:.80}.')
    nbytes = _field(leaf, 'nbytes', int, where)
    if _field(leaf, 'offset', int, where) != offset or nbytes != math.prod(
        shape) * dtype.itemsize:
      raise PayloadError(f'Payload header: leaf {path} has an inconsistent offset or size.')
    if path in seen:
      raise PayloadError(f'Payload header: duplicate leaf path {path}.')
    seen.add(path)
    leaves.append((path, dtype, tuple(shape), offset))
    offset += nbytes
  if size != offset:
    raise PayloadError(f'Payload header: size {size} differs from its leaves\' {offset} bytes.')
  return compression, size, leaves


def _inflate(body: memoryview, size: int) -> memoryview:
  """Decompresses ``body`` to at most ``size`` bytes (a bomb stops at the bound)."""
  if size > _MAX_INFLATION * len(body) + 64:
    raise PayloadError(f'Payload header declares {size} bytes, more than {len(body)} '
                       'compressed bytes can hold.')
  inflater = zlib.decompressobj()
  try:
    out = inflater.decompress(body, max(size, 1))  # max_length=0 would mean unbounded.
    complete = inflater.eof and not inflater.unconsumed_tail and not inflater.unused_data
  except zlib.error as e:
    raise PayloadError(f'Corrupt compressed payload body: {e}') from None
  if not complete or len(out) != size:
    raise PayloadError(f'Compressed payload body does not inflate to the declared {size} '
                       'bytes.')
  return memoryview(out)


def decode_flat(payload: bytes) -> dict[str, np.ndarray]:
  """Decodes a payload to a {key path: array} dict (in encoding order).

  Raises:
    PayloadError: if the payload is malformed or corrupted (bad magic, length,
      checksum, header or body).
  """
  try:
    view = memoryview(payload)
  except TypeError:
    raise PayloadError(f'A payload is bytes, got {type(payload).__name__}.') from None
  if bytes(view[:len(MAGIC)]) != MAGIC:
    raise PayloadError(
        'Not an SSP payload (bad magic); was it written by '
        'pdcnno_jax.parallel.ssp.serialization.encode of this version?')
  start = len(MAGIC) + PREFIX.size
  if len(view) < start:
    raise PayloadError('Truncated payload (no header length and checksum).')
  header_len, crc = PREFIX.unpack(view[len(MAGIC):start])
  if len(view) < start + header_len:
    raise PayloadError(f'Truncated payload: {len(view)} bytes, the header alone needs '
                       f'{start + header_len}.')
  if zlib.crc32(view[start:]) != crc:
    raise PayloadError('Payload checksum mismatch: the bytes were corrupted or truncated.')
  compression, size, leaves = _parse_header(view[start:start + header_len])
  body = view[start + header_len:]
  if compression == 'zlib':
    body = _inflate(body, size)
  if len(body) != size:
    raise PayloadError(f'Payload body has {len(body)} bytes, header says {size}.')
  out = {}
  for path, dtype, shape, offset in leaves:
    chunk = body[offset:offset + math.prod(shape) * dtype.itemsize]
    try:
      out[path] = np.frombuffer(chunk, dtype=dtype).reshape(shape)
    except ValueError as e:  # E.g. a shape numpy cannot represent.
      raise PayloadError(f'Payload leaf {path}: {e}') from None
  return out


def decode(payload: bytes, like: Any = None) -> Any:
  """Decodes a payload, optionally into the structure of `like`.

  Args:
    payload: bytes from `encode`.
    like: a pytree with the same key paths as the encoded one (e.g. the
      params); its leaves are only used for their paths, not their values.

  Returns:
    A pytree shaped like `like`, or a {key path: array} dict if `like` is None.

  Raises:
    PayloadError: if the payload is malformed or its paths differ from
      `like`'s.
  """
  flat = decode_flat(payload)
  if like is None:
    return flat
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
  paths = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
  if set(paths) != set(flat):
    missing = sorted(set(paths) - set(flat))[:5]
    extra = sorted(set(flat) - set(paths))[:5]
    raise PayloadError(
        'Payload does not match the expected tree: missing paths '
        f'{missing}, unexpected paths {extra}.')
  return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in paths])


def payload_nbytes(tree: Any) -> int:
  """Returns the raw size of the arrays of `tree` in bytes (no header)."""
  return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))
