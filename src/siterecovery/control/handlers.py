"""Importing this module registers every job handler with ``control.jobs``."""

from siterecovery.control import failover, protection, test_failover

__all__ = ["failover", "protection", "test_failover"]
