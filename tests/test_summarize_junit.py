"""scripts/summarize_junit.py: the suite's one count, without reports of removed test files."""

import importlib.util
import os

_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts',
                       'summarize_junit.py')


def _load():
  spec = importlib.util.spec_from_file_location('summarize_junit', _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _report(root, target, cases):
  os.makedirs(root / target)
  (root / target / 'test.xml').write_text(
      '<testsuites><testsuite>' + ''.join(
          f'<testcase name="t{i}">{body}</testcase>' for i, body in enumerate(cases))
      + '</testsuite></testsuites>')


def test_counts_current_files_only(tmp_path, capsys):
  logs, sources = tmp_path / 'testlogs', tmp_path / 'tests'
  os.makedirs(sources / 'sub')
  for name in ('test_a.py', 'sub/test_b.py'):
    (sources / name).write_text('')
  _report(logs, 'test_a', ['', '<failure/>', '<skipped/>'])
  _report(logs, 'sub/test_b', ['', '<error/>'])
  _report(logs, 'test_removed', ['', '', ''])  # Left by an earlier checkout at this path.
  assert _load().main(str(logs), str(sources)) == 0
  out = capsys.readouterr().out.splitlines()
  assert out == ['Test files: 2 (1 stale reports of removed files left out)',
                 '2 passed, 2 failed, 1 skipped']
