"""Attacks trustgrad runs against itself: gradient leakage (:mod:`trustgrad.attacks.leakage`), and later poisoning
workers and Proof-of-Learning spoofs, each in its own subpackage. Importing this package imports nothing heavy."""
