"""A payer's login on one connection: hello → challenge → auth (common.auth). No I/O.

Rules:
- only the handshake is accepted before login: `hello` first, then `auth`; anything
  else refuses the login;
- every refusal of a well-formed attempt is one generic `auth_failed` to the peer (an
  unknown id, a participant without a key, a wrong key, a signature for another
  session, server or network all look the same); the reason goes to the server log;
- an unknown id is answered with a challenge like a known one, and its signature is
  checked against a throw-away key, so neither the answer nor its timing says which ids
  exist;
- cheap checks before expensive ones: an address with `failed_logins_per_minute`
  failures is refused (`rate_limited`) before any signature is checked, until its
  minute is over.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.auth import new_nonce, verify_login
from common.errors import ErrorCode, JackPayError
from common.keys import raw_public
from common.limits import FailedLogins
from common.messages import Auth, Challenge, Hello, Message
from router.keyring import PayerKeys

# Checked when the claimed id has no key, so a refusal takes as long either way.
_DECOY_KEY = Ed25519PrivateKey.generate().public_key()


class LoginRefused(JackPayError):
    """The login ends here: answer `code` with `message`, log `reason`, close. `kind`
    names the reason in a word (a small, fixed set: what log throttling is keyed by)."""

    def __init__(self, code: ErrorCode, message: str, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.code = code
        self.message = message
        self.reason = reason
        self.kind = kind


def _auth_failed(reason: str, kind: str) -> LoginRefused:
    return LoginRefused(ErrorCode.AUTH_FAILED, "authentication failed", reason, kind)


@dataclass(frozen=True, slots=True)
class LoggedIn:
    """What a login proved: who, with which key (its 32 raw bytes), answering `auth` `rid`."""

    payer_id: str
    key: bytes
    rid: int


@dataclass(frozen=True, slots=True)
class LoginPolicy:
    """What every login on this router checks against."""

    network_id: str
    server_id: str  # the DNS name in the router's certificate
    keys: PayerKeys
    failed: FailedLogins


class Login:
    """The state of one connection's login."""

    __slots__ = ("_client_nonce", "_policy", "_server_nonce", "address", "claimed")

    def __init__(self, policy: LoginPolicy, address: str) -> None:
        self._policy = policy
        self.address = address
        self.claimed: str | None = None
        self._client_nonce = b""
        self._server_nonce = b""

    def on_hello(self, hello: Hello, now: float) -> Challenge:
        """Raises LoginRefused (rate_limited, bad_request for a hello without a nonce)."""
        if self._policy.failed.blocked(self.address, now):
            raise LoginRefused(ErrorCode.RATE_LIMITED,
                               "too many failed logins from your address; try again in a "
                               "minute", "too many failed logins from this address",
                               "blocked")
        if hello.nonce is None:
            raise LoginRefused(ErrorCode.BAD_REQUEST,
                               "a payer's hello carries a 32-byte nonce (protocol 3); "
                               "see docs/PROTOCOL.md", "hello without a nonce", "no_nonce")
        self.claimed = hello.peer
        self._client_nonce = hello.nonce
        self._server_nonce = new_nonce()
        return Challenge(re=hello.id, nonce=self._server_nonce, server=self._policy.server_id)

    def on_auth(self, msg: Message, now: float) -> LoggedIn:
        """Who the `auth` proved. Raises LoginRefused (auth_failed), counting the failure."""
        policy = self._policy
        try:
            if not isinstance(msg, Auth):
                raise _auth_failed(f"{type(msg).__name__.lower()} sent instead of auth",
                                   "not_auth")
            claimed = self.claimed or ""
            policy.keys.refresh(claimed)  # a key rotated a moment ago is the one that counts
            key = policy.keys.get(claimed)
            good = verify_login(key or _DECOY_KEY, msg.sig, policy.network_id,
                                policy.server_id, self._server_nonce, self._client_nonce,
                                claimed)
            if key is None:
                raise _auth_failed(f"{claimed!r} is not a participant with a key", "no_key")
            if not good:
                raise _auth_failed(f"signature does not verify with {claimed}'s key",
                                   "bad_signature")
            return LoggedIn(claimed, raw_public(key), msg.id)
        except LoginRefused:
            policy.failed.record_failure(self.address, now)
            raise
