"""Fuzz targets: one module per parser of bytes (or values) that another party can send.

Each target module defines:

``NAME: str``
    A short label for the outcome table ("ciphertext", "proof", ...).
``setup(workdir: pathlib.Path) -> object``
    Expensive state (a context, keys, an honest payload, a recorded proof), built once per fuzz worker process. It may
    write files under ``workdir`` (a fresh temporary folder per worker).
``case(state, rng: random.Random) -> str``
    Derive one mutant from ``rng`` alone (so a case is reproducible from its seed), feed it to the parser under test and
    return the outcome label when the parser behaved: ``"refused"`` (it raised a ``trustgrad.errors.TrustgradError``
    with a one-line message -- return this label after catching it, and re-raise anything else),
    ``"invalid-verdict"`` (a verifier returned a reasoned invalid verdict), or ``"accepted"`` (the parser accepted it
    and the target checked that what it accepted means the same as the honest payload: e.g. a no-op mutation).
    Raise ``tests.fuzz.harness.Finding("silent-accept", detail)`` when a *changed* payload was accepted as if valid.

Mutants recompute every checksum, digest and commitment a forger could recompute: a malicious insider holds valid
keys, so checksums are not validation. The harness (``tests/fuzz/harness.py``) runs cases in worker processes under a
memory limit (RLIMIT_AS) and a per-case timeout and classifies anything else: a signal is a crash, a timeout a hang,
``MemoryError`` or the limit a memory finding, any other exception (``RecursionError`` included) a traceback, and a
multi-line error message a traceback too.
"""
