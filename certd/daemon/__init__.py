"""The long-running service: scheduler, flights, control socket, monitor, and the wiring
(composition root) shared with the CLI."""
