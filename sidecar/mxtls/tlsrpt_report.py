"""``sidecar tls-report``: the day's RFC 8460 aggregate reports, one per policy domain that
publishes a TLS-RPT policy (``_smtp._tls.<domain>`` TXT), written as files for the
operator's cron job to send; nothing is sent from here.

For each report: ``<sender>!<policy-domain>!<begin>!<end>.json.gz`` (RFC 8460 section 5.1)
for the ``https:`` URIs of the record (POST it as ``application/tlsrpt+gzip``), and, when the
record has ``mailto:`` URIs, the same name with ``.eml``: the whole e-mail of section 5.3,
ready for ``sendmail``. :attr:`Written.targets` pairs each URI with the file to send.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

from sidecar.errors import ResolutionError
from sidecar.mxtls.tlsrpt import (
    TLSRPT_PREFIX,
    Reporter,
    build_report,
    report_bytes,
    report_filename,
    select_record,
)
from sidecar.mxtls.tlsrpt_store import TlsRptStore

# A TXT look-up: the records' texts, () when there are none; ResolutionError when it failed.
TxtLookup = Callable[[str], Awaitable[Sequence[str]]]


@dataclass
class Written:
    """What one run wrote: ``targets`` as (URI, file) pairs, ``reports`` the report files,
    the domains that publish no (usable) TLS-RPT record, and those whose look-up failed
    (domain, why): their reports can be written by a later run for the same day."""

    reports: list[Path] = field(default_factory=list)
    targets: list[tuple[str, Path]] = field(default_factory=list)
    unpublished: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def report_email(
    reporter: Reporter,
    policy_domain: str,
    report: dict[str, Any],
    data: bytes,
    filename: str,
    sender: str,
    recipients: Sequence[str],
    now: datetime,
) -> EmailMessage:
    """The report as RFC 8460 section 5.3 mails it: ``multipart/report; report-type="tlsrpt"``
    with a human-readable part and the gzip report as an ``application/tlsrpt+gzip``
    attachment; ``TLS-Report-Domain``, ``TLS-Report-Submitter`` and the Subject the RFC
    gives. (Section 5.3 also asks for a DKIM signature of the submitter's domain: the MTA's
    signer adds it on the way out.)"""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = format_datetime(now.astimezone(UTC))
    message["Message-ID"] = make_msgid(domain=reporter.submitter)
    message["Subject"] = (
        f"Report Domain: {policy_domain} Submitter: {reporter.submitter} "
        f"Report-ID: <{report['report-id']}>"
    )
    message["TLS-Report-Domain"] = policy_domain
    message["TLS-Report-Submitter"] = reporter.submitter
    start = report["date-range"]["start-datetime"]
    end = report["date-range"]["end-datetime"]
    message.set_content(
        f"This is an aggregate TLS report (RFC 8460) from {reporter.organization} about the"
        f" TLS sessions with the MX hosts of {policy_domain} from {start} to {end}.\n"
    )
    message.add_attachment(data, maintype="application", subtype="tlsrpt+gzip", filename=filename)
    message.set_type("multipart/report")  # keeps the boundary
    message.set_param("report-type", "tlsrpt")
    return message


def _write_file(path: Path, data: bytes) -> None:
    """``data`` in ``path``, whole or not at all (a temporary file renamed over it)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


async def write_reports(
    store: TlsRptStore,
    day: date,
    reporter: Reporter,
    lookup: TxtLookup,
    output_dir: Path,
    sender: str,
    now: datetime,
) -> Written:
    """The reports of ``day`` (UTC) into ``output_dir``; see the module's docstring.
    ``sender``: the From of the e-mails."""
    written = Written()
    for domain in store.domains(day):
        try:
            texts = await lookup(f"{TLSRPT_PREFIX}{domain}")
        except ResolutionError as error:
            written.failed.append((domain, error.reply.text))
            continue
        record = select_record(texts)
        if record is None:
            written.unpublished.append(domain)
            continue
        report = build_report(reporter, domain, day, store.tallies(day, domain))
        data = report_bytes(report)
        name = report_filename(reporter.submitter, domain, day)
        path = output_dir / name
        _write_file(path, data)
        written.reports.append(path)
        mail = path
        if record.mailto:
            message = report_email(reporter, domain, report, data, name, sender, record.mailto, now)
            mail = output_dir / (name.removesuffix(".json.gz") + ".eml")
            _write_file(mail, message.as_bytes())
        for target in record.targets:
            written.targets.append((target, mail if target.startswith("mailto:") else path))
    return written
