"""The tests' shared helpers (tests/ is on pytest's pythonpath): ``from helpers import tiny``,
``from helpers.calls import max_diff``. Fixtures live in tests/conftest.py."""
