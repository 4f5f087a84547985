"""Tests for pytest_runner: Bazel's test environment becomes pytest flags."""

import os
import tempfile
import unittest

import pytest_runner


class PytestArgsTest(unittest.TestCase):

  def setUp(self):
    super().setUp()
    handle, self.test_file = tempfile.mkstemp(suffix='_test.py')
    os.close(handle)
    self.addCleanup(os.remove, self.test_file)

  def test_plain_environment_runs_only_the_file(self):
    self.assertEqual(
        pytest_runner.pytest_args([self.test_file], {}),
        [self.test_file, '-p', 'no:cacheprovider'])

  def test_bazel_environment_maps_to_pytest_flags(self):
    args = pytest_runner.pytest_args(
        [self.test_file, '-x'],
        {'XML_OUTPUT_FILE': '/out/test.xml',
         'TESTBRIDGE_TEST_ONLY': 'shapes',
         'TEST_TMPDIR': '/tmp/t'})
    self.assertEqual(args[:4], [self.test_file, '-p', 'no:cacheprovider', '-x'])
    self.assertIn('--junitxml=/out/test.xml', args)
    self.assertEqual(args[args.index('-k') + 1], 'shapes')
    self.assertIn('--basetemp=/tmp/t/pytest', args)

  def test_empty_filter_is_ignored(self):
    args = pytest_runner.pytest_args([self.test_file],
                                     {'TESTBRIDGE_TEST_ONLY': ''})
    self.assertNotIn('-k', args)

  def test_missing_test_file_is_a_clear_error(self):
    with self.assertRaisesRegex(ValueError, 'path of a test file'):
      pytest_runner.pytest_args([], {})
    with self.assertRaisesRegex(ValueError, 'path of a test file'):
      pytest_runner.pytest_args(['no/such_test.py'], {})


if __name__ == '__main__':
  unittest.main()
