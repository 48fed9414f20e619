"""Sans-IO SMTP: command lines, envelope parsing, reply parsing and formatting.

Nothing here does I/O or awaits: feed bytes in, take typed values out.
"""

from sidecar.smtp.commands import (
    Address,
    Command,
    CommandError,
    MailFrom,
    Params,
    RcptTo,
    parse_command,
    parse_mail_from,
    parse_rcpt_to,
)
from sidecar.smtp.lines import LineReader, LineTooLong
from sidecar.smtp.replies import (
    Reply,
    ReplyError,
    ReplyParser,
    ehlo_reply,
    helo_reply,
    parse_ehlo_capabilities,
    reply,
    service_ready,
)

__all__ = [
    "Address",
    "Command",
    "CommandError",
    "LineReader",
    "LineTooLong",
    "MailFrom",
    "Params",
    "RcptTo",
    "Reply",
    "ReplyError",
    "ReplyParser",
    "ehlo_reply",
    "helo_reply",
    "parse_command",
    "parse_ehlo_capabilities",
    "parse_mail_from",
    "parse_rcpt_to",
    "reply",
    "service_ready",
]
