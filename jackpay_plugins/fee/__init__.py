"""A flat fee per payment, paid to an operator account: the second plug-in, proving the
API is general (a payment of two legs, committed atomically in one append).

    [router]
    plugins = ["fee"]
    [plugins.fee]
    amount = "0.05"       # per payment, from the sender, on top of what it sends
    account = "_fees"     # a system account of this plug-in (starts with `_`)
    min_payment = "0.00"  # payments below this pay no fee

The sender needs amount + fee available (`insufficient_funds` otherwise); the fee row
(`_leg2:<tx_id>`, sender → account) and the payment's row commit together or not at all.
Mixed payments are routed by the mixer when it is listed first, and then pay no fee.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from common.errors import ConfigError
from common.money import AmountError, parse_amount
from router.payment_core import Leg, leg_tx_id
from router.plugins import PaymentRequest, PluginContext, Route, hookimpl

AccountName = Annotated[str, msgspec.Meta(pattern=r"^_[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]


class FeeSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    amount: str = "0.01"
    account: AccountName = "_fees"
    min_payment: str = "0.00"


class FeePlugin:
    def __init__(self, fee: int, account: str, min_payment: int) -> None:
        self.fee = fee
        self.account = account
        self.min_payment = min_payment
        self.collected = 0

    @hookimpl
    def jackpay_system_accounts(self) -> list[str]:
        return [self.account]

    @hookimpl
    def jackpay_route(self, request: PaymentRequest) -> Route | None:
        if request.system or request.amount < self.min_payment:
            return None
        return Route((Leg(leg_tx_id(request.tx_id, 2), request.sender, self.account, self.fee),
                      Leg(request.tx_id, request.sender, request.receiver, request.amount,
                          request.memo)), request.receiver)

    @hookimpl
    def jackpay_committed(self, request: PaymentRequest, route: Route, seqs: list[int]) -> None:
        if len(route.legs) == 2 and route.legs[0].receiver == self.account:
            self.collected += self.fee

    @hookimpl
    def jackpay_statistics(self) -> dict[str, Any]:
        return {"fees_collected_since_start": self.collected}


def make_plugin(settings: dict[str, Any], context: PluginContext) -> FeePlugin:
    """The entry point (`jackpay.plugins`: fee). Raises ConfigError for bad settings."""
    try:
        parsed = msgspec.convert(settings, FeeSettings)
        fee = parse_amount(parsed.amount)
        min_payment = parse_amount(parsed.min_payment, allow_zero=True)
    except (msgspec.ValidationError, AmountError) as exc:
        raise ConfigError(str(exc)) from None
    return FeePlugin(fee, parsed.account, min_payment)
