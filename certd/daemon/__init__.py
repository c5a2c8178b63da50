"""The long-running service: :mod:`~certd.daemon.service` (the Daemon's life cycle and config
reload), :mod:`~certd.daemon.jobs` (what the worker pool runs), :mod:`~certd.daemon.api` (the
control socket's handlers) over :mod:`~certd.daemon.control` (its transport), the scheduler and
flights, the drift monitor, systemd's protocol, and the wiring (composition root) shared with
the CLI."""
