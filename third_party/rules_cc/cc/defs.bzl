"""Starlark entry points for the native C++ rules, as upstream rules_cc has.

Upstream rules_cc (the commit Bazel 4 pins) defines each public rule as a thin
macro that forwards to the rule built into Bazel, adding a migration tag. This
file does the same with nothing downloaded, which is all that
@bazel_tools//tools/cpp and @local_config_cc need from it.
"""

_MIGRATION_TAG = "__CC_RULES_MIGRATION_DO_NOT_USE_WILL_BREAK__"

def _add_tags(attrs):
    """Returns `attrs` with the rules_cc migration tag added to its tags."""
    if "tags" in attrs and attrs["tags"] != None:
        attrs["tags"] = attrs["tags"] + [_MIGRATION_TAG]
    else:
        attrs["tags"] = [_MIGRATION_TAG]
    return attrs

def cc_binary(**attrs):
    """Forwards to the native cc_binary rule."""
    native.cc_binary(**_add_tags(attrs))

def cc_import(**attrs):
    """Forwards to the native cc_import rule."""
    native.cc_import(**_add_tags(attrs))

def cc_library(**attrs):
    """Forwards to the native cc_library rule."""
    native.cc_library(**_add_tags(attrs))

def cc_proto_library(**attrs):
    """Forwards to the native cc_proto_library rule."""
    native.cc_proto_library(**_add_tags(attrs))

def cc_test(**attrs):
    """Forwards to the native cc_test rule."""
    native.cc_test(**_add_tags(attrs))

def cc_toolchain(**attrs):
    """Forwards to the native cc_toolchain rule."""
    native.cc_toolchain(**_add_tags(attrs))

def cc_toolchain_suite(**attrs):
    """Forwards to the native cc_toolchain_suite rule."""
    native.cc_toolchain_suite(**_add_tags(attrs))

def fdo_prefetch_hints(**attrs):
    """Forwards to the native fdo_prefetch_hints rule."""
    native.fdo_prefetch_hints(**_add_tags(attrs))

def fdo_profile(**attrs):
    """Forwards to the native fdo_profile rule."""
    native.fdo_profile(**_add_tags(attrs))

def objc_import(**attrs):
    """Forwards to the native objc_import rule."""
    native.objc_import(**_add_tags(attrs))

def objc_library(**attrs):
    """Forwards to the native objc_library rule."""
    native.objc_library(**_add_tags(attrs))
