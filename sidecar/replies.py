"""The sidecar's replies to its clients: every reply the sidecar itself gives (DESIGN.md rule
4) is made here or in :mod:`sidecar.smtp.replies`, whose protocol replies (syntax, sequence,
limits, the DATA rules) this module re-exports, so that the application has one catalogue.
What is defined here knows the application: routes, bindings and HAProxy, the MX, DNS, the
server's own state. The MX's replies are passed through as parsed, never made.

Codes: RFC 5321 section 4.2 for the reply code (4xx where a retry can succeed, 5xx only where
none can: DESIGN.md invariant 1) and RFC 3463 for the enhanced status code.
"""

from __future__ import annotations

from sidecar.smtp.replies import (
    BAD_BODY,
    BAD_RECIPIENT_SYNTAX,
    BAD_SENDER_SYNTAX,
    BARE_NEWLINE,
    DATA_TAKES_NO_ARGUMENT,
    EHLO_NEEDS_DOMAIN,
    GOODBYE,
    HELO_NEEDS_DOMAIN,
    HELP,
    HELP_LMTP,
    LHLO_NEEDS_DOMAIN,
    LINE_TOO_LONG,
    MESSAGE_TOO_BIG,
    NEED_HELLO,
    NEED_LHLO,
    NEED_MAIL_BEFORE_DATA,
    NEED_MAIL_BEFORE_RCPT,
    NEED_RCPT_BEFORE_DATA,
    NESTED_MAIL,
    NO_VALID_RECIPIENTS,
    NO_VALID_RECIPIENTS_LMTP,
    NON_ASCII_ADDRESS,
    NON_ASCII_HEADER,
    NOT_IMPLEMENTED,
    OK,
    PARAM_SYNTAX,
    RECIPIENT_NEEDS_DOMAIN,
    SENDER_OK,
    SIZE_NOT_A_NUMBER,
    SYNTAX_ERROR,
    TOO_MANY_ERRORS,
    TOO_MANY_RECIPIENTS,
    UNKNOWN_COMMAND,
    USE_LHLO,
    VRFY_CANNOT,
    Reply,
    ehlo_reply,
    helo_reply,
    reply,
    service_ready,
    unsupported_parameter,
)

__all__ = [
    "ACCESS_DENIED",
    "BAD_BODY",
    "BAD_RECIPIENT_SYNTAX",
    "BAD_SENDER_SYNTAX",
    "BARE_NEWLINE",
    "DATA_TAKES_NO_ARGUMENT",
    "EHLO_NEEDS_DOMAIN",
    "GOODBYE",
    "HELO_NEEDS_DOMAIN",
    "HELP",
    "HELP_LMTP",
    "LHLO_NEEDS_DOMAIN",
    "LINE_TOO_LONG",
    "LOCAL_ERROR_CLOSING",
    "MESSAGE_TOO_BIG",
    "NEED_HELLO",
    "NEED_LHLO",
    "NEED_MAIL_BEFORE_DATA",
    "NEED_MAIL_BEFORE_RCPT",
    "NEED_RCPT_BEFORE_DATA",
    "NESTED_MAIL",
    "NON_ASCII_ADDRESS",
    "NON_ASCII_HEADER",
    "NOT_IMPLEMENTED",
    "NO_VALID_RECIPIENTS",
    "NO_VALID_RECIPIENTS_LMTP",
    "OK",
    "OTHER_ROUTE",
    "PARAM_SYNTAX",
    "RECIPIENT_NEEDS_DOMAIN",
    "SENDER_OK",
    "SHUTTING_DOWN",
    "SIZE_NOT_A_NUMBER",
    "SMTPUTF8_NOT_SUPPORTED_RECIPIENT",
    "SMTPUTF8_NOT_SUPPORTED_SENDER",
    "SYNTAX_ERROR",
    "TIMEOUT",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_ERRORS",
    "TOO_MANY_RECIPIENTS",
    "UNKNOWN_COMMAND",
    "USE_LHLO",
    "VRFY_CANNOT",
    "Reply",
    "binding_unplumbed",
    "dane_no_usable_mx",
    "dane_tlsa_failed",
    "dns_temporary",
    "ehlo_reply",
    "group_unplumbed",
    "helo_reply",
    "local_resource_shortage",
    "local_tls_error",
    "mx_bad_reply",
    "mx_connection_lost",
    "mx_timed_out",
    "no_mail_domain",
    "no_mx_address",
    "no_mx_reachable",
    "no_such_domain",
    "no_usable_mx_address",
    "null_mx",
    "proxy_unreachable",
    "reply",
    "service_ready",
    "setup_timed_out",
    "shaping_limit_reached",
    "shaping_suspended",
    "tls_policy_failed",
    "unsupported_parameter",
]

# Recipients and transactions
OTHER_ROUTE = reply(452, "4.5.3", "Recipient on another route, send it in a new transaction")

SMTPUTF8_NOT_SUPPORTED_SENDER = reply(
    553, "5.6.7", "The MX does not support SMTPUTF8, which the sender address needs"
)
SMTPUTF8_NOT_SUPPORTED_RECIPIENT = reply(
    553, "5.6.7", "The MX does not support SMTPUTF8, which this recipient address needs"
)

ACCESS_DENIED = reply(554, "5.7.1", "Access denied")


# Routing and delivery failures (DESIGN.md sections 4 and 5)
def no_such_domain(domain: str) -> Reply:
    return reply(550, "5.1.2", f"Domain {domain} does not exist")


def no_mail_domain(domain: str) -> Reply:
    return reply(550, "5.1.2", f"Domain {domain} has no mail exchanger and no address")


def null_mx(domain: str) -> Reply:
    return reply(556, "5.1.10", f"Domain {domain} does not accept mail (null MX)")


def dns_temporary(domain: str, why: str) -> Reply:
    return reply(451, "4.4.3", f"DNS lookup for {domain} failed temporarily ({why}), try later")


def no_mx_address(domain: str) -> Reply:
    return reply(451, "4.4.3", f"No MX host of {domain} has an address, try later")


def binding_unplumbed(binding: str, servers: str) -> Reply:
    return reply(451, "4.4.1", f"No HAProxy server of binding {binding} is up ({servers})")


def group_unplumbed(group: str) -> Reply:
    return reply(451, "4.4.1", f"No binding of group {group} has an HAProxy server up")


def no_usable_mx_address(domain: str, binding: str, detail: str) -> Reply:
    return reply(451, "4.4.4", f"No usable MX address for {domain} via {binding}: {detail}")


def proxy_unreachable(binding: str, errors: str) -> Reply:
    return reply(451, "4.4.1", f"Cannot reach HAProxy for binding {binding}: {errors}")


def no_mx_reachable(domain: str, problems: str) -> Reply:
    return reply(451, "4.4.1", f"No MX of {domain} reachable: {problems}")


# TLS policies towards the MX (issue 13): RFC 3463 X.7.5 "cryptographic failure" when an MX
# failed its policy's check (a DANE or PKIX mismatch, a TLSA look-up that failed), X.7.4
# "security features not supported" when a policy requires STARTTLS and the MX did not offer
# it (the codes Postfix uses for the same failures). Always 4xx: DNS and certificates change,
# and the MTA retries (issue 13: never a 5xx for a TLS policy failure).
def dane_tlsa_failed(host: str, owner: str) -> Reply:
    """The TLSA look-up of a DNSSEC-secure MX host failed (SERVFAIL: bogus, or the resolver
    could not get an answer; a timeout): RFC 7672 section 2.2 says that host must not be used."""
    return reply(451, "4.7.5", f"DANE: TLSA lookup for {owner} failed, MX {host} not used")


def dane_no_usable_mx(domain: str, detail: str) -> Reply:
    """Every MX host of a DANE domain was left out before connecting (its TLSA look-up
    failed); ``detail`` says why for the first ones."""
    return reply(451, "4.7.5", f"No usable MX for {domain}: {_plain(detail, 300)}")


def tls_policy_failed(domain: str, enhanced: str, problems: str) -> Reply:
    """No MX of ``domain`` met the TLS policy that applies to it; ``problems`` names each
    failure, e.g. "mx.example[192.0.2.1]: DANE: certificate does not match TLSA"."""
    return reply(
        451, enhanced, f"TLS policy not met by any MX of {domain}: {_plain(problems, 300)}"
    )


# MTA-STS (RFC 8461 section 5): an "enforce" policy that no MX satisfies. 451 (a policy or a
# certificate may be fixed; RFC 8461 section 5 says to treat the mail as undeliverable only
# after the MTA's own retries) with RFC 3463 / RFC 7372 X.7.5 "cryptographic failure".
def sts_no_mx(domain: str, policy_id: str, detail: str) -> Reply:
    """No MX host of ``domain`` may take the mail under its MTA-STS policy (``detail``:
    none matches its mx patterns)."""
    return reply(451, "4.7.5", f"MTA-STS policy of {domain} (enforce, id {policy_id}): {detail}")


def sts_no_mx_reachable(domain: str, policy_id: str, problems: str) -> Reply:
    """Every MX the MTA-STS "enforce" policy of ``domain`` allows failed (a certificate that
    does not chain or name the host, no STARTTLS, unreachable): never plaintext."""
    return reply(
        451,
        "4.7.5",
        f"MTA-STS policy of {domain} (enforce, id {policy_id}): no MX delivered with"
        f" verified TLS: {problems}",
    )


def setup_timed_out(seconds: float) -> Reply:
    """The whole upstream set-up (``delivery.setup_timeout``) ran out before the RCPT reply."""
    return reply(
        451, "4.4.1", f"Timed out after {seconds:g}s setting up delivery to the MX, try later"
    )


def local_tls_error(why: str) -> Reply:
    """The sidecar's own TLS set-up failed (e.g. its CA bundle): no MX is to blame."""
    return reply(451, "4.3.0", f"Local error setting up TLS towards the MX ({why}), try later")


def local_resource_shortage(what: str) -> Reply:
    """The sidecar itself ran short (``what`` names the errno, e.g. "EMFILE: Too many open
    files"): neither HAProxy's nor the MX's fault (DESIGN.md invariant 5)."""
    return reply(451, "4.3.0", f"Local resource shortage in the sidecar ({what}), try later")


def mx_bad_reply(why: str) -> Reply:
    """The MX answered with something that is not a usable SMTP reply (``why``: e.g. "reply
    longer than 16384 bytes"); the sidecar closed the connection and passes none of it on."""
    return reply(451, "4.5.0", f"The MX sent an unusable reply ({why}), try later")


def mx_connection_lost(when: str) -> Reply:
    return reply(
        451, "4.4.2", f"Connection to the MX lost {when}; message not delivered, try later"
    )


def mx_timed_out(when: str, detail: str) -> Reply:
    """The MX did not answer (or read) within its step's time limit; ``detail`` says which
    wait, e.g. "no reply within 300s"."""
    return reply(
        451,
        "4.4.2",
        f"Timed out waiting for the MX {when} ({detail}); message not delivered, try later",
    )


# Traffic shaping (issue 12). 451 (transient, the session stays open for the MTA's other
# recipients; 421 would close it) with RFC 3463 X.4.5 "mail system congestion": the path to
# the site is congested, by its configured limits or because the receiver asked us to slow
# down. Not X.7.x: that is a security/policy refusal, which bounce classifiers read as a block.
def _show_site(site: str) -> str:
    """A site in a reply: an unnamed site (every MX host name) cut to a readable length."""
    return site if len(site) <= 80 else site[:77] + "..."


def _plain(text: str, most: int = 120) -> str:
    """Text from elsewhere (a reason, an MX's reply) made safe for a reply line: printable
    ASCII, at most ``most`` characters."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean if len(clean) <= most else clean[: most - 3] + "..."


def shaping_limit_reached(source: str, site: str, limit: str, value: str) -> Reply:
    """``limit`` (e.g. "connection_limit") of the egress path (``source`` x ``site``) is
    reached and the expected wait is over shaping.max_wait."""
    return reply(
        451,
        "4.4.5",
        f"Egress {source} to site {_show_site(site)}: {limit} {value} reached, try later",
    )


def shaping_suspended(source: str, site: str, seconds: float, reason: str) -> Reply:
    """The egress path is suspended (a rule matched the MX's reply, or by hand) for
    ``seconds`` more."""
    return reply(
        451,
        "4.4.5",
        f"Egress {source} to site {_show_site(site)} suspended for {seconds:.0f}s "
        f"({_plain(reason)}), try later",
    )


# Connection-level
TIMEOUT = reply(421, "4.4.2", "Timeout, closing connection")
SHUTTING_DOWN = reply(421, "4.3.0", "Service shutting down")
TOO_MANY_CONNECTIONS = reply(421, "4.3.2", "Too many connections, try again later")
LOCAL_ERROR_CLOSING = reply(421, "4.3.0", "Local error in processing, closing connection")
