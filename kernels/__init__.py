"""Stateless tensor ops, each with a plain-torch reference: routing, permute, expert FFN, attention, norms, rope, sampling."""
