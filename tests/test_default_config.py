"""configs/default.py documents every choice its registry accepts, and nothing else.

Every key with a fixed set of values has a comment listing them (``# a | b | c``, on its line
or on the comment lines just above it); the list must equal the registry that validation reads
(`config_validation.choices`), so the documentation cannot drift from the code.
"""

import pathlib
import re

import pytest

from pdcnno_jax import config_validation

_DEFAULT = pathlib.Path(__file__).resolve().parent.parent / 'configs' / 'default.py'
_CHOICE_LIST = re.compile(r'([\w/.-]+(?:\s*\|\s*[\w/.-]+)+)')


def documented_choices(source: str, key: str) -> set[str] | None:
  """The ``a | b | c`` list commented on ``config.<key> = ...`` or the comments just above."""
  lines = source.splitlines()
  pattern = re.compile(r'^\s*config\.' + re.escape(key) + r'\s*=')
  for i, line in enumerate(lines):
    if not pattern.match(line):
      continue
    comments = [line.split('#', 1)[1]] if '#' in line else []
    j = i - 1
    while j >= 0 and lines[j].strip().startswith('#'):
      comments.insert(0, lines[j].strip()[1:])
      j -= 1
    text = ' '.join(c.strip() for c in comments)
    match = _CHOICE_LIST.search(text)
    return {v.strip() for v in match.group(1).split('|')} if match else None
  return None


@pytest.mark.parametrize('key', sorted(config_validation.choices()))
def test_default_config_comment_lists_the_registry(key):
  documented = documented_choices(_DEFAULT.read_text(), key)
  assert documented == set(config_validation.choices()[key]), (
      f'configs/default.py: the comment of config.{key} must list exactly the registered '
      f'choices {sorted(config_validation.choices()[key])}; it lists {documented}.')


def test_parser_reads_line_and_block_comments():
  source = ("  # a | b |\n  # c\n  config.x.y = 'a'\n"
            "  config.x.z = 1  # p | q\n  config.x.w = 2  # no list here\n")
  assert documented_choices(source, 'x.y') == {'a', 'b', 'c'}
  assert documented_choices(source, 'x.z') == {'p', 'q'}
  assert documented_choices(source, 'x.w') is None
