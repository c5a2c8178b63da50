"""What is really served: the TLS handshake probe, and drift between what should be and what is."""
