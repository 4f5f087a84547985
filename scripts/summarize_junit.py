"""Prints one 'N passed, N failed, N skipped' line from the JUnit XML files under a folder.

Bazel keeps each test target's pytest JUnit report in bazel-testlogs/<target>/test.xml;
this adds them up so the suite ends with a single count, as a plain pytest run would. Only
targets whose test file still exists count (tests/<target>.py): Bazel's output base outlives a
checkout, so a new clone at the path of an old one finds the reports of test files removed
since, which would inflate the count (a clone at a reused path reported 46 files and 979 tests
where 42 files and 958 tests ran).

  python scripts/summarize_junit.py bazel-testlogs/tests [tests]
"""

import pathlib
import sys
import xml.etree.ElementTree as ET


def main(root: str, sources: str = 'tests') -> int:
  passed = failed = skipped = files = stale = 0
  for path in sorted(pathlib.Path(root).rglob('test.xml')):
    target = path.parent.relative_to(root)
    if not (pathlib.Path(sources) / target).with_suffix('.py').exists():
      stale += 1  # A report of a test file that is gone.
      continue
    files += 1
    for case in ET.parse(path).getroot().iter('testcase'):
      if case.find('failure') is not None or case.find('error') is not None:
        failed += 1
      elif case.find('skipped') is not None:
        skipped += 1
      else:
        passed += 1
  print(f'Test files: {files}' + (f' ({stale} stale reports of removed files left out)'
                                   if stale else ''))
  print(f'{passed} passed, {failed} failed, {skipped} skipped')
  return 0


if __name__ == '__main__':
  sys.exit(main(*(sys.argv[1:3] or ['bazel-testlogs/tests'])))
