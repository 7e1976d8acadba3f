"""Tests of demhx-export (a package, so that module names cannot clash with the runtime's tests)."""
