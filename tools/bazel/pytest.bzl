"""Macros declaring one Bazel test per pytest file.

`pytest_test` runs a single test file under pytest through
//tools/bazel:pytest_runner.py; `pytest_suite` declares one `pytest_test` for
each file it is given (tests/BUILD passes `glob(["**/test_*.py"])`, so new test
files become targets without editing BUILD files) and a `test_suite` of them.
"""

load("@rules_python//python:defs.bzl", "py_test")

_RUNNER = "//tools/bazel:pytest_runner.py"

def pytest_test(name, src, deps = [], data = [], args = [], **kwargs):
    """Declares a py_test that runs the pytest file `src`.

    Args:
      name: the target's name.
      src: the test file, a label in the calling package.
      deps: py_library targets the test imports.
      data: files the test reads at run time.
      args: extra pytest arguments.
      **kwargs: passed on to py_test (size, timeout, tags, ...).
    """
    py_test(
        name = name,
        srcs = [src, _RUNNER],
        main = _RUNNER,
        args = ["$(rootpath %s)" % src] + args,
        python_version = "PY3",
        srcs_version = "PY3",
        deps = deps,
        data = data,
        **kwargs
    )

def _is_exclusive(path, exclusive_prefixes, exclusive_substrings):
    filename = path.rsplit("/", 1)[-1]
    for prefix in exclusive_prefixes:
        if filename.startswith(prefix):
            return True
    for substring in exclusive_substrings:
        if substring in filename:
            return True
    return False

def pytest_suite(
        name,
        srcs,
        deps = [],
        data = [],
        size = "medium",
        exclusive_size = "large",
        sizes = {},
        exclusive_prefixes = [],
        exclusive_substrings = [],
        tags = []):
    """Declares one pytest_test per file in `srcs` and a test_suite `name`.

    Each target is named after its path without ".py" (test_foo.py ->
    :test_foo, sub/test_bar.py -> :sub/test_bar). Files whose name matches
    `exclusive_prefixes` or `exclusive_substrings` (tests that start several
    processes or bind ports) are tagged "exclusive": Bazel runs them one at a
    time with no other test alongside, with the longer timeout of
    `exclusive_size`.

    Args:
      name: name of the test_suite holding every generated test.
      srcs: the test files, e.g. glob(["**/test_*.py"]).
      deps: py_library targets every test imports.
      data: files every test reads at run time.
      size: Bazel test size of each test (sets its timeout and resources).
      exclusive_size: Bazel test size of the exclusive tests.
      sizes: per-file overrides of `size`, {"test_foo.py": "large"}.
      exclusive_prefixes: prefixes of the file names (without directory) of
        tests to run exclusively.
      exclusive_substrings: substrings of the file names of tests to run
        exclusively.
      tags: tags added to every test.
    """
    for filename in sizes:
        if filename not in srcs:
            fail("pytest_suite: `sizes` names %s, which is not in srcs" % filename)
    tests = []
    for src in srcs:
        test_name = src[:-len(".py")] if src.endswith(".py") else src
        test_tags = list(tags)
        test_size = size
        if _is_exclusive(src, exclusive_prefixes, exclusive_substrings):
            test_tags.append("exclusive")
            test_size = exclusive_size
        pytest_test(
            name = test_name,
            src = src,
            deps = deps,
            data = data,
            size = sizes.get(src, test_size),
            tags = test_tags,
        )
        tests.append(":" + test_name)
    native.test_suite(name = name, tests = tests)
