"""Prints one 'N passed, N failed, N skipped' line from the JUnit XML files under a folder.

Bazel keeps each test target's pytest JUnit report in bazel-testlogs/<target>/test.xml;
this adds them up so the suite ends with a single count, as a plain pytest run would.

  python scripts/summarize_junit.py bazel-testlogs/tests
"""

import pathlib
import sys
import xml.etree.ElementTree as ET


def main(root: str) -> int:
  passed = failed = skipped = files = 0
  for path in sorted(pathlib.Path(root).rglob('test.xml')):
    files += 1
    for case in ET.parse(path).getroot().iter('testcase'):
      if case.find('failure') is not None or case.find('error') is not None:
        failed += 1
      elif case.find('skipped') is not None:
        skipped += 1
      else:
        passed += 1
  print(f'Test files: {files}')
  print(f'{passed} passed, {failed} failed, {skipped} skipped')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else 'bazel-testlogs/tests'))
