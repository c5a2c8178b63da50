"""Talking to the CA (RFC 8555, RFC 9773): the transport, the issuer (account, order,
challenges, finalize, ARI, revoke) and the challenge solvers."""
