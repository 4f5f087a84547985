#!/bin/bash
# Stands in for Bazel's LCOV merger, which this offline workspace lacks.
echo "ERROR: 'bazel coverage' needs Bazel's coverage tools, which are" \
  "downloaded from mirror.bazel.build and not part of this offline" \
  "workspace. Measure Python coverage with pytest-cov instead:" \
  "pytest --cov=pdcnno_jax tests/" >&2
exit 1
