"""siterecovery: self-hosted site recovery."""

__version__ = "0.1.0"
