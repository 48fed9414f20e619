"""Authenticated TLS towards the MX: DANE for SMTP (RFC 7672), MTA-STS (RFC 8461) and the
TLS-RPT results they produce (RFC 8460).

:mod:`sidecar.mxtls.outcome` is the vocabulary the three share: the policy a delivery used
(what the transaction log line and /metrics call ``tls_policy``) and the result of one TLS
session attempt with an MX, as TLS-RPT names it.
"""
