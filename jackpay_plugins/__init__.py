"""Plug-ins shipped with JackPay (each enabled only when the network TOML names it)."""
