"""Helpers of the test suite (not tests): imported as ``support.<module>``; tests/ is on sys.path through
tests/conftest.py."""
