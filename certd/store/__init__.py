"""Where certd keeps what it knows: certificate versions, state, journals, locks (files today)."""
