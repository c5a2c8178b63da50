"""Private keys and certificate checks."""
