"""Starlark entry points for the native Python rules, as rules_python 0.x has.

For Bazel 4, upstream rules_python's python/defs.bzl defines each public rule
as a thin macro that forwards to the rule built into Bazel, adding a migration
tag, and re-exports py_runtime_pair from @bazel_tools. This file does the same
with nothing downloaded.
"""

load("@bazel_tools//tools/python:toolchain.bzl", _py_runtime_pair = "py_runtime_pair")

_MIGRATION_TAG = "__PYTHON_RULES_MIGRATION_DO_NOT_USE_WILL_BREAK__"

def _add_tags(attrs):
    """Returns `attrs` with the rules_python migration tag added to its tags."""
    if "tags" in attrs and attrs["tags"] != None:
        attrs["tags"] = attrs["tags"] + [_MIGRATION_TAG]
    else:
        attrs["tags"] = [_MIGRATION_TAG]
    return attrs

def py_binary(**attrs):
    """Forwards to the native py_binary rule."""
    native.py_binary(**_add_tags(attrs))

def py_library(**attrs):
    """Forwards to the native py_library rule."""
    native.py_library(**_add_tags(attrs))

def py_runtime(**attrs):
    """Forwards to the native py_runtime rule."""
    native.py_runtime(**_add_tags(attrs))

def py_test(**attrs):
    """Forwards to the native py_test rule."""
    native.py_test(**_add_tags(attrs))

py_runtime_pair = _py_runtime_pair
