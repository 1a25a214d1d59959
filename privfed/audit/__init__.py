"""Empirical privacy auditing: one-run audits next to the theoretical epsilon."""
