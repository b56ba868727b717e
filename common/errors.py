"""Error codes (one registry) and the exception tree.

Every failure that crosses the wire carries a `code` from `ErrorCode`. Each code says
whether a retry of the same request can help (`retriable`), like aiokafka's errors.py.
The exception tree says whose fault a failure is:

    JackPayError
    ├── ProtocolError        the peer sent bytes we cannot accept (close that connection)
    │   └── FrameTooLarge
    ├── ConnectionLost       the network or the peer went away; pending requests fail with it
    ├── RequestFailed        the peer answered with an error frame (carries its ErrorCode)
    ├── ConfigError          a config file or argument is unusable
    ├── InvariantViolation   our own bug; never caught to continue
    └── the refusals of one part, each defined where it is raised: LedgerUnavailable,
        LedgerRefused (router/ledger_client.py), PaymentKilled (router/payments.py),
        InsufficientFunds, TxIdConflict, PluginFailed, LedgerCorrupt, LedgerInUse, …
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class _CodeInfo:
    retriable: bool
    doc: str


class ErrorCode(enum.StrEnum):
    """Stable wire codes. Values never change once published (docs/PROTOCOL.md)."""

    BAD_REQUEST = "bad_request"
    HELLO_REQUIRED = "hello_required"
    UNSUPPORTED_VERSION = "unsupported_version"
    FRAME_TOO_LARGE = "frame_too_large"
    UNKNOWN_PAYER = "unknown_payer"
    SESSION_REPLACED = "session_replaced"
    NOT_FOUND = "not_found"
    TX_ID_CONFLICT = "tx_id_conflict"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    UNKNOWN_RECEIVER = "unknown_receiver"
    RECEIVER_UNREACHABLE = "receiver_unreachable"
    RECEIVER_TIMEOUT = "receiver_timeout"
    RECEIVER_REJECTED = "receiver_rejected"
    LEDGER_UNAVAILABLE = "ledger_unavailable"
    LEDGER_WRITE_FAILED = "ledger_write_failed"
    OUTCOME_PENDING = "outcome_pending"
    SHUTTING_DOWN = "shutting_down"
    ROUTER_UNAVAILABLE = "router_unavailable"
    INTERNAL_ERROR = "internal_error"
    AUTH_FAILED = "auth_failed"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    PAYMENT_REFUSED = "payment_refused"
    PLUGIN_FAILED = "plugin_failed"
    PARTICIPANT_SUSPENDED = "participant_suspended"
    BAD_SIGNATURE = "bad_signature"

    @property
    def retriable(self) -> bool:
        return _INFO[self].retriable

    @property
    def doc(self) -> str:
        return _INFO[self].doc


_INFO: dict[ErrorCode, _CodeInfo] = {
    ErrorCode.BAD_REQUEST: _CodeInfo(False, "frame or field invalid (type, range, unknown `t`)"),
    ErrorCode.HELLO_REQUIRED: _CodeInfo(False, "the first frame on a connection must be `hello`"),
    ErrorCode.UNSUPPORTED_VERSION: _CodeInfo(False, "protocol version in `hello` not spoken"),
    ErrorCode.FRAME_TOO_LARGE: _CodeInfo(False, "declared frame length above the limit"),
    ErrorCode.UNKNOWN_PAYER: _CodeInfo(False, "not sent since protocol 3: an unknown payer gets `auth_failed`"),
    ErrorCode.SESSION_REPLACED: _CodeInfo(False, "a newer session for this payer took over"),
    ErrorCode.NOT_FOUND: _CodeInfo(False, "no such transaction or row"),
    ErrorCode.TX_ID_CONFLICT: _CodeInfo(False, "tx_id reused with different parameters"),
    ErrorCode.INSUFFICIENT_FUNDS: _CodeInfo(False, "sender's available balance is below amount"),
    ErrorCode.UNKNOWN_RECEIVER: _CodeInfo(False, "receiver is not a registered participant"),
    ErrorCode.RECEIVER_UNREACHABLE: _CodeInfo(True, "receiver has no live session or failed the ping"),
    ErrorCode.RECEIVER_TIMEOUT: _CodeInfo(True, "receiver did not answer the offer in time"),
    ErrorCode.RECEIVER_REJECTED: _CodeInfo(False, "receiver's acceptance policy refused the offer"),
    ErrorCode.LEDGER_UNAVAILABLE: _CodeInfo(True, "ledger not reachable; payment never reached it"),
    ErrorCode.LEDGER_WRITE_FAILED: _CodeInfo(True, "ledger could not write durably; file unchanged"),
    ErrorCode.OUTCOME_PENDING: _CodeInfo(True, "ledger answer not yet known; ask `status` or retry"),
    ErrorCode.SHUTTING_DOWN: _CodeInfo(True, "the service is stopping; try again later"),
    ErrorCode.ROUTER_UNAVAILABLE: _CodeInfo(True, "the payer daemon has no session with the router"),
    ErrorCode.INTERNAL_ERROR: _CodeInfo(True, "unexpected server fault (a bug); logged server-side"),
    ErrorCode.AUTH_FAILED: _CodeInfo(False, "login refused (unknown id, wrong key, bad signature); "
                                            "the reason is in the server's log; connection closed"),
    ErrorCode.FORBIDDEN: _CodeInfo(False, "the authenticated identity may not make this request"),
    ErrorCode.RATE_LIMITED: _CodeInfo(True, "too many requests, payments in flight or failed "
                                            "logins; retry after a moment"),
    ErrorCode.PAYMENT_REFUSED: _CodeInfo(False, "a rule of this network (a plug-in) refused the "
                                                "payment; the message says which and why"),
    ErrorCode.PLUGIN_FAILED: _CodeInfo(False, "a plug-in failed on this payment (a bug, logged "
                                              "server-side); nothing moved"),
    ErrorCode.PARTICIPANT_SUSPENDED: _CodeInfo(False, "the sender or the receiver is suspended by "
                                                      "the network's operator; nothing moved"),
    ErrorCode.BAD_SIGNATURE: _CodeInfo(False, "the sender's `pay` or the receiver's `receipt` "
                                              "is not signed by its key over this payment; "
                                              "nothing moved"),
}

# Refuse an incomplete registry at import time rather than at the first error.
_missing = set(ErrorCode) - set(_INFO)
if _missing:  # pragma: no cover - guarded at import
    raise RuntimeError(f"error codes without documentation: {sorted(_missing)}")


class JackPayError(Exception):
    """Root of every exception JackPay raises on purpose."""


class ProtocolError(JackPayError):
    """The peer sent something we cannot accept. The connection should be closed."""


class FrameTooLarge(ProtocolError):
    def __init__(self, declared: int, limit: int) -> None:
        super().__init__(f"frame of {declared} bytes declared; the limit is {limit}")
        self.declared = declared
        self.limit = limit


class ConnectionLost(JackPayError):
    """The connection closed or broke; raised to every request still waiting on it."""


class RequestFailed(JackPayError):
    """The peer answered a request with an error frame."""

    def __init__(self, code: ErrorCode | str, message: str, tx_id: str | None = None) -> None:
        try:
            self.code: ErrorCode | str = ErrorCode(code)
        except ValueError:
            self.code = code
        super().__init__(f"{code}: {message}")
        self.message = message
        self.tx_id = tx_id  # the payment the error is about, when the frame names one

    @property
    def retriable(self) -> bool:
        return isinstance(self.code, ErrorCode) and self.code.retriable


class ConfigError(JackPayError):
    """A config file, ledger file or argument is unusable; the message says what to fix."""


class InvariantViolation(JackPayError):
    """An internal invariant broke. This is a bug in JackPay."""
