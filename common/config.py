"""The network's one TOML config, typed and validated (msgspec), with documented defaults.

Units are in the names (`*_s` seconds, `*_bytes`). Relative paths are resolved against the
config file's folder. Amounts are decimal strings ("100.00"), parsed to minor units here.
`load_config` raises ConfigError with a message that names the file and the bad key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from common.errors import ConfigError
from common.framing import DEFAULT_MAX_FRAME_BYTES
from common.limits import ServerLimits
from common.participants import Participant, load_changes, merge

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]
Count = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
PerSecond = Annotated[float, msgspec.Meta(gt=0, le=1_000_000)]
# A network id is one DNS label: it names the servers' certificates (`router.<id>`) and
# goes into every signed transcript, so it must be printable the same way everywhere.
NETWORK_ID_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
NetworkId = Annotated[str, msgspec.Meta(pattern=NETWORK_ID_PATTERN)]
# A file or folder name: no NUL (the OS cannot take one), at most 4096 bytes or so.
PathText = Annotated[str, msgspec.Meta(pattern=r"^[^\x00]*$", max_length=4096)]


def parse_host_port(text: str, *, listen: bool = True) -> tuple[str, int]:
    """`HOST:PORT` (an IPv6 host may be in brackets); port 0 (any free port) only for an
    address to `listen` on, not one to connect to. Raises ValueError."""
    host, sep, port = text.rpartition(":")
    low = 0 if listen else 1
    if not sep or not host.strip("[]") or not port.isdigit() or not low <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT with a port {low}-65535, "
                         f"e.g. 127.0.0.1:{9401 if listen else 7400}")
    return host.strip("[]"), int(port)


def _check_metrics_addr(addr: str) -> None:
    if addr:
        try:
            parse_host_port(addr)
        except ValueError as exc:
            raise ValueError(f"metrics_addr {exc}") from None


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class NetworkSection(_Section):
    """Who this network is: its id (in every certificate name and signed transcript) and
    where its keys live (relative to the config file's folder)."""

    id: NetworkId
    keys_dir: PathText = "keys"
    # The participants added and suspended at run time (common.participants); the router
    # writes it, every tool reads it with the config.
    participants_file: PathText = "participants.json"


class LedgerConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 7300
    path: PathText = "ledger.csv"
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 * 1024 * 1024)] = DEFAULT_MAX_FRAME_BYTES
    max_batch_rows: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 4096
    # A connection must finish TLS and `hello` within this time, or it is closed.
    handshake_timeout_s: Seconds = 10.0
    max_connections: Count = 256
    max_connections_per_address: Count = 64
    max_handshaking: Count = 32  # then one still in its handshake is dropped (common.aio)
    new_connections_per_address_per_s: PerSecond = 20.0
    # Prometheus metrics on HOST:PORT (e.g. "127.0.0.1:9400"; port 0 picks one); "" = off.
    metrics_addr: str = ""  # HOST:PORT, checked at load
    # Client-certificate names (CN) granted read access (`read`, `stats`); the router's
    # certificate (CN "router") may also append. Nobody else gets past `hello`.
    auditors: list[str] = msgspec.field(default_factory=lambda: ["auditor"])
    # Where the rows live: "csv" (the file at `path`, the default) or "postgresql" (the
    # database at `dsn`, e.g. "postgresql://jackpay@db1:5432,db2:5432/jackpay": every host
    # of a multi-host DSN is tried and the writable one is used). DESIGN §6a.
    store: Literal["csv", "postgresql"] = "csv"
    dsn: str = ""

    def __post_init__(self) -> None:
        _check_metrics_addr(self.metrics_addr)
        if self.store == "postgresql" and not self.dsn:
            raise ValueError('[ledger] store = "postgresql" needs dsn = "postgresql://USER@HOST:'
                             'PORT/DATABASE"')
        if self.dsn and not self.dsn.startswith(("postgresql://", "postgres://")):
            raise ValueError("[ledger] dsn must be a URI starting with postgresql://")


class RouterConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 7400
    admin_socket: PathText = "router-admin.sock"
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 * 1024 * 1024)] = DEFAULT_MAX_FRAME_BYTES
    freshness_window_s: Seconds = 2.0
    ping_timeout_s: Seconds = 1.0
    offer_timeout_s: Seconds = 3.0
    settle_timeout_s: Seconds = 3.0
    ledger_timeout_s: Seconds = 2.0
    outcome_pending_after_s: Seconds = 5.0
    ledger_retry_max_s: Seconds = 2.0
    shutdown_grace_s: Seconds = 10.0
    # A connection must finish TLS, `hello` and `auth` within this time, or it is closed.
    handshake_timeout_s: Seconds = 10.0
    max_connections: Count = 10_000
    max_connections_per_address: Count = 1024
    max_handshaking: Count = 512  # then one still in its handshake is dropped (common.aio)
    new_connections_per_address_per_s: PerSecond = 200.0  # (a burst of 5 s worth)
    # Per payer: payments in flight at once, and requests per second (a bucket that
    # holds one second's worth); above either the request is answered `rate_limited`.
    payer_max_in_flight: Count = 256
    payer_requests_per_s: PerSecond = 2000.0
    # Failed logins per source address in one minute before its logins are refused
    # (`rate_limited`, no signature checked) for the rest of that minute.
    failed_logins_per_minute: Count = 60
    # Plug-ins to enable, by entry-point name (group `jackpay.plugins`), in the order they
    # answer `route` and `validate`. Installed but unnamed plug-ins are never loaded.
    plugins: list[str] = msgspec.field(default_factory=list)
    plugin_tick_s: Seconds = 0.2  # how often plug-ins may ask for system payments
    plugin_state_dir: PathText = "plugins"  # one folder per plug-in for its durable state
    # Check the live book against a replay of the ledger this often (0: only on demand,
    # `jackpay-router reconcile`); differences are logged as errors.
    reconcile_every_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 0.0
    # Prometheus metrics on HOST:PORT (e.g. "127.0.0.1:9401"; port 0 picks one); "" = off.
    metrics_addr: str = ""  # HOST:PORT, checked at load
    # The router starts from the ledger's balances (no replay of every row) and reads
    # back only this many of the latest rows: retries and `status` of those payments are
    # answered from memory, older ones are asked of the ledger.
    recent_rows: Annotated[int, msgspec.Meta(ge=0, le=100_000_000)] = 100_000

    def __post_init__(self) -> None:
        _check_metrics_addr(self.metrics_addr)


class PayerConfig(_Section):
    control_dir: PathText = "."
    reconnect_max_s: Seconds = 2.0
    request_timeout_s: Seconds = 20.0
    # The ledger's receipts of every paid and settled payment, one JSON-lines file per
    # payer (`<id>.jsonl`): what `jackpay-ledger verify --receipts` checks a ledger against.
    receipts_dir: PathText = "receipts"


class NetworkConfig(_Section):
    network: NetworkSection
    ledger: LedgerConfig = msgspec.field(default_factory=LedgerConfig)
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)
    payer: PayerConfig = msgspec.field(default_factory=PayerConfig)
    participants: list[Participant] = msgspec.field(default_factory=list)
    # One optional table per plug-in (`[plugins.mixer]`), handed to that plug-in alone.
    plugins: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    base_dir: str = "."

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for p in self.participants:
            if p.id in seen:
                raise ValueError(f"participant id {p.id!r} appears twice")
            seen.add(p.id)
        listed: set[str] = set()
        for name in self.router.plugins:
            if name in listed:
                raise ValueError(f"[router] plugins: plug-in {name!r} is listed twice")
            listed.add(name)
        for name in self.plugins:
            if name not in self.router.plugins:
                raise ValueError(f"[plugins.{name}] is configured but {name!r} is not in "
                                 "[router] plugins (list it there to enable it)")

    def participant(self, payer_id: str) -> Participant:
        for p in self.participants:
            if p.id == payer_id:
                return p
        raise ConfigError(f"{payer_id!r} is not a participant of this network")

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def control_socket(self, payer_id: str) -> Path:
        return self.resolve(self.payer.control_dir) / f"{payer_id}.sock"

    @property
    def participants_path(self) -> Path:
        """The file of participants changed at run time (common.participants)."""
        return self.resolve(self.network.participants_file)

    @property
    def keys_dir(self) -> Path:
        """The folder of this network's keys and certificates (`[network] keys_dir`)."""
        return self.resolve(self.network.keys_dir)


def server_limits(section: LedgerConfig | RouterConfig) -> ServerLimits:
    """What the server configured by `section` admits (common.limits)."""
    return ServerLimits(section.max_connections, section.max_connections_per_address,
                        section.max_handshaking, section.new_connections_per_address_per_s)


_FLOAT_AMOUNT = re.compile(r"Expected `str`, got `(float|int)` - at `\$\.participants\[\d+\]\.(opening_balance|max_incoming)`")


def load_config(path: str | Path, *, with_changes: bool = True) -> NetworkConfig:
    """Read and validate a network config file, with the participants changed at run time
    (`[network] participants_file`) unless `with_changes` is false. Raises ConfigError
    naming the file and the bad key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    cfg = parse_config(data, source=str(path), base_dir=str(path.resolve().parent))
    if not with_changes:
        return cfg
    changes = load_changes(cfg.participants_path)
    if not changes.added and not changes.suspended:
        return cfg
    return msgspec.structs.replace(cfg, participants=merge(cfg.participants, changes))


def parse_config(data: bytes | str, *, source: str = "<config>", base_dir: str = ".") -> NetworkConfig:
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start} is "
                              f"{data[exc.start:exc.start + 1]!r}): save it as UTF-8") from None
    try:
        cfg = msgspec.toml.decode(data, type=NetworkConfig)
    except msgspec.ValidationError as exc:
        hint = ""
        if _FLOAT_AMOUNT.search(str(exc)):
            hint = ' (write amounts as quoted decimal strings, e.g. "100.00")'
        elif "missing required field `network`" in str(exc):
            hint = (' (add a [network] section with the network\'s id, e.g.\n  [network]\n'
                    '  id = "acme-pay"\nit names the certificates and goes into every signature)')
        elif "$.network.id" in str(exc):
            hint = (" (a network id is lowercase letters, digits and `-`, at most 63, "
                    "e.g. \"acme-pay\")")
        raise ConfigError(f"{source}: {exc}{hint}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return msgspec.structs.replace(cfg, base_dir=base_dir)
