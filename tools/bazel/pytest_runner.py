"""Runs one pytest file as a Bazel test; the `main` of every `pytest_test`.

Bazel calls it as `pytest_runner.py <test file> [pytest args...]` with the
working directory at the workspace root inside the test's runfiles tree. It maps
Bazel's test environment (https://bazel.build/reference/test-encyclopedia) onto
pytest:

* `XML_OUTPUT_FILE` -> `--junitxml`, so Bazel records each test case;
* `TESTBRIDGE_TEST_ONLY` (`bazel test --test_filter=EXPR`) -> `-k EXPR`;
* `TEST_TMPDIR` -> `HOME`, `TMPDIR` and pytest's `--basetemp`, so temporary
  files and caches written under `~` stay in the directory Bazel gives the
  test (as the test encyclopedia recommends) instead of the sandbox's
  read-only view of the real home.

The pytest cache is disabled: the runfiles tree is not a place to write to.
Device setup (8 fake CPU devices) is left to tests/conftest.py, which pytest
loads here exactly as it does outside Bazel.
"""

import os
import sys

import pytest


def pytest_args(argv: list[str], environ: dict[str, str]) -> list[str]:
  """Returns pytest's command line for this Bazel test invocation.

  Args:
    argv: the runner's arguments without the program name: the test file's
      path relative to the workspace root, then extra pytest arguments.
    environ: the test's environment variables.

  Returns:
    The arguments for `pytest.main`.

  Raises:
    ValueError: `argv` is empty or its first entry is not an existing file.
  """
  if not argv or not os.path.isfile(argv[0]):
    raise ValueError(
        f'Expected the path of a test file as first argument, got {argv!r}; '
        'declare tests with pytest_test() from //tools/bazel:pytest.bzl.')
  args = [argv[0], '-p', 'no:cacheprovider', *argv[1:]]
  if 'XML_OUTPUT_FILE' in environ:
    args.append('--junitxml=' + environ['XML_OUTPUT_FILE'])
  if environ.get('TESTBRIDGE_TEST_ONLY'):
    args += ['-k', environ['TESTBRIDGE_TEST_ONLY']]
  if 'TEST_TMPDIR' in environ:
    args.append('--basetemp=' + os.path.join(environ['TEST_TMPDIR'], 'pytest'))
  return args


def main() -> int:
  """Runs the test file given on the command line; returns pytest's status."""
  if 'TEST_TMPDIR' in os.environ:
    os.environ['HOME'] = os.environ['TMPDIR'] = os.environ['TEST_TMPDIR']
  # pytest exits with 5 when it collects no test: a failure here too, since a
  # test target without tests is a mistake.
  return int(pytest.main(pytest_args(sys.argv[1:], dict(os.environ))))


if __name__ == '__main__':
  sys.exit(main())
