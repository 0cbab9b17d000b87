"""Importing this module registers every job handler with ``control.jobs``."""

from siterecovery.control import protection, test_failover

__all__ = ["protection", "test_failover"]
