"""Codecs: what crosses the wire (``protect.slots.ServerCodec`` / ``WorkerCodec``; the ring's ``RingCodec``).

``plain`` (float32 bytes, the mean), ``ckks`` (CKKS shared or threshold keys: the server sums ciphertexts it cannot
read), ``blind`` (claims in the layout blind checks read; the server keeps the model encrypted), ``ring`` (the
encrypted ring's reduce-scatter). ``protect.catalog`` registers them with what each needs of a pattern.
"""
