"""Every message on the wire, one frozen msgspec Struct per type, tagged by `t`.

Decoding is strict: an unknown `t`, a missing or unknown field, a float or boolean where
an integer belongs, or a value outside its range fails in the decoder, so an invalid
message never exists past it. docs/PROTOCOL.md describes each type field by field; keep
the two in step.

Naming: requests carry `id`; replies carry `re` (the `id` they answer). A union of the
types a given peer may send is decoded with `decoder_for(...)`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from common.money import MAX_AMOUNT
from common.text import CONTROL_CLASS

# --- field types -------------------------------------------------------------------

ReqId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
# Payer ids: letters, digits, `_`, `.`, `-`; never start with `_` (reserved accounts such
# as `_issuer` do) nor with a character a spreadsheet reads as a formula. CSV-safe.
PAYER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
ACCOUNT_PATTERN = r"^_?[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # payer ids plus reserved `_...`
TX_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$"  # what a payer may choose
# What the router may write: a payer's tx_id inside a derived one (`_leg2:<tx_id>`).
SYSTEM_TX_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,159}$"
AccountId = Annotated[str, msgspec.Meta(pattern=ACCOUNT_PATTERN)]
PayerTxId = Annotated[str, msgspec.Meta(pattern=TX_ID_PATTERN)]
TxId = Annotated[str, msgspec.Meta(pattern=SYSTEM_TX_ID_PATTERN)]
Amount = Annotated[int, msgspec.Meta(gt=0, le=MAX_AMOUNT)]
Balance = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Seq = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Memo = Annotated[str, msgspec.Meta(max_length=256)]
# A new participant's display name (`participant_add`): printed by operators' tools, so
# none of common.text's control characters (a newline forges a row, ESC drives the
# terminal, a bidi override reorders it).
DisplayName = Annotated[str, msgspec.Meta(pattern=f"^[^{CONTROL_CLASS}]*$", max_length=200)]
Limit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Role = Literal["payer", "router", "cli", "admin", "client"]
Nonce = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Signature = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
RowHash = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]  # SHA-256, lowercase hex

ISSUER = "_issuer"
# A ledger row's time (`dtg`): UTC with microseconds, e.g. 2026-12-01T10:00:00.000000Z.
DTG_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
# Bounded so that the reply (about 150 bytes per row) always fits the default frame limit.
MAX_APPEND_ROWS = 256
# Upper bound of one encoded AppendResult, with its seal (tests/test_messages.py checks it):
# an append's rows are capped so that the reply fits one frame.
APPEND_RESULT_BYTES = 320


class Message(msgspec.Struct, tag_field="t", forbid_unknown_fields=True, frozen=True,
              omit_defaults=True):
    """Base of every top-level message."""


class Record(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """Base of nested, untagged structures."""


# --- every connection ----------------------------------------------------------------


class Hello(Message, tag="hello", frozen=True):
    """First frame on every connection. `peer` is the payer id for role `payer`, who
    also sends a fresh `nonce` and is answered `challenge` (common.auth)."""

    id: ReqId
    version: int
    role: Role
    peer: Annotated[str, msgspec.Meta(max_length=128)] = ""
    nonce: Nonce | None = None


class Challenge(Message, tag="challenge", frozen=True):
    """Router → payer, the answer to `hello`: sign the login transcript (common.auth)
    with this `nonce`, for the server named `server` (the name in its certificate)."""

    re: ReqId
    nonce: Nonce
    server: Annotated[str, msgspec.Meta(max_length=255)]


class Auth(Message, tag="auth", frozen=True):
    """Payer → router: the Ed25519 signature of the login transcript; `welcome` or
    `auth_failed` follows."""

    id: ReqId
    sig: Signature


class Welcome(Message, tag="welcome", frozen=True):
    """Reply to `hello`. Payers also get their balance view."""

    re: ReqId
    version: int
    server: str
    balance: Balance | None = None
    available: Balance | None = None
    last_tx_time: str | None = None


class Ping(Message, tag="ping", frozen=True):
    id: ReqId


class Pong(Message, tag="pong", frozen=True):
    re: ReqId


class Error(Message, tag="error", frozen=True):
    """Error reply. `re` is None when the failing frame had no readable `id`."""

    re: ReqId | None
    code: str
    message: str
    tx_id: str | None = None


# --- ledger --------------------------------------------------------------------------


class RowIn(Record, frozen=True, omit_defaults=True):
    """A payment to record; the ledger assigns seq, dtg and hash. The signatures, when
    the payment has them (common/signing.py): the sender's order and the receiver's
    acceptance, kept in the row and covered by its hash."""

    tx_id: TxId
    sender: AccountId
    receiver: AccountId
    amount: Amount
    memo: Memo = ""
    sender_sig: Signature | None = None
    receiver_sig: Signature | None = None


class LedgerRow(Record, frozen=True, omit_defaults=True):
    """One durable ledger row (DESIGN §4). `amount` in minor units on the wire.

    Rows only ever come from the ledger, which validated every field when the row was
    appended (`RowIn`) or when it loaded its file, so strings are not re-checked against
    the id patterns here: a router replaying a million rows saves ~3 µs per row."""

    seq: Seq
    dtg: str
    sender: str
    receiver: str
    amount: Amount
    tx_id: str
    memo: str
    hash: str
    sender_sig: bytes | None = None
    receiver_sig: bytes | None = None


class Append(Message, tag="append", frozen=True):
    id: ReqId
    rows: Annotated[list[RowIn], msgspec.Meta(min_length=1, max_length=MAX_APPEND_ROWS)]
    # All rows or none: one payment's legs. A conflict on any row fails every row (none
    # written); written together in one batch, in this order.
    atomic: bool = False


class Seal(Record, frozen=True):
    """The ledger's signature of its chain head after a durable batch (common/signing.py
    `head_bytes`): the head's hash commits to every row up to `head_seq`."""

    head_seq: Seq
    head_hash: RowHash
    sig: Signature


class AppendResult(Record, frozen=True, omit_defaults=True):
    """`written`: a new row; `duplicate`: the same payment was already recorded (its seq,
    dtg and hash are returned); `conflict`: the tx_id is recorded with other content
    (nothing written; seq, dtg and hash of the existing row). `seal`: the ledger's
    signed chain head, at or after this row (not on conflicts)."""

    status: Literal["written", "duplicate", "conflict"]
    seq: Seq
    dtg: str
    hash: str
    seal: Seal | None = None


class LedgerProof(Record, frozen=True):
    """What a payer keeps of a paid payment (`paid.proof`, `settled.proof`): its row's
    seq and hash, and the ledger's signed chain head at or after it. Later, anyone with
    the ledger file and the ledger's public key can tell whether that row was removed or
    rewritten (`jackpay-ledger verify FILE --receipts DIR`)."""

    seq: Seq
    hash: RowHash
    head_seq: Seq
    head_hash: RowHash
    sig: Signature


class Appended(Message, tag="appended", frozen=True):
    re: ReqId
    results: list[AppendResult]


class Read(Message, tag="read", frozen=True):
    """Rows with seq >= from_seq, at most `limit`; `party` keeps rows it sent or received."""

    id: ReqId
    from_seq: Seq = 1
    limit: Limit = 500
    party: AccountId | None = None


class Rows(Message, tag="rows", frozen=True):
    """`next_seq` is where the next page starts; `last_seq` is the newest row's seq (0: empty);
    `more`: rows (of `party`, when the read named one) exist from `next_seq` on."""

    re: ReqId
    rows: list[LedgerRow]
    next_seq: int
    last_seq: int
    more: bool = False


class TxKey(Record, frozen=True):
    """A payment's name: its sender and its tx_id."""

    sender: AccountId
    tx_id: TxId


class Lookup(Message, tag="lookup", frozen=True):
    """The rows of these payments, if the ledger has them (a retry or a `status` of a
    payment older than what the router keeps in memory)."""

    id: ReqId
    keys: Annotated[list[TxKey], msgspec.Meta(min_length=1, max_length=MAX_APPEND_ROWS)]


class Found(Message, tag="found", frozen=True):
    re: ReqId
    rows: list[LedgerRow]  # those of the keys the ledger has, in seq order
    # The ledger's latest signed chain head (absent before its first seal, or when it
    # does not seal): a receipt of each row at or before its head_seq.
    seal: Seal | None = None


class Balances(Message, tag="balances", frozen=True):
    """Every account's balance after row `last_seq`, by account name, one page at a time
    (accounts after `after`, at most `limit`): what the router starts from instead of
    replaying every row."""

    id: ReqId
    after: str = ""
    limit: Annotated[int, msgspec.Meta(ge=1, le=2000)] = 1000


class BalancesReply(Message, tag="balances_ok", frozen=True):
    re: ReqId
    balances: list[tuple[str, int]]  # (account, minor units), ascending by account
    last_seq: int  # the chain head these balances are after
    last_hash: str
    more: bool = False  # accounts after the last one of this page exist


class Stats(Message, tag="stats", frozen=True):
    id: ReqId


class StatsReply(Message, tag="stats_ok", frozen=True):
    re: ReqId
    rows: int
    fsyncs: int
    batches: int
    appends: int
    uptime_ms: int
    last_hash: str
    fsync_us_total: int = 0  # time spent in fsync since start, microseconds
    fsync_us_max: int = 0  # the longest single fsync since start
    slow_fsyncs: int = 0  # fsyncs that took 10 ms or more
    index_ok: bool = True  # the CSV store's index is written (False: see rows_in_memory)
    rows_in_memory: int = 0  # rows the ledger holds in memory beyond its index


# --- router, payer-facing ------------------------------------------------------------


class Pay(Message, tag="pay", frozen=True):
    id: ReqId
    tx_id: PayerTxId
    to: AccountId
    amount: Amount
    memo: Memo = ""
    mix: bool = False  # through the mixer (a plug-in): the ledger names `_mixer`, not `to`
    # The sender's Ed25519 signature over the row this payment writes (common/signing.py);
    # required by a router with security on.
    sig: Signature | None = None


class Paid(Message, tag="paid", frozen=True):
    """Success reply to `pay`: the row's seq and dtg, the sender's balance after."""

    re: ReqId
    tx_id: TxId
    seq: Seq
    dtg: str
    balance: Balance
    proof: LedgerProof | None = None  # the ledger's receipt (absent for older payments)


class GetBalance(Message, tag="balance", frozen=True):
    id: ReqId


class BalanceReply(Message, tag="balance_ok", frozen=True):
    re: ReqId
    balance: Balance
    available: Balance
    last_tx_time: str | None = None


class History(Message, tag="history", frozen=True):
    """The caller's own rows, oldest first, from `from_seq`."""

    id: ReqId
    from_seq: Seq = 1
    limit: Limit = 100


class HistoryReply(Message, tag="history_ok", frozen=True):
    re: ReqId
    rows: list[LedgerRow]
    next_seq: int
    more: bool = False  # the payer has rows from next_seq on: ask again for the next page


class Status(Message, tag="status", frozen=True):
    """A payment is named by its sender and tx_id: `sender` is the caller unless given
    (a receiver asking about a payment it was offered names who sent it)."""

    id: ReqId
    tx_id: TxId
    sender: AccountId | None = None


# `mixed`: deposited in the mixer (a plug-in), the payout to the payee not yet made.
TxState = Literal["paid", "failed", "pending", "unknown", "mixed"]


class StatusReply(Message, tag="status_ok", frozen=True):
    """`paid` carries seq; `failed` carries code; `pending` is in flight or in doubt;
    `mixed` is a deposit in the mixer still waiting for its round. `detail` is a plug-in's
    word on the caller's own payment (e.g. the payout's rows)."""

    re: ReqId
    tx_id: TxId
    state: TxState
    code: str | None = None
    seq: int | None = None
    sender: str | None = None
    receiver: str | None = None
    amount: int | None = None
    detail: str | None = None


class Offer(Message, tag="offer", frozen=True):
    """Router → receiver: will you take this payment? Answer `receipt` or `reject`."""

    id: ReqId
    tx_id: TxId
    sender: AccountId = msgspec.field(name="from")
    amount: Amount
    memo: Memo = ""


class Receipt(Message, tag="receipt", frozen=True):
    re: ReqId
    tx_id: TxId
    # The receiver's Ed25519 signature over the offered row (common/signing.py, tag
    # jackpay-receipt-v1); required by a router with security on.
    sig: Signature | None = None


class Reject(Message, tag="reject", frozen=True):
    re: ReqId
    tx_id: TxId
    reason: Memo = ""


class Settled(Message, tag="settled", frozen=True):
    """Router → receiver: the payment (`from`, `tx_id`) is in the ledger; `balance` is
    the receiver's now. `amount` and `memo` are the offer's again: a receiver that
    restarted since the offer still knows what it received."""

    id: ReqId
    tx_id: TxId
    sender: AccountId = msgspec.field(name="from")
    seq: Seq
    balance: Balance
    proof: LedgerProof | None = None  # the ledger's receipt (absent for older payments)
    amount: Amount | None = None  # None only from routers before this field
    memo: Memo = ""


class Cancel(Message, tag="cancel", frozen=True):
    """Router → receiver: forget the offer (`from`, `tx_id`); it will not be paid."""

    id: ReqId
    tx_id: TxId
    sender: AccountId = msgspec.field(name="from")
    code: str
    amount: Amount | None = None  # the offer's (None only from routers before this field)


class Ack(Message, tag="ack", frozen=True):
    re: ReqId


# --- payer daemon control socket (CLI ↔ daemon) --------------------------------------


class Send(Message, tag="send", frozen=True):
    """CLI → daemon: pay `to`; the daemon picks a tx_id when none is given."""

    id: ReqId
    to: AccountId
    amount: Amount
    memo: Memo = ""
    tx_id: PayerTxId | None = None  # what `pay` takes: a payer's tx_id, not a system one
    mix: bool = False  # through the network's mixer


class Watch(Message, tag="watch", frozen=True):
    id: ReqId


class Event(Message, tag="event", frozen=True):
    """Daemon → watching CLI: something happened to a payment."""

    kind: Literal["offer", "settled", "cancel", "paid", "failed", "connected", "disconnected"]
    tx_id: str = ""
    peer: str = ""
    amount: int = 0
    memo: str = ""
    balance: int | None = None
    code: str | None = None
    seq: int | None = None


# --- router admin socket (operators and the chaos checker) --------------------------


class Inspect(Message, tag="inspect", frozen=True):
    """Admin → router: every balance, every open hold, every payment in flight."""

    id: ReqId


class InFlight(Record, frozen=True):
    tx_id: str
    sender: str
    receiver: str
    amount: int
    step: str
    age_ms: int


class InspectReply(Message, tag="inspect_ok", frozen=True):
    re: ReqId
    balances: dict[str, int]
    holds: dict[str, int]
    in_flight: list[InFlight]
    sessions: list[str]
    ledger_connected: bool
    # How payments ended since the router started: `paid` and one count per error code.
    outcomes: dict[str, int] = {}
    # The ledger client's counters: connects, appends_sent, rows_sent, resends, in_doubt_now.
    ledger_link: dict[str, int] = {}
    # Logins refused since start (auth_failed, rate_limited, a hello without a nonce).
    refused_logins: int = 0
    # With metrics on: the whole-payment latency histogram's bucket counts (bounds in
    # `common.metrics.BUCKETS_S`, one more for +Inf), so `top` can take per-interval
    # percentiles from two snapshots.
    payment_seconds_buckets: list[int] = []


class Reconcile(Message, tag="reconcile", frozen=True):
    """Admin → router: check the live book against a replay of the ledger."""

    id: ReqId


class Difference(Record, frozen=True):
    """One account (or total) where the router and the ledger disagree."""

    what: Literal["balance", "hold", "issued", "row"]
    account: str
    router: int
    ledger: int
    detail: str = ""


class ReconcileReply(Message, tag="reconcile_ok", frozen=True):
    re: ReqId
    ok: bool
    rows: int  # ledger rows read
    router_last_seq: int
    differences: list[Difference]
    in_flight_skipped: int = 0  # rows of payments whose append is still unanswered


# Participants at run time (router/participants.py). Amounts in minor units.


class ParticipantInfo(Record, frozen=True):
    id: str
    name: str
    kind: str
    opening_balance: int
    max_incoming: int | None
    suspended: bool
    added_at_run_time: bool  # recorded in `[network] participants_file`, not the config
    has_key: bool  # a usable public key: it can log in (unless suspended)
    online: bool  # a live session now
    balance: int
    available: int


class ListParticipants(Message, tag="participants", frozen=True):
    """Admin → router: every participant, its state and balance."""

    id: ReqId


class ParticipantsReply(Message, tag="participants_ok", frozen=True):
    re: ReqId
    participants: list[ParticipantInfo]


class AddParticipant(Message, tag="participant_add", frozen=True):
    """Admin → router: a new participant, paid `opening_balance` from `_issuer` once
    (tx_id `_open:<id>`), logging in with `key` (32 raw Ed25519 bytes; without one, it
    logs in once `jackpay-keys CONFIG` made its key pair)."""

    id: ReqId
    payer: Annotated[str, msgspec.Meta(pattern=PAYER_ID_PATTERN)]
    name: DisplayName = ""
    kind: Literal["corporation", "individual", "party", "software", "other"] = "individual"
    opening_balance: Annotated[int, msgspec.Meta(ge=0, le=MAX_AMOUNT)] = 0
    max_incoming: Annotated[int, msgspec.Meta(ge=0, le=MAX_AMOUNT)] | None = None
    key: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)] | None = None


class SuspendParticipant(Message, tag="participant_suspend", frozen=True):
    """Admin → router: no new payments to or from `payer`, its session closed, no login."""

    id: ReqId
    payer: Annotated[str, msgspec.Meta(pattern=PAYER_ID_PATTERN)]


class ResumeParticipant(Message, tag="participant_resume", frozen=True):
    id: ReqId
    payer: Annotated[str, msgspec.Meta(pattern=PAYER_ID_PATTERN)]


class ParticipantChanged(Message, tag="participant_ok", frozen=True):
    re: ReqId
    participant: ParticipantInfo
    note: str = ""  # e.g. the opening balance still to be issued, a key still to be made


class Reload(Message, tag="reload", frozen=True):
    """Admin → router: read the config file again and apply its participants."""

    id: ReqId


class ReloadReply(Message, tag="reload_ok", frozen=True):
    re: ReqId
    added: list[str]
    removed: list[str]
    changed: list[str]
    # Settings outside [[participants]] that differ from the running ones: in force only
    # after a restart.
    restart_needed: list[str]


# --- decoding helpers ----------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode

LEDGER_REQUESTS = (Hello, Ping, Append, Read, Lookup, Balances, Stats)
LEDGER_REPLIES = (Welcome, Pong, Appended, Rows, Found, BalancesReply, StatsReply, Error)
ROUTER_REQUESTS = (Hello, Auth, Ping, Pay, GetBalance, History, Status, Receipt, Reject, Ack,
                   Pong, Error)
PAYER_INBOUND = (Welcome, Challenge, Pong, Ping, Paid, BalanceReply, HistoryReply, StatusReply,
                 Offer, Settled, Cancel, Error)
ADMIN_REQUESTS = (Hello, Ping, Inspect, Reconcile, ListParticipants, AddParticipant,
                  SuspendParticipant, ResumeParticipant, Reload)
ADMIN_REPLIES = (Welcome, Pong, InspectReply, ReconcileReply, ParticipantsReply,
                 ParticipantChanged, ReloadReply, Error)
# The admin socket's frame limit: an `inspect_ok` lists every balance and payment in flight
# (~100 bytes each), far more than a payer frame; the socket is local and owner-only.
ADMIN_MAX_FRAME_BYTES = 4 * 1024 * 1024
CONTROL_REQUESTS = (Hello, Ping, Send, GetBalance, History, Status, Watch)
CONTROL_REPLIES = (Welcome, Pong, Paid, BalanceReply, HistoryReply, StatusReply, Ack, Event,
                   Error)


def decoder_for(types: tuple[type[Message], ...]) -> msgspec.msgpack.Decoder[Any]:
    """A strict decoder for exactly these message types."""
    union: Any = types[0]
    for t in types[1:]:
        union = union | t
    return msgspec.msgpack.Decoder(union)


_lenient = msgspec.msgpack.Decoder()


def salvage_request_id(payload: bytes) -> int | None:
    """Best effort: the `id` of a frame that failed strict decoding, to address the error."""
    try:
        obj = _lenient.decode(payload)
    except Exception:  # anything a hostile frame can make a decoder raise (RecursionError)
        return None
    if isinstance(obj, dict):
        rid = obj.get("id")
        if type(rid) is int and 0 <= rid < 2**63:
            return rid
    return None


def describe_decode_error(exc: Exception) -> str:
    """A short, person-readable reason for a decode failure (no traceback)."""
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."
