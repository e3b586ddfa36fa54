"""Helpers shared by the test files, and the task modules the tests' child processes import by name."""
