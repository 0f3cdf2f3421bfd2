"""Gates: what a receiver admits (``protect.slots.Gate``): claims in, a ``Verdict`` out, the server's state untouched.

``audit`` (replay in the server's process, exact repair), ``cipher_audit`` (a separate auditor rank decrypts and
replays each claim), ``blind`` (checks on ciphertexts, verdicts decrypted jointly), ``robust`` (``--aggregate``
rules). ``protect.catalog`` registers them with what each needs of a pattern.
"""
