"""maxnucl: outgoing-connection heterogeneity in the feed-forward layers of LLMs."""

__version__ = "0.1.0"
