"""Plug-ins: the hook points of the payment pipeline, loaded with pluggy.

A plug-in is a package that registers a factory under the entry-point group
`jackpay.plugins`; the router enables it *only* when the network TOML names it
(`[router] plugins = ["mixer"]`), and hands the factory its own table (`[plugins.mixer]`)
and a `PluginContext`. The object the factory returns implements any of the hooks below
with `@hookimpl`.

Rules:
- a plug-in never writes balances. It vetoes (`validate`), rewrites a payment into legs
  (`route`), and asks for *system payments* (`tick`) with deterministic tx_ids that run
  through the normal pipeline: every invariant, the ledger's idempotency and the chaos
  checker hold for them as for any payment;
- hooks run on the router's event loop, synchronously: keep them short (a journal write
  with fsync is the most a hook should do);
- a plug-in that raises fails *its payment* (`plugin_failed`, the plug-in named in the
  router's log), never the router; a raise in `tick` or `committed` is logged and the
  router goes on;
- what the hooks see is a `PaymentRequest`: the sender, tx_id, receiver, amount, memo and
  options of the request — never a socket or the book.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

import msgspec
import pluggy

from common.errors import ConfigError, ErrorCode, JackPayError
from common.messages import ISSUER, LedgerRow
from router.payment_core import Leg

PROJECT = "jackpay"
ENTRY_POINT_GROUP = "jackpay.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

log = logging.getLogger("jackpay.router.plugins")


class PaymentRequest(msgspec.Struct, frozen=True, gc=False):
    """A payment as asked for: by a participant (`system` False) or by a plug-in."""

    sender: str
    tx_id: str
    receiver: str
    amount: int
    memo: str = ""
    mix: bool = False  # the sender asked for the mixer (`send --mix`)
    system: bool = False  # asked by a plug-in (its sender is a system account)


class Veto(msgspec.Struct, frozen=True):
    """`validate`'s refusal: the payment ends with `code` and `message`, nothing held."""

    message: str
    code: ErrorCode = ErrorCode.PAYMENT_REFUSED


class Route(msgspec.Struct, frozen=True, gc=False):
    """`route`'s answer: the rows the payment commits (the last one carries the request's
    own tx_id and names the sender), and who is offered it (None: nobody, the money goes
    to a system account)."""

    legs: tuple[Leg, ...]
    payee: str | None


def route_problem(request: PaymentRequest, route: Route,
                  system_accounts: frozenset[str]) -> str | None:
    """Why a plug-in's route may not run (None: it may). The rules that keep plug-ins
    from moving money the router would not: the main leg is last and is the request's own
    (tx_id, sender); every leg moves a positive amount between two different accounts; no
    leg debits `_issuer` (a plug-in never mints) and every leg debits the sender or a
    system account; extra legs only credit system accounts, and a participant is credited
    only as the payee who is offered the payment (nobody is paid unasked)."""
    legs = route.legs
    if not legs:
        return "a route needs at least one leg"
    main = legs[-1]
    if main.tx_id != request.tx_id or main.sender != request.sender:
        return "the main leg must be last and carry the request's tx_id and sender"
    if len({(leg.sender, leg.tx_id) for leg in legs}) != len(legs):
        return "two legs share a (sender, tx_id)"
    for leg in legs:
        if leg.amount <= 0 or leg.sender == leg.receiver:
            return f"leg {leg.tx_id} moves {leg.amount} from {leg.sender} to {leg.receiver}"
        if leg.sender == ISSUER:
            return f"leg {leg.tx_id} debits {ISSUER}: a plug-in never mints"
        if leg.sender != request.sender and leg.sender not in system_accounts:
            return f"leg {leg.tx_id} debits {leg.sender}, neither the sender nor a system account"
    for leg in legs[:-1]:
        if leg.receiver not in system_accounts:
            return f"extra leg {leg.tx_id} credits {leg.receiver}, not a system account"
    if route.payee is None:
        if main.receiver not in system_accounts:
            return f"{main.receiver} would be paid without being offered the payment"
    elif route.payee != main.receiver:
        return f"the payee {route.payee} is not the main leg's receiver {main.receiver}"
    return None


class StatusNote(msgspec.Struct, frozen=True):
    """What a plug-in adds to the sender's `status` of its own payment."""

    state: str  # e.g. "mixed"
    detail: str = ""


@dataclass(frozen=True)
class PluginContext:
    """What a plug-in gets at creation: the network's id, a folder of its own for durable
    state (created, beside the router's config), and whether an id is a participant now
    (participants come and go at run time: `jackpay-router participants`, reload)."""

    network_id: str
    state_dir: Path
    is_participant: Callable[[str], bool]


class Balances(Protocol):
    def balance(self, account: str) -> int: ...


@dataclass(frozen=True)
class BalanceSnapshot:
    """The balances a plug-in is shown: a copy, never the router's live accounts (a
    plug-in reads money, it does not move it)."""

    balances: Mapping[str, int]

    def balance(self, account: str) -> int:
        return self.balances.get(account, 0)


@dataclass(frozen=True)
class StartInfo:
    """`start`'s argument: the ledger rows of the plug-ins' system accounts (in seq order,
    from the first seq any plug-in asked for with `jackpay_rows_from`) and every balance
    after the ledger's last row."""

    rows: Sequence[LedgerRow]
    balances: Balances
    now: float


class Specs:
    """The hook specifications (a plug-in implements any subset)."""

    @hookspec
    def jackpay_system_accounts(self) -> list[str]:  # type: ignore[empty-body]
        """Reserved accounts (`_name`) this plug-in owns; the pipeline accepts them as
        receivers and as senders of its system payments."""

    @hookspec
    def jackpay_rows_from(self) -> int:  # type: ignore[empty-body]
        """Before `start`: the first seq whose rows of its accounts the plug-in needs (its
        own durable checkpoint covers the rows before). Without it: every row (1)."""

    @hookspec
    def jackpay_start(self, info: StartInfo) -> None:
        """Once, after the router loaded the ledger's balances: rebuild state (with the
        plug-in's own journal) before any payment runs."""

    @hookspec(firstresult=True)
    def jackpay_validate(self, request: PaymentRequest) -> Veto | None:
        """Veto a participant's payment (the first veto wins)."""

    @hookspec(firstresult=True)
    def jackpay_route(self, request: PaymentRequest) -> Route | None:
        """Rewrite a payment into legs (the first plug-in that answers wins)."""

    @hookspec
    def jackpay_admitted(self, request: PaymentRequest, route: Route) -> None:
        """The payment is about to run with this route (its rows are not sent yet): make
        durable what a crash must not lose. A raise fails the payment, nothing held."""

    @hookspec
    def jackpay_flush(self) -> None:
        """A barrier: rows are about to leave for the ledger. Make durable now what
        `admitted` wrote without syncing (one fsync for every payment of the loop turn).
        A raise fails those rows' payments (nothing is sent)."""

    @hookspec
    def jackpay_committed(self, request: PaymentRequest, route: Route, seqs: list[int]) -> None:
        """The ledger made the payment's rows durable (the money moved): their seqs, one
        per leg (also for a system payment found already paid)."""

    @hookspec
    def jackpay_aborted(self, request: PaymentRequest, code: ErrorCode) -> None:
        """The payment failed with `code`; nothing moved."""

    @hookspec
    def jackpay_tick(self, now: float) -> list[PaymentRequest]:  # type: ignore[empty-body]
        """Called about every `plugin_tick_s`: system payments to run now."""

    @hookspec(firstresult=True)
    def jackpay_status(self, sender: str, tx_id: str) -> StatusNote | None:
        """Say more about the sender's own payment (e.g. `mixed`)."""

    @hookspec
    def jackpay_statistics(self) -> dict[str, Any]:  # type: ignore[empty-body]
        """Figures for `inspect` (no payer next to a payee)."""


class PluginFailed(JackPayError):
    """A plug-in raised inside a hook; carries the plug-in's name."""

    def __init__(self, plugin: str, hook: str, exc: BaseException) -> None:
        super().__init__(f"plug-in {plugin} failed in {hook}: {type(exc).__name__}: {exc}")
        self.plugin = plugin


# (hook, plug-in name, its function, None when it takes the spec's arguments in the spec's
# order, else the positions of those it takes), in calling order.
_Impl = tuple[str, str, Callable[..., Any], tuple[int, ...] | None]


@dataclass
class Plugins:
    """The enabled plug-ins, behind one object the pipeline calls.

    pluggy registers them and checks every hook implementation against its spec; the
    calls on the payment path then go straight to the implementations (in pluggy's
    order: the plug-in listed first answers first; `firstresult` specs stop at the first
    answer), without pluggy's per-call machinery: well under a microsecond a hook instead
    of ~2 µs, so an enabled plug-in with nothing to do costs a payment next to nothing.
    Hook wrappers are not supported."""

    pm: pluggy.PluginManager
    names: list[str] = field(default_factory=list)
    system_accounts: frozenset[str] = frozenset()
    _impls: dict[str, tuple[_Impl, ...]] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.names)

    def freeze(self) -> None:
        """Take the registered implementations (call after the last `register`)."""
        self._impls = {}
        for hook in _HOOKS:
            caller = getattr(self.pm.hook, hook)
            spec = tuple(caller.spec.argnames) if caller.spec is not None else ()
            impls = []
            for impl in reversed(caller.get_hookimpls()):  # pluggy calls LIFO
                if impl.hookwrapper or impl.wrapper:
                    raise ConfigError(f"plug-in {impl.plugin_name!r}: hook wrappers are not "
                                      "supported")
                args = tuple(impl.argnames)
                idx = None if args == spec else tuple(spec.index(a) for a in args)
                impls.append((hook, impl.plugin_name or "?", impl.function, idx))
            self._impls[hook] = tuple(impls)
        get = self._impls.get
        self._validate, self._route = get("jackpay_validate", ()), get("jackpay_route", ())
        self._admitted, self._committed = get("jackpay_admitted", ()), get("jackpay_committed", ())
        self._aborted = get("jackpay_aborted", ())

    @staticmethod
    def _run(impls: tuple[_Impl, ...], first: bool, *args: Any) -> Any:
        """Call each implementation in order; `first`: return the first answer that is
        not None (firstresult specs), else the list of all answers. A raise becomes
        PluginFailed naming the plug-in."""
        results = []
        for hook, name, function, idx in impls:
            try:
                result = function(*args) if idx is None else function(*[args[i] for i in idx])
            except Exception as exc:
                raise PluginFailed(name, hook, exc) from exc
            if result is not None:
                if first:
                    return result
                results.append(result)
        return None if first else results

    def _first(self, impls: tuple[_Impl, ...], *args: Any) -> Any:
        return self._run(impls, True, *args)

    def _all(self, impls: tuple[_Impl, ...], *args: Any) -> list[Any]:
        results: list[Any] = self._run(impls, False, *args)
        return results

    def validate(self, request: PaymentRequest) -> Veto | None:
        if not self._validate:
            return None
        result: Veto | None = self._first(self._validate, request)
        return result

    def route(self, request: PaymentRequest) -> Route | None:
        if not self._route:
            return None
        result: Route | None = self._first(self._route, request)
        return result

    def admitted(self, request: PaymentRequest, route: Route) -> None:
        if self._admitted:
            self._all(self._admitted, request, route)

    def flush(self) -> None:
        self._all(self._impls.get("jackpay_flush", ()))

    @property
    def wants_flush(self) -> bool:
        return bool(self._impls.get("jackpay_flush"))

    def committed(self, request: PaymentRequest, route: Route, seqs: list[int]) -> None:
        if self._committed:
            self._all(self._committed, request, route, seqs)

    def aborted(self, request: PaymentRequest, code: ErrorCode) -> None:
        if self._aborted:
            self._all(self._aborted, request, code)

    def rows_from(self) -> int:
        """The first seq any plug-in needs the rows of its accounts from (1: all)."""
        asked = [a for a in self._all(self._impls.get("jackpay_rows_from", ()))
                 if isinstance(a, int)]
        return max(1, min(asked)) if asked else 1

    def start(self, info: StartInfo) -> None:
        self._all(self._impls.get("jackpay_start", ()), info)

    def tick(self, now: float) -> list[PaymentRequest]:
        lists: list[list[PaymentRequest]] = self._all(self._impls.get("jackpay_tick", ()), now)
        return [r for batch in lists for r in batch]

    def status(self, sender: str, tx_id: str) -> StatusNote | None:
        result: StatusNote | None = self._first(self._impls.get("jackpay_status", ()), sender,
                                                tx_id)
        return result

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self._all(self._impls.get("jackpay_statistics", ())):
            out.update(part)
        return out


_HOOKS = tuple(name for name in vars(Specs) if name.startswith("jackpay_"))


def no_plugins() -> Plugins:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(Specs)
    plugins = Plugins(pm)
    plugins.freeze()
    return plugins


def available_plugins() -> dict[str, Any]:
    """Installed plug-ins: name -> entry point (not loaded)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_plugins(names: Sequence[str], settings: Mapping[str, Mapping[str, Any]],
                 context: PluginContext, *, factories: Mapping[str, Any] | None = None
                 ) -> Plugins:
    """Create the plug-ins named in the config, in that order (earlier ones answer
    `route` and `validate` first). `factories` (tests) bypasses the entry points.

    Raises ConfigError naming the plug-in: not installed, settings it does not accept,
    a factory that raised, or two plug-ins claiming one system account."""
    plugins = no_plugins()
    installed = available_plugins() if factories is None else {}
    owners: dict[str, str] = {}
    # pluggy calls the last registered first: register in reverse so config order wins.
    made: list[tuple[str, Any]] = []
    for name in names:
        if factories is not None and name in factories:
            factory = factories[name]
        elif name in installed:
            try:
                factory = installed[name].load()
            except Exception as exc:
                raise ConfigError(f"plug-in {name!r} could not be loaded: {exc}") from exc
        else:
            known = sorted(installed) if factories is None else sorted(factories)
            raise ConfigError(f"plug-in {name!r} is not installed (installed: "
                              f"{', '.join(known) or 'none'})")
        own = dict(settings.get(name, {}))
        state_dir = context.state_dir / name
        ctx = PluginContext(context.network_id, state_dir, context.is_participant)
        try:
            # Its state may link payers to payees (the mixer's journal): owner only.
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            state_dir.chmod(0o700)
            plugin = factory(own, ctx)
        except ConfigError as exc:
            raise ConfigError(f"[plugins.{name}]: {exc}") from None
        except Exception as exc:
            raise ConfigError(f"plug-in {name!r} failed to start: {type(exc).__name__}: "
                              f"{exc}") from exc
        made.append((name, plugin))
    for name, plugin in reversed(made):
        try:
            plugins.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise ConfigError(f"plug-in {name!r} does not fit JackPay's hooks: {exc}") from None
    try:
        plugins.pm.check_pending()  # a `jackpay_*` hook no spec knows: a typo
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"a plug-in implements an unknown hook: {exc}") from None
    plugins.freeze()
    for name, plugin in made:
        hook = getattr(plugin, "jackpay_system_accounts", None)
        for account in (hook() if hook is not None else []):
            if not account.startswith("_"):
                raise ConfigError(f"plug-in {name!r}: system account {account!r} must "
                                  "start with `_`")
            if account in owners or account in ("_issuer",):
                raise ConfigError(f"plug-in {name!r}: system account {account!r} is taken "
                                  f"by {owners.get(account, 'the network')}")
            owners[account] = name
    plugins.names = list(names)
    plugins.system_accounts = frozenset(owners)
    return plugins
