"""Starlark entry points for the native Java rules, as upstream rules_java has.

Upstream rules_java (the commit Bazel 4 pins) defines each public rule as a
thin macro that forwards to the rule built into Bazel, adding a migration tag.
This file does the same with nothing downloaded, which is all that
@bazel_tools//tools/jdk needs from it.
"""

_MIGRATION_TAG = "__JAVA_RULES_MIGRATION_DO_NOT_USE_WILL_BREAK__"

def _add_tags(attrs):
    """Returns `attrs` with the rules_java migration tag added to its tags."""
    if "tags" in attrs and attrs["tags"] != None:
        attrs["tags"] = attrs["tags"] + [_MIGRATION_TAG]
    else:
        attrs["tags"] = [_MIGRATION_TAG]
    return attrs

def java_binary(**attrs):
    """Forwards to the native java_binary rule."""
    native.java_binary(**_add_tags(attrs))

def java_import(**attrs):
    """Forwards to the native java_import rule."""
    native.java_import(**_add_tags(attrs))

def java_library(**attrs):
    """Forwards to the native java_library rule."""
    native.java_library(**_add_tags(attrs))

def java_lite_proto_library(**attrs):
    """Forwards to the native java_lite_proto_library rule."""
    native.java_lite_proto_library(**_add_tags(attrs))

def java_package_configuration(**attrs):
    """Forwards to the native java_package_configuration rule."""
    native.java_package_configuration(**_add_tags(attrs))

def java_plugin(**attrs):
    """Forwards to the native java_plugin rule."""
    native.java_plugin(**_add_tags(attrs))

def java_proto_library(**attrs):
    """Forwards to the native java_proto_library rule."""
    native.java_proto_library(**_add_tags(attrs))

def java_runtime(**attrs):
    """Forwards to the native java_runtime rule."""
    native.java_runtime(**_add_tags(attrs))

def java_test(**attrs):
    """Forwards to the native java_test rule."""
    native.java_test(**_add_tags(attrs))

def java_toolchain(**attrs):
    """Forwards to the native java_toolchain rule."""
    native.java_toolchain(**_add_tags(attrs))
