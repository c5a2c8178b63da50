"""The pure core: the model, when to renew (policy), the rotation state machine, the CA's
problem table (retry), errors, lifecycle events and the clock. Nothing here does I/O or imports
anything above it."""
