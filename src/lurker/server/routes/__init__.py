"""One router per resource of the explorer's JSON API (see docs/explorer.md)."""
