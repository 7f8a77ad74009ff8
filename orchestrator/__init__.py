"""Batch fleet upgrade orchestrator for GaussDB(for MySQL) proxies."""

__version__ = "0.1.0"
