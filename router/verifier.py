"""`python -m router.verifier`: the router's signature checks, in a process of its own.

A check costs about as much as the router's whole work for a payment, and a thread in the
router's process shares its GIL: every check's Python part would wait for the event loop
to let go (docs/PERFORMANCE.md). So the router starts this process and talks to it over
its stdin and stdout, with its own GIL on the other core:

    router -> verifier   batches: u32 length, then jobs: public key (32 bytes),
                         signature (64), u32 length, the signed bytes
    verifier -> router   one byte per job, in order: 1 good, 0 bad

It exits when its stdin closes (the router stopped, or died).
"""

from __future__ import annotations

import struct
import sys

import nacl.bindings
import nacl.exceptions

_LEN = struct.Struct(">I")


def verify_raw(public_key: bytes, sig: bytes, data: bytes) -> bool:
    """Ed25519 (libsodium): whether `sig` is `public_key`'s signature of `data`."""
    try:
        nacl.bindings.crypto_sign_open(sig + data, public_key)
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True


def encode_job(key: bytes, sig: bytes, data: bytes) -> bytes:
    return key + sig + _LEN.pack(len(data)) + data


def decode_job(job: bytes | memoryview) -> tuple[bytes, bytes, bytes, int]:
    """The job at the start of `job`: (key, signature, signed bytes, its length)."""
    (n,) = _LEN.unpack_from(job, 96)
    return bytes(job[:32]), bytes(job[32:96]), bytes(job[100 : 100 + n]), 100 + n


def check(job: memoryview) -> tuple[int, int]:
    """Verify the job at the start of `job`: (1 or 0, its length)."""
    key, sig, data, used = decode_job(job)
    return int(verify_raw(key, sig, data)), used


def main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return 0
        (n,) = _LEN.unpack(head)
        batch = memoryview(stdin.read(n))
        if len(batch) < n:
            return 0
        out = bytearray()
        pos = 0
        while pos < n:
            ok, used = check(batch[pos:])
            out.append(ok)
            pos += used
        stdout.write(out)
        stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
