"""Who may do what: access tokens and sessions, per-client limits, the daily budget."""
