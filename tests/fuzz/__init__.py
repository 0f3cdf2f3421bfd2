"""trustgrad's fuzz suite: ``make fuzz`` for depth, a seeded subset in ``make test`` (tests/fuzz/test_fuzz.py)."""
