"""What operators read: the log, the tamper-evident audit log, metrics and alerts."""
