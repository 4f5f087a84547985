"""Pickle-free pytree payloads of the SSP engine."""

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
  import jax  # pylint: disable=g-import-not-at-top
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
  with pytest.raises(serialization.PayloadError, match='bytes, header says'):
    serialization.decode(payload[:-3])
  with pytest.raises(ValueError, match='compression must be one of'):
    serialization.encode({'a': 1}, compression='lz4')
