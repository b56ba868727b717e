"""Shared by every JackPay process: framing, messages, error codes, money, config.

Nothing in this package opens a socket except `common.aio`, a thin asyncio shell around
the pure codec in `common.framing`.
"""

PROTOCOL_VERSION = 6
