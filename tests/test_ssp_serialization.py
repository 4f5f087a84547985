"""Pickle-free pytree payloads of the SSP engine."""

import json
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pdcnno_jax.parallel.ssp import serialization


def _tree():
  rng = np.random.default_rng(0)
  return {
      'conv': {'kernel': rng.normal(size=(5, 5, 1, 6)).astype(np.float32),
               'bias': np.zeros(6, np.float32)},
      'dense': [rng.normal(size=(3, 2)).astype(np.float64),
                (np.arange(4, dtype=np.int32), np.float32(2.5))],
      'mask': np.array([True, False, True]),
      'half': np.ones((2, 2), ml_dtypes.bfloat16),
      'empty': np.zeros((0, 3), np.float32),
  }


@pytest.mark.parametrize('compression', ['none', 'zlib'])
def test_roundtrip_is_exact(compression):
  tree = _tree()
  payload = serialization.encode(tree, compression=compression)
  out = serialization.decode(payload, like=tree)
  for a, b in zip(jax_leaves(tree), jax_leaves(out)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_no_pickle_and_header_names_paths():
  payload = serialization.encode(_tree())
  assert payload.startswith(serialization.MAGIC)
  flat = serialization.decode_flat(payload)
  assert "['conv']['kernel']" in flat and "['dense'][1][0]" in flat
  assert b'\x80\x04' not in payload[:8]  # No pickle protocol header.


def test_jax_arrays_and_like_with_other_treedef_order():
  tree = {'b': jnp.arange(3.0), 'a': jnp.ones((2,), jnp.int32)}
  payload = serialization.encode(tree)
  like = {'a': 0, 'b': 0}
  out = serialization.decode(payload, like=like)
  np.testing.assert_array_equal(out['b'], [0.0, 1.0, 2.0])
  assert out['a'].dtype == np.int32


def test_raw_payload_is_zero_copy_and_size_is_raw_plus_header():
  x = np.arange(1000, dtype=np.float32)
  payload = serialization.encode({'x': x})
  assert len(payload) - x.nbytes < 200
  out = serialization.decode_flat(payload)["['x']"]
  assert not out.flags.writeable  # A view of the payload, no copy.


def test_cast_floats_is_lossy_but_keeps_ints():
  tree = {'w': np.float32([1.0, 1.0 + 2**-12]), 'i': np.int32([7])}
  out = serialization.decode(
      serialization.encode(tree, cast_floats_to='bfloat16'), like=tree)
  assert out['w'].dtype == ml_dtypes.bfloat16
  assert out['w'][0] == out['w'][1]
  assert out['i'].dtype == np.int32


def test_mismatched_tree_and_corrupt_payloads_raise():
  payload = serialization.encode({'a': np.ones(2)})
  with pytest.raises(serialization.PayloadError, match='missing paths'):
    serialization.decode(payload, like={'b': 0})
  with pytest.raises(serialization.PayloadError, match='bad magic'):
    serialization.decode(b'garbage' + payload)
  with pytest.raises(serialization.PayloadError, match='checksum mismatch'):
    serialization.decode(payload[:-3])
  with pytest.raises(ValueError, match='compression must be one of'):
    serialization.encode({'a': 1}, compression='lz4')


def _split(payload):
  """(header dict, body bytes) of a payload, by the layout in the module docstring."""
  start = len(serialization.MAGIC) + serialization.PREFIX.size
  header_len, _ = serialization.PREFIX.unpack(payload[len(serialization.MAGIC):start])
  return json.loads(payload[start:start + header_len]), payload[start + header_len:]


def _seal(header, body):
  """A payload with ``header`` and ``body`` and a correct checksum (a forged payload)."""
  raw = json.dumps(header).encode()
  crc = zlib.crc32(body, zlib.crc32(raw))
  return serialization.MAGIC + serialization.PREFIX.pack(len(raw), crc) + raw + body


def _decodes_to_original_or_payload_error(payload, original, like):
  try:
    flat = serialization.decode_flat(payload)
  except serialization.PayloadError:
    return 'error'
  assert list(flat) == list(original)
  for path, array in flat.items():
    assert array.dtype == original[path].dtype and array.shape == original[path].shape
    assert array.tobytes() == original[path].tobytes()
  serialization.decode(payload, like=like)
  return 'original'


def _header_edits(header, rng):
  """Structurally plausible edits of a valid header: wrong types, sizes, dtypes, keys."""
  junk = [None, True, -1, 0, 2**40, 2**70, 1.5, 'x', [], {}, [-1], [2**62, 2**62], [[1]],
          'object', 'float128', 'V8', 'U4', '<f4', 'i4,f4', '__class__', 'zlib', 'none']
  while True:
    edited = json.loads(json.dumps(header))
    leaf = edited['leaves'][rng.integers(len(edited['leaves']))]
    target = edited if rng.random() < 0.3 else leaf
    key = list(target)[rng.integers(len(target))]
    choice = rng.integers(4)
    if choice == 0:
      target[key] = junk[rng.integers(len(junk))]
    elif choice == 1:
      del target[key]
    elif choice == 2 and isinstance(target[key], int):
      target[key] += int(rng.choice([-1, 1, 4, -4, 1000]))
    else:
      edited['leaves'].append(json.loads(json.dumps(leaf)))
    yield edited


@pytest.mark.parametrize('compression', ['none', 'zlib'])
def test_fuzzed_payloads_decode_exactly_or_raise_payload_error(compression):
  tree = _tree()
  payload = serialization.encode(tree, compression=compression)
  original = serialization.decode_flat(payload)
  rng = np.random.default_rng(1234)
  outcomes = []
  for _ in range(1500):  # Bit flips anywhere.
    mutated = bytearray(payload)
    for pos in rng.integers(len(payload), size=rng.integers(1, 9)):
      mutated[pos] ^= 1 << int(rng.integers(8))
    if mutated == payload:  # Two flips of one bit cancel.
      mutated[0] ^= 1
    outcomes.append(_decodes_to_original_or_payload_error(bytes(mutated), original, tree))
  for cut in rng.integers(len(payload), size=500):  # Truncations and appended bytes.
    outcomes.append(_decodes_to_original_or_payload_error(payload[:cut], original, tree))
    outcomes.append(_decodes_to_original_or_payload_error(payload + b'\0' * int(cut % 7 + 1),
                                                          original, tree))
  # Every corruption is detected: only the unchanged payload decodes.
  assert outcomes.count('original') == 0 and len(outcomes) == 2500
  header, body = _split(payload)
  edits = _header_edits(header, rng)
  decoded = 0
  for _ in range(1000):  # Forged headers with a valid checksum exercise the validation.
    forged = _seal(next(edits), body)
    try:
      flat = serialization.decode(forged)
    except serialization.PayloadError:
      continue
    decoded += 1
    for array in flat.values():  # Whatever decodes is a well-formed array of the body.
      assert isinstance(array, np.ndarray) and array.nbytes <= len(body) * 1032
  assert decoded < 1000


def test_compression_bomb_is_bounded_by_the_declared_size():
  tree = {'x': np.zeros(16, np.float32)}
  header, _ = _split(serialization.encode(tree, compression='zlib'))
  bomb = zlib.compress(b'\0' * (64 << 20), 9)  # 64 MiB of zeros in ~64 KiB.
  with pytest.raises(serialization.PayloadError, match='does not inflate to the declared 64'):
    serialization.decode(_seal(header, bomb))
  header['size'] = header['leaves'][0]['nbytes'] = 1 << 40
  header['leaves'][0]['shape'] = [1 << 38]
  with pytest.raises(serialization.PayloadError, match='more than .* compressed bytes'):
    serialization.decode(_seal(header, bomb))


def test_non_bytes_and_forged_dtypes_raise_payload_error():
  with pytest.raises(serialization.PayloadError, match='is bytes'):
    serialization.decode_flat(None)
  header, body = _split(serialization.encode({'x': np.zeros(2, np.int64)}))
  for dtype in ('object', 'V16', '<i8', 'datetime64[s]', 'i8,i8'):
    header['leaves'][0]['dtype'] = dtype
    with pytest.raises(serialization.PayloadError, match='non-numeric dtype'):
      serialization.decode(_seal(header, body))
