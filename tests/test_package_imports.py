"""Every module of pdcnno_jax imports cleanly and documents itself.

A module that fails to import (a missing dependency, a circular import, a
syntax error in a rarely used file) is caught here even if no other test
touches it; a missing module docstring breaks the project's style rules.
"""

import importlib
import pkgutil

import pytest

import pdcnno_jax


def _module_names() -> list[str]:
  """Returns the dotted names of pdcnno_jax and all its submodules."""
  names = ['pdcnno_jax']
  for info in pkgutil.walk_packages(pdcnno_jax.__path__, 'pdcnno_jax.'):
    names.append(info.name)
  return sorted(names)


_MODULES = _module_names()


def test_walk_finds_the_subpackages():
  # Guards the walk itself: if it found nothing, the tests below would pass
  # vacuously.
  assert {'pdcnno_jax.models', 'pdcnno_jax.data', 'pdcnno_jax.train'} <= set(
      _MODULES)


@pytest.mark.parametrize('name', _MODULES)
def test_module_imports_and_has_docstring(name):
  module = importlib.import_module(name)
  doc = (module.__doc__ or '').strip()
  assert doc, f'{name} ({module.__file__}) has no module docstring.'
