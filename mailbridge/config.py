"""config.yaml -> frozen, validated objects, once, at start.

Input: a YAML file (SPEC section 6) where `${VAR}` / `${VAR:-default}` read the
environment. Output: a `Config`. Failure: `ConfigError` carrying every problem
found, each naming its key (`accounts[0].keyid: field required`).
Relative paths are read relative to the directory of the config file.

Every field carries its `description` (and each section model its docstring):
they are docs/configuration.md. After adding or changing a key, run
`python -m mailbridge.config_doc --write`; tests/test_configuration_doc.py
fails on a key without a description or a reference that differs.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

DEFAULT_MAX_MESSAGE_BYTES = 10 * 1024 * 1024
SENDER_ID_RE = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9]{4,11}$")
NUMERIC_SENDER_RE = re.compile(r"^\+?[0-9]{3,15}$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """Invalid configuration: `problems` lists `key: message` lines."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


def _relative_to_config(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        return Path(base) / value
    return value


ConfigPath = Annotated[Path, AfterValidator(_relative_to_config)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TlsConfig(_Model):
    """STARTTLS for the intake (docs/security.md). The files are loaded here, at
    check time, so that a bad path or a key that does not match the certificate
    stops the daemon at start with a message naming the key."""

    cert: ConfigPath = Field(description="PEM certificate chain, the server's certificate first.")
    key: ConfigPath = Field(description="PEM private key (mode 0600, readable by the daemon only).")
    required: bool = Field(
        default=False,
        description="`true`: every command but EHLO, NOOP, STARTTLS and QUIT before STARTTLS"
        " gets `530 5.7.0`.",
    )

    @model_validator(mode="after")
    def _loadable(self) -> TlsConfig:
        import ssl

        for name in ("cert", "key"):
            try:
                getattr(self, name).read_bytes()
            except OSError as err:
                raise ValueError(
                    f"{name}: cannot read {getattr(self, name)}: {err.strerror}"
                ) from None
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                str(self.cert), str(self.key)
            )
        except (ssl.SSLError, ValueError) as err:
            raise ValueError(f"cert/key: not a matching PEM certificate and key ({err})") from None
        return self


class SmtpConfig(_Model):
    """The SMTP intake (SPEC section 1): where clients (or the MTA in front) submit
    requests. Every key has a default: the section may be left out."""

    listen: str = Field(
        default="127.0.0.1:2525",
        description="`host:port` the intake listens on (`[::1]:2525` for IPv6;"
        " `0.0.0.0:25` behind a firewall).",
    )
    recipients: list[str] = Field(
        default_factory=lambda: ["sendsms@localhost"],
        min_length=1,
        description="The only RCPT TO addresses accepted (any case); any other gets"
        " `550 5.1.1`: never an open relay.",
    )
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        gt=0,
        description="Larger mail gets `552 5.3.4` (at MAIL with `SIZE=`, or after DATA).",
    )
    hostname: str | None = Field(
        default=None, description="The name in the greeting; none: the machine's FQDN."
    )
    timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Seconds a client may stay silent between commands, and the most the"
        " whole DATA transfer may take; then `421 4.4.2` and the connection is closed.",
    )
    max_connections: int = Field(
        default=200,
        gt=0,
        description="Connections at once, in all; more get `421 4.7.0` and are closed.",
    )
    max_connections_per_ip: int = Field(
        default=50,
        gt=0,
        description="Connections at once from one client address (an IPv6 /64 counts as"
        " one); more get `421 4.7.0`. Behind an MTA on this host every connection comes"
        " from 127.0.0.1: this is then the MTA's concurrency (Postfix uses up to 20 per"
        " destination).",
    )
    # Rate limits are token buckets in memory: the limit at once, then one more
    # every rate_window_s / limit seconds.
    rate_window_s: float = Field(
        default=60.0,
        gt=0,
        description="The window of `ip_rate_limit`, `auth_failure_limit` and the"
        " accounts' `rate_limit`, in seconds.",
    )
    ip_rate_limit: int = Field(
        default=0,
        ge=0,
        description="Messages (MAIL commands) per window from one client address; past it"
        " MAIL gets `450 4.7.1` and the client's MTA retries later. 0: no limit, so that"
        " an ERP's burst is absorbed at once; set it on a listener open to many hosts"
        " (e.g. 600). Behind an MTA on this host leave it 0 and let the MTA limit its"
        " clients.",
    )
    auth_failure_limit: int = Field(
        default=10,
        ge=1,
        description="Failed AUTH per window from one client address; past it AUTH gets"
        " `454 4.7.0`, even with the right password, until the window allows again.",
    )
    tls: TlsConfig | None = Field(
        default=None, description="STARTTLS on the intake; none: no STARTTLS (and no AUTH)."
    )
    number_domains: list[str] = Field(
        default_factory=list,
        description="Plain mode (SPEC section 9): `RCPT TO:<0601020304@sms.example>` for"
        " these domains takes the number from the local part. Empty: off.",
    )

    @field_validator("number_domains")
    @classmethod
    def _number_domains(cls, v: list[str]) -> list[str]:
        domains = [d.strip().lower().lstrip("@") for d in v]
        for domain in domains:
            if not domain or "@" in domain or any(c.isspace() for c in domain):
                raise ValueError(f"{domain!r} is not a domain (e.g. sms.example.com)")
        return domains

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_hostport(v)
        return v

    @field_validator("recipients")
    @classmethod
    def _recipients(cls, v: list[str]) -> list[str]:
        for addr in v:
            if "@" not in addr:
                raise ValueError(f"{addr!r} is not an email address")
        return [a.lower() for a in v]


class StoreConfig(_Model):
    """The durable queue, the daemon's only state: set exactly one of `sqlite` (one
    daemon per file) or `postgresql` (several instances, docs/deployment.md)."""

    sqlite: ConfigPath | None = Field(
        default=None,
        description="The SQLite file (created at the first start, with `<file>.lock`"
        " beside it: one daemon per file).",
    )
    postgresql: str | None = Field(
        default=None,
        description="Instead of `sqlite`: `postgresql://user:password@host:5432/database`,"
        " shared by several instances (docs/deployment.md).",
    )
    synchronous: Literal["full", "normal"] = Field(
        default="full",
        description="SQLite: `full`, a `250` survives power loss (an fsync per commit);"
        " `normal`, it survives a crash of the daemon but the last commits may be lost"
        " on power loss.",
    )
    busy_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="How long a write waits for a lock held by another process (or for"
        " the PostgreSQL database) before the intake answers `451 4.3.0` (the client"
        " retries later).",
    )
    max_size_mb: float | None = Field(
        default=None,
        gt=0,
        description="SQLite: cap on the database file (`max_page_count`), in MiB; past it"
        " new mail gets `451 4.3.0` instead of filling the disk. None: no cap.",
    )
    pool_size: int = Field(
        default=4,
        ge=1,
        le=100,
        description="PostgreSQL: connections each process keeps in its pool, each checked"
        " before use.",
    )
    retention_days: float = Field(
        default=90.0,
        gt=0,
        description="Finished requests older than this lose their recipients and reports"
        " (a daily purge in the daemon, and `mailbridge purge`); their (account, emailId)"
        " stays, so that a late duplicate still gets Ack 1.",
    )

    @field_validator("postgresql")
    @classmethod
    def _postgresql(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"postgres(ql)?://", v):
            raise ValueError("a URL: postgresql://user:password@host:5432/database")
        return v

    @model_validator(mode="after")
    def _one_backend(self) -> StoreConfig:
        if (self.sqlite is None) == (self.postgresql is None):
            raise ValueError("set exactly one of store.sqlite or store.postgresql")
        return self


class RelayConfig(_Model):
    """The SMTP relay that delivers the report mails (Postfix on this host, or your
    provider's submission server)."""

    host: str = Field(description="The relay's host name or address.")
    port: int = Field(default=25, description="Its port (587 for submission, 465 with `tls`).")
    starttls: bool = Field(default=False, description="Upgrade with STARTTLS after connecting.")
    tls: bool = Field(default=False, description="Implicit TLS from the first byte (port 465).")
    username: str | None = Field(
        default=None, description="AUTH user name (with `password`); none: no AUTH."
    )
    password: str | None = Field(default=None, description="AUTH password; use `${VAR}`.")
    timeout_s: float = Field(default=30.0, gt=0, description="Per connection and per command.")
    connections: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Reports in flight at once, each on its own reused connection, so that"
        " a burst of Nots is not paced by one connection's round trips (a request's Ack"
        " always goes before its Not).",
    )


class ReportsConfig(_Model):
    """The report mails (Ack, Not, etatDlr, replies, plain-mode reports): set exactly
    one of `maildir` or `smtp`."""

    from_address: str = Field(
        default="mailbridge@localhost", alias="from", description="`From:` of every report mail."
    )
    envelope_from: str = Field(
        default="",
        description="Envelope sender of the reports. Empty: the null sender `<>` of RFC"
        " 3834, so that no bounce can come back; set an address if your relay refuses"
        " `MAIL FROM:<>`.",
    )
    maildir: ConfigPath | None = Field(
        default=None,
        description="Deliver the reports into this Maildir (`new/` holds the mails; the"
        " file name is derived from the report, so none is delivered twice)...",
    )
    smtp: RelayConfig | None = Field(default=None, description="...or through this SMTP relay.")
    retry_backoff_s: float = Field(
        default=30.0, gt=0, description="First wait after a failed delivery; it doubles."
    )
    retry_max_backoff_s: float = Field(
        default=3600.0, gt=0, description="The most the wait between two deliveries grows to."
    )
    max_age_s: float = Field(
        default=5 * 86400.0,
        gt=0,
        description="A report the relay keeps refusing temporarily (4xx, no connection)"
        " is retried this long after it was made (as Postfix's queue), then `failed`; a"
        " permanent refusal (5xx) fails it at once. `mailbridge reports list --state"
        " failed` lists them, `mailbridge reports retry ID` tries one again.",
    )
    delivery_report_delay: float = Field(
        default=3600.0,
        gt=0,
        description="etatDlr mails (SPEC section 7): one per request once every sent"
        " recipient has its final status, or this many seconds after the Not with those"
        " final by then (the rest follow, at most every delay).",
    )
    delivery_report_max_age: float = Field(
        default=3 * 86400.0,
        gt=0,
        description="No etatDlr mail later than this after the Not.",
    )

    @model_validator(mode="after")
    def _one_sink(self) -> ReportsConfig:
        if (self.maildir is None) == (self.smtp is None):
            raise ValueError("set exactly one of reports.maildir or reports.smtp")
        return self


class HttpTlsConfig(_Model):
    """TLS on the HTTP receiver, for a port providers reach without a reverse proxy."""

    cert: ConfigPath = Field(description="PEM certificate chain, the server's certificate first.")
    key: ConfigPath = Field(description="PEM private key.")

    @model_validator(mode="after")
    def _loadable(self) -> HttpTlsConfig:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                str(self.cert), str(self.key)
            )
        except (OSError, ssl.SSLError, ValueError) as err:
            raise ValueError(
                f"cert/key: cannot load a matching PEM certificate and key ({err})"
            ) from None
        return self


class HttpConfig(_Model):
    """The HTTP receiver (SPEC section 7): provider callbacks (delivery reports,
    replies, STOP), `/healthz` and `/metrics` (docs/feedback.md). Optional: without
    it, no callbacks are received."""

    listen: str = Field(default="127.0.0.1:8025", description="`host:port` of the receiver.")
    token: str = Field(
        min_length=16,
        repr=False,
        description="The shared secret in the callback paths (`/hooks/<token>/cm`); never"
        " logged. `openssl rand -hex 16`.",
    )
    tls: HttpTlsConfig | None = Field(
        default=None,
        description="TLS on the receiver itself, for a port providers reach without"
        " a reverse proxy.",
    )
    public_url: str | None = Field(
        default=None,
        description="The receiver's address as providers reach it"
        " (`https://sms.example.com`): when set, sMsmode requests carry their"
        " notification URLs; CM and Kcell take the URL in their consoles"
        " (docs/providers.md).",
    )
    # Hardening: aiohttp's defaults keep idle connections an hour and read a body
    # with no deadline.
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Larger callback bodies are refused (413)."
    )
    max_header_bytes: int = Field(default=8190, ge=1024, description="Longest request header line.")
    max_headers: int = Field(default=64, ge=8, description="Most header lines in a request.")
    keepalive_s: float = Field(
        default=15.0, gt=0, description="An idle keep-alive connection is closed after this."
    )
    body_timeout_s: float = Field(
        default=10.0, gt=0, description="The most reading one request body may take."
    )
    max_connections: int = Field(
        default=256, ge=1, description="Connections at once; more are closed at once."
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_hostport(v)
        return v

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://[^/\s]+", v):
            raise ValueError(f"{v!r}: an absolute http(s) URL, e.g. https://sms.example.com")
        return None if v is None else v.rstrip("/")


class _ProviderBase(_Model):
    timeout_s: float = Field(default=10.0, gt=0, description="Per HTTP request, in seconds.")
    retry_attempts: int = Field(
        default=3, ge=1, description="Attempts on this provider, the first included."
    )
    retry_backoff_s: float = Field(
        default=1.0,
        ge=0,
        description="Wait before the second attempt; it doubles (1, 2, 4 s...), with ±20% jitter.",
    )
    circuit_failures: int = Field(
        default=3,
        ge=1,
        description="Circuit breaker: after this many failed calls in a row the provider"
        " is skipped (the route fails over at once) for `circuit_cooldown_s`, then one"
        " call tries it again.",
    )
    circuit_cooldown_s: float = Field(
        default=30.0, gt=0, description="How long an open circuit skips the provider."
    )


class OutboxProviderConfig(_ProviderBase):
    """Writes one JSON line per recipient SMS instead of sending it (the embedded
    default, for trying mailbridge and for tests)."""

    type: Literal["outbox"]
    path: ConfigPath = Field(description="The JSON-lines file (fsynced per message).")


class CmProviderConfig(_ProviderBase):
    """CM.com business messaging, JSON gateway."""

    type: Literal["cm"]
    url: str = Field(
        default="https://gw.cmtelecom.com/v1.0/message", description="The gateway URL."
    )
    product_token: str = Field(min_length=1, description="CM's product token; use `${VAR}`.")


class SmsmodeProviderConfig(_ProviderBase):
    """sMsmode HTTP API 1.6."""

    type: Literal["smsmode"]
    url: str = Field(default="https://api.smsmode.com/http/1.6/", description="The API's base URL.")
    access_token: str = Field(min_length=1, description="sMsmode's access token; use `${VAR}`.")
    notification_url: str | None = Field(
        default=None,
        description="Sent with every message (`notification_url`) so that sMsmode calls"
        " our receiver back with delivery reports; none: derived from `http.public_url`.",
    )
    reply_notification_url: str | None = Field(
        default=None,
        description="The same for replies (`notification_url_reponse`); none: derived"
        " from `http.public_url`.",
    )


class KcellProviderConfig(_ProviderBase):
    """Kcell SMSGW2 REST API v2."""

    type: Literal["kcell"]
    url: str = Field(
        default="https://api.kcell.kz/app/smsgw/rest/v2", description="The API's base URL."
    )
    username: str = Field(min_length=1, description="HTTP Basic user name.")
    password: str = Field(min_length=1, description="HTTP Basic password; use `${VAR}`.")
    time_bounds: Literal["def", "wd99", "wd911", "ad96", "ad99", "ad911", "full"] | None = Field(
        default="full",
        description="When SMSGW may deliver. Its own default, `def`, is weekdays"
        " 09:00-18:00; mailbridge applies quiet hours itself, hence `full`. Null omits"
        " the field.",
    )


class SmppProviderConfig(_ProviderBase):
    """An SMPP 3.4 SMSC (SPEC section 10; docs/providers.md "SMPP")."""

    type: Literal["smpp"]
    host: str = Field(min_length=1, description="The SMSC's host name or address.")
    port: int = Field(
        default=2775, ge=1, le=65535, description="Its port (2775 usually; TLS ports vary)."
    )
    tls: bool = Field(
        default=False, description="TLS to the SMSC (its port is then usually 3550 or 8775)."
    )
    # SMPP 3.4 sizes: system_id at most 15 characters, password 8, system_type 12.
    system_id: str = Field(
        min_length=1, max_length=15, description="The bind's system_id (≤ 15 characters)."
    )
    password: str = Field(
        default="", max_length=8, repr=False, description="Its password (≤ 8); use `${VAR}`."
    )
    system_type: str = Field(
        default="", max_length=12, description="system_type, when the operator asks for one."
    )
    binds: int = Field(default=1, ge=1, le=16, description="Transceiver binds kept open.")
    window: int = Field(
        default=10, ge=1, le=1000, description="submit_sm without a response, per bind."
    )
    throughput: float = Field(
        default=50.0,
        ge=0,
        description="Message parts per second, all binds together (0: no limit): what the"
        " contract allows; above it the SMSC answers ESME_RTHROTTLED.",
    )
    enquire_link_s: float = Field(
        default=30.0, gt=0, description="An idle bind is checked (enquire_link) this often."
    )
    response_timeout_s: float = Field(
        default=10.0, gt=0, description="Wait for any response (the bind's too) this long."
    )
    registered_delivery: bool = Field(default=True, description="Ask for a receipt for every part.")
    message_id_format: Literal["same", "hex_to_dec", "dec_to_hex"] = Field(
        default="same",
        description="How receipts write the submit_sm_resp message_id: as it is, that hex"
        " id in decimal (`hex_to_dec`), or that decimal id in hex (`dec_to_hex`).",
    )
    data_coding_gsm7: int = Field(
        default=0, ge=0, le=255, description="data_coding for GSM-7 text (some SMSCs want 1)."
    )

    @field_validator("system_id", "password", "system_type")
    @classmethod
    def _ascii(cls, v: str) -> str:
        if not v.isascii() or "\0" in v:
            raise ValueError("SMPP C-octet strings are ASCII without NUL")
        return v


ProviderConfig = Annotated[
    OutboxProviderConfig
    | CmProviderConfig
    | SmsmodeProviderConfig
    | KcellProviderConfig
    | SmppProviderConfig,
    Field(discriminator="type"),
]


class RouteConfig(_Model):
    """One routing rule: the first whose prefix starts the number wins."""

    prefix: str = Field(
        default="",
        description="Matched against the E.164 number (`+7`, `+336`; `7` and `007` read"
        " as `+7`); empty matches every number.",
    )
    providers: list[str] = Field(
        min_length=1,
        description="Names under `providers`, in failover order.",
    )

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.strip().replace(" ", "")
        if v and not v.startswith("+"):
            v = "+" + v.removeprefix("00")
        if v and not v[1:].isdigit():
            raise ValueError(f"{v!r}: a prefix is '+' and digits, e.g. '+7' or '+336'")
        return v


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PlainConfig(_Model):
    """Plain mode for one account (SPEC section 9): mails to number addresses."""

    enabled: bool = Field(
        default=False, description="Take plain-mode mails (number addresses) for this account."
    )
    senders: list[str] = Field(
        default_factory=list,
        description="Who may send plain mails for this account: addresses"
        " (`alarm@masociete.com`) or whole domains with a leading @ (`@masociete.com`)."
        " MAIL FROM and every `From:` address must match; with `smtp_password`, AUTH is"
        " required too.",
    )
    text: Literal["body", "subject", "subject_body"] = Field(
        default="body",
        description="The SMS text: the body (the Subject when the body is empty), the"
        " Subject, or the Subject, a line break and the body.",
    )
    cut_markers: list[str] = Field(
        default_factory=list,
        description="The body is cut at the first of these (any case), e.g. `--end`,"
        " `Envoyé de mon iPhone`; the `-- ` signature always.",
    )
    reports: Literal["failures", "all", "none"] = Field(
        default="failures",
        description="Plain-text report mails to the sender: only for numbers that failed,"
        " for every number, or none.",
    )

    @field_validator("senders")
    @classmethod
    def _senders(cls, v: list[str]) -> list[str]:
        out = []
        for sender in v:
            sender = sender.strip().lower()
            local, at, domain = sender.rpartition("@")
            if not at or not domain or "@" in local or any(c.isspace() for c in sender):
                raise ValueError(f"{sender!r}: write an address (a@example.com) or @example.com")
            out.append(sender)
        return out

    def allows(self, address: str) -> bool:
        """Whether `address` is one of the senders (an address or in a listed @domain)."""
        address = address.lower()
        return address in self.senders or "@" + address.rpartition("@")[2] in self.senders


class AccountConfig(_Model):
    """One client account: its key, who may send for it, where its SMS go and the
    rules they follow (SPEC sections 2-4)."""

    # repr=False keeps the secrets out of any repr of the config.
    keyid: str = Field(
        min_length=1,
        repr=False,
        description="The secret clients put in `<keyid>`: compared in constant time, never logged.",
    )
    name: str | None = Field(
        default=None,
        description="For logs and the commands' `--account`, and the SMTP AUTH user name;"
        " none: `key-` and 8 hex digits of a SHA-256 of the keyid.",
    )
    sender_domains: list[str] = Field(
        default_factory=list,
        description="Who may send: MAIL FROM and `From:` must both be in these domains, or"
        " in `sender_addresses` (set at least one of the two).",
    )
    sender_addresses: list[str] = Field(
        default_factory=list, description="Who may send: these exact addresses."
    )
    allowed_ips: list[IpNetwork] | None = Field(
        default=None,
        description="Client addresses (CIDR) allowed to submit for this account; none: any.",
    )
    smtp_password: str | None = Field(
        default=None,
        repr=False,
        description="SMTP AUTH (PLAIN/LOGIN, only after STARTTLS: needs `smtp.tls`) as"
        " user `name`. When set, this account only takes requests from sessions"
        " authenticated as it; others get `530 5.7.0`. At least 12 characters; use"
        " `${VAR}`.",
    )
    rate_limit: int | None = Field(
        default=None,
        ge=1,
        description="Messages accepted for this account per `smtp.rate_window_s`; past it"
        " the end of DATA gets `450 4.7.1` (nothing stored, the client's MTA retries)."
        " None: no limit.",
    )
    provider: str | None = Field(
        default=None,
        description="The provider (a name under `providers`) every SMS of this account"
        " goes through; set exactly one of `provider` and `routes`.",
    )
    routes: list[RouteConfig] | None = Field(
        default=None,
        description="Instead of `provider`: rules by number prefix, first match wins,"
        " each with a failover list.",
    )
    default_sender: str | None = Field(
        default=None,
        description="Sender id when the request has no `<emetteur>`: 4-11 letters and"
        " digits (not only digits), or a phone number.",
    )
    senders: list[str] | None = Field(
        default=None, description="Allowed `<emetteur>` values; none: any valid sender id."
    )
    commercial: bool = Field(
        default=True,  # iSendPro's default: lifting the restriction is explicit
        description="Marketing traffic: no SMS 20:00-08:00, Sundays and French holidays"
        " (`quiet_hours`), and `STOP SMS au <stop_number>` appended under a sender id.",
    )
    quiet_hours: Literal["reject", "defer"] = Field(
        default="reject",
        description="Commercial accounts in quiet hours: `reject` (code 24), or `defer`"
        " (sent at 08:00 of the next allowed day).",
    )
    holiday_subdivision: str | None = Field(
        default=None,
        description="A subdivision of the holidays package adding local holidays (`57`,"
        " `6AE`: Alsace-Moselle).",
    )
    transliterate: bool = Field(
        default=False,
        description="Map `ç ê â î ô û ë ï œ`, typographic quotes and dashes to GSM-7, to"
        " stay at 160 characters per SMS.",
    )
    stop_number: str | None = Field(
        default=None,
        description="The number in the `STOP SMS au ...` mention; required for a"
        " commercial account.",
    )
    nostop_allowed: bool = Field(
        default=False, description="Whether `<nostop>1</nostop>` may drop the STOP mention."
    )
    default_region: str = Field(
        default="FR",
        description="Region (ISO 3166 code) of national numbers; FR also covers the"
        " overseas departments.",
    )
    countries: list[str] | None = Field(
        default=None,
        description="Allowed destination countries (ISO 3166 codes: `FR`, `RE`, `KZ`);"
        " other numbers get code 27. None: any.",
    )
    max_parts: int = Field(
        default=5,
        ge=1,
        le=255,
        description="Most SMS parts one message may use (and the cap of `<smslong>`);"
        " longer texts are cut, the STOP line never.",
    )
    credit: int | None = Field(
        default=None,
        ge=0,
        description="Credit in SMS parts; code 12 once used up. None: unlimited.",
    )
    report_domains: list[str] | None = Field(
        default=None,
        description="Report addresses (`emailAck`, `emailNot`, `emailDlr`) must be in"
        " these domains; others get no report. None: any.",
    )
    blacklist: list[str] = Field(
        default_factory=list,
        description="Numbers this account never sends to (code 11; quote them in YAML);"
        " `STOP` replies add to it, in the store.",
    )
    delivery_reports: bool = Field(
        default=False,
        description="etatDlr mails to `emailNot` when a request has no `<emailDlr>`"
        " (needs `http`).",
    )
    reply_to: str | None = Field(
        default=None, description="Where reply SMS are mailed; none: the request's sender."
    )
    plain: PlainConfig = Field(
        default_factory=PlainConfig,
        description="Plain mode for this account (mails to number addresses).",
    )

    @field_validator("sender_domains", "report_domains")
    @classmethod
    def _lower_domains(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [d.lower().lstrip("@") for d in v]

    @field_validator("sender_addresses")
    @classmethod
    def _lower_addresses(cls, v: list[str]) -> list[str]:
        for a in v:
            if "@" not in a:
                raise ValueError(f"{a!r} is not an email address")
        return [a.lower() for a in v]

    @field_validator("allowed_ips", mode="before")
    @classmethod
    def _networks(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [ipaddress.ip_network(str(n), strict=False) for n in v]
        return v

    @field_validator("default_sender")
    @classmethod
    def _default_sender(cls, v: str | None) -> str | None:
        if v is not None and not (SENDER_ID_RE.match(v) or NUMERIC_SENDER_RE.match(v)):
            raise ValueError("must be 4-11 letters and digits (not only digits), or a phone number")
        return v

    @field_validator("senders")
    @classmethod
    def _senders(cls, v: list[str] | None) -> list[str] | None:
        for s in v or []:
            if not SENDER_ID_RE.match(s):
                raise ValueError(f"{s!r}: a sender id is 4-11 letters and digits, not only digits")
        return v

    @field_validator("countries")
    @classmethod
    def _countries(cls, v: list[str] | None) -> list[str] | None:
        import phonenumbers

        if v is None:
            return None
        codes = [c.strip().upper() for c in v]
        unknown = [c for c in codes if c not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(
                f"{', '.join(map(repr, unknown))}: not ISO 3166 region codes phonenumbers knows"
                " (write FR, GP, RE, KZ…)"
            )
        return codes

    @field_validator("default_region")
    @classmethod
    def _region(cls, v: str) -> str:
        import phonenumbers

        v = v.upper()
        if v not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{v!r} is not a region phonenumbers knows (ISO 3166 code)")
        return v

    @field_validator("holiday_subdivision")
    @classmethod
    def _subdivision(cls, v: str | None) -> str | None:
        if v is not None:
            import holidays

            try:
                holidays.country_holidays("FR", subdiv=v)
            except NotImplementedError:
                raise ValueError(
                    f"{v!r} is not a French subdivision of the holidays package (e.g. '57', '6AE')"
                ) from None
        return v

    @field_validator("smtp_password")
    @classmethod
    def _password(cls, v: str | None) -> str | None:
        if v is not None and len(v) < 12:
            raise ValueError("at least 12 characters (e.g. `openssl rand -base64 18`)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> AccountConfig:
        if not self.sender_domains and not self.sender_addresses:
            raise ValueError("set sender_domains and/or sender_addresses (who may send)")
        if self.smtp_password is not None and not (self.name and self.name.strip()):
            raise ValueError("an account with smtp_password needs a name (the AUTH user name)")
        if (self.provider is None) == (self.routes is None):
            raise ValueError("set exactly one of provider or routes")
        if self.commercial and not self.stop_number:
            raise ValueError("a commercial account needs stop_number (the STOP SMS mention)")
        if self.plain.enabled and not self.plain.senders and self.smtp_password is None:
            raise ValueError("plain.enabled needs plain.senders, or smtp_password (SMTP AUTH)")
        return self

    @property
    def label(self) -> str:
        """A name for logs that reveals nothing of the key: `name`, else a hash of it."""
        import hashlib

        return self.name or "key-" + hashlib.sha256(self.keyid.encode()).hexdigest()[:8]


class DispatchConfig(_Model):
    """Sending: claiming queued requests, batching, retries, bounds on delays, the
    worker process. Every key has a default: the section may be left out."""

    workers: int = Field(default=4, ge=1, le=64, description="Batches of requests sent at once.")
    batch_requests: int = Field(
        default=200,
        ge=1,
        description="Requests claimed together: their SMS share provider requests (one CM"
        " call for the SMS of many emails that arrived together).",
    )
    calls_in_flight: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Provider calls of one batch in flight at once: while one call waits"
        " for its answer, the next is built and the last one's results are written.",
    )
    linger_s: float = Field(
        default=0.02,
        ge=0,
        le=5,
        description="After new work wakes it, the dispatcher waits this long before"
        " claiming, so that the emails of a burst share one batch (and one provider"
        " request) instead of one each; adds at most this much to an SMS's latency."
        " 0: claim at once.",
    )
    lease_s: float = Field(
        default=300.0,
        gt=0,
        description="A claim older than this is taken back (a dead worker's, or a dead"
        " instance's on PostgreSQL); keep it well above the longest provider call.",
    )
    max_attempts: int = Field(
        default=10,
        ge=1,
        description="Unexpected errors on one request before it is quarantined for a human"
        " (`mailbridge queue retry ID` once the cause is fixed).",
    )
    provider_wait_s: float = Field(
        default=60.0,
        gt=0,
        description="Wait before trying again when a provider refused our credentials,"
        " or the store failed (then doubling for unexpected errors).",
    )
    outage_hold_s: float = Field(
        default=900.0,
        ge=0,
        description="While the last provider of a route is down as a whole (its circuit"
        " is open), recipients wait for it instead of getting 29/999, up to this long"
        " after they first became due. 0: 29/999 straight after the retries.",
    )
    validity_s: float = Field(
        default=86400.0,
        gt=0,
        description="No SMS is handed to a provider later than this after it first became"
        " due (its email's arrival, or the end of its quiet hours); then 999 and the"
        " Not. The time left goes to the providers that take an expiry (CM, Kcell,"
        " SMPP).",
    )
    http_max_connections: int = Field(
        default=50,
        ge=1,
        description="The HTTP client all providers share: connections open at once.",
    )
    http_max_keepalive: int = Field(
        default=20, ge=0, description="...and idle connections it keeps alive."
    )
    heartbeat_s: float = Field(
        default=5.0, gt=0, description="The send side writes a heartbeat into the store this often."
    )
    heartbeat_stale_s: float = Field(
        default=30.0,
        gt=0,
        description="A heartbeat older than this means the send side hangs: `/healthz`"
        " answers 503 and the systemd watchdog is no longer fed.",
    )
    separate_process: bool = Field(
        default=True,
        description="Sending and reporting run in a child process of their own"
        " (`mailbridge _worker`, started by `serve`), so that the SMTP intake keeps a"
        " core (and the GIL) to itself. `false`: one process (simpler to debug, slower"
        " under load).",
    )
    process_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Niceness of that process: when the CPU is short, the SMTP dialogue"
        " (a client waiting) goes first and sending catches up after the burst.",
    )


class LoggingConfig(_Model):
    """`logging:` (SPEC 11). Under systemd the format drops its timestamp and
    prefixes syslog priorities by itself (mailbridge/logs.py)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO",
        description="The least severe lines written. DEBUG adds a summary of every"
        " provider call (method, URL without its query, sizes, status, time; never a secret).",
    )
    format: Literal["text", "json"] = Field(
        default="text",
        description="`json`: one object per line (`ts`, `level`, `logger`, `message`,"
        " `request_id`, `email_id`). Under systemd (`JOURNAL_STREAM` names stderr) lines"
        " carry a `<N>` syslog priority and no timestamp of ours.",
    )


class Config(_Model):
    """The whole file. `store`, `reports`, `providers` and `accounts` are required."""

    smtp: SmtpConfig = Field(default_factory=SmtpConfig, description="The SMTP intake.")
    store: StoreConfig = Field(description="The durable queue (SQLite or PostgreSQL).")
    reports: ReportsConfig = Field(description="Where the report mails go.")
    http: HttpConfig | None = Field(
        default=None,
        description="The HTTP receiver (callbacks, `/healthz`, `/metrics`); none: off.",
    )
    providers: dict[str, ProviderConfig] = Field(
        min_length=1, description="The SMS providers, by a name of your choice."
    )
    accounts: list[AccountConfig] = Field(min_length=1, description="The client accounts.")
    blacklist: list[str] = Field(
        default_factory=list, description="Numbers no account may send to (code 11)."
    )
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig, description="Sending.")
    logging: LoggingConfig = Field(
        default_factory=LoggingConfig, description="Log lines: their level and format."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = Field(
        default=None,
        description="The first releases' name of `logging.level`, still read (not both).",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_log_level(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("log_level") is None:
            return data
        section = data.get("logging") or {}
        if not isinstance(section, dict):
            return data  # the field's own check names the problem
        if section.get("level", data["log_level"]) != data["log_level"]:
            raise ValueError("log_level and logging.level disagree: keep logging.level only")
        return {**data, "logging": {**section, "level": data["log_level"]}}


def _cross_section_problems(config: Config) -> list[str]:
    """What no single section can see: duplicate keys, dangling provider names,
    AUTH and plain-mode settings that need another section. Each problem is
    `key: message`, like pydantic's."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, acc in enumerate(config.accounts):
        if acc.keyid in seen:
            problems.append(f"accounts[{i}].keyid: same keyid as accounts[{seen[acc.keyid]}]")
        seen[acc.keyid] = i
        names = [(f"accounts[{i}].provider", acc.provider)] if acc.provider else []
        for j, route in enumerate(acc.routes or []):
            names += [(f"accounts[{i}].routes[{j}].providers", n) for n in route.providers]
        for key, name in names:
            if name not in config.providers:
                defined = ", ".join(config.providers)
                problems.append(f"{key}: {name!r} is not defined under providers ({defined})")
    return problems + _plain_problems(config) + _auth_problems(config) + _cancelling(config)


def _auth_problems(config: Config) -> list[str]:
    """Problems of the AUTH setup that no single config section can see."""
    problems: list[str] = []
    names: dict[str, int] = {}
    for i, account in enumerate(config.accounts):
        if account.smtp_password is None:
            continue
        if config.smtp.tls is None:
            problems.append(
                f"accounts[{i}].smtp_password: needs smtp.tls (AUTH is only accepted over TLS)"
            )
        assert account.name is not None  # AccountConfig requires it with a password
        if account.name in names:
            problems.append(
                f"accounts[{i}].name: {account.name!r} is also the name of "
                f"accounts[{names[account.name]}]; AUTH user names must be unique"
            )
        names.setdefault(account.name, i)
    return problems


def _cancelling(config: Config) -> list[str]:
    """Settings that are each valid but together defeat their purpose."""
    problems: list[str] = []
    d = config.dispatch
    # The outage hold waits for the circuit of a route's last provider: if one
    # request's retries can never open it, a lone request is never held.
    last = {a.provider for a in config.accounts if a.provider}
    last |= {r.providers[-1] for a in config.accounts for r in a.routes or []}
    for name, pc in config.providers.items():
        if d.outage_hold_s > 0 and name in last and pc.retry_attempts < pc.circuit_failures:
            problems.append(
                f"providers.{name}.circuit_failures: {pc.circuit_failures} is more than"
                f" retry_attempts {pc.retry_attempts}: one request's failures never open the"
                " circuit, so dispatch.outage_hold_s never holds it (lower circuit_failures,"
                " or set outage_hold_s: 0)"
            )
    if d.heartbeat_stale_s <= 2 * d.heartbeat_s:
        problems.append(
            f"dispatch.heartbeat_stale_s: {d.heartbeat_stale_s:g} is not above twice heartbeat_s"
            f" {d.heartbeat_s:g}: /healthz would say 503 between two beats"
        )
    r = config.reports
    if r.retry_max_backoff_s < r.retry_backoff_s:
        problems.append(
            f"reports.retry_max_backoff_s: {r.retry_max_backoff_s:g} is below retry_backoff_s"
            f" {r.retry_backoff_s:g}"
        )
    if r.delivery_report_max_age < r.delivery_report_delay:
        problems.append(
            f"reports.delivery_report_max_age: {r.delivery_report_max_age:g} is below"
            f" delivery_report_delay {r.delivery_report_delay:g}: no etatDlr could ever be late"
        )
    return problems


def _plain_problems(config: Config) -> list[str]:
    """Plain-mode settings that only the whole configuration can judge."""
    problems: list[str] = []
    owners: dict[str, int] = {}
    for i, account in enumerate(config.accounts):
        if not account.plain.enabled:
            continue
        if not config.smtp.number_domains:
            problems.append(
                f"accounts[{i}].plain.enabled: no mail can reach it without smtp.number_domains"
            )
        for sender in account.plain.senders:
            if sender in owners:
                problems.append(
                    f"accounts[{i}].plain.senders: {sender} is also a plain sender of "
                    f"accounts[{owners[sender]}]; a plain mail must name one account"
                )
            owners.setdefault(sender, i)
    return problems


def parse_hostport(value: str) -> tuple[str, int]:
    """'127.0.0.1:2525' or '[::1]:2525' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def _expand_env(node: Any, path: str, problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {
            k: _expand_env(v, f"{path}.{k}" if path else str(k), problems) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_expand_env(v, f"{path}[{i}]", problems) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                if m.group(2) is not None:
                    return m.group(2)
                problems.append(f"{path}: environment variable {m.group(1)} is not set")
                return ""
            return value

        return _ENV_RE.sub(sub, node)
    return node


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part):
            continue  # pydantic's internal validator names, not keys
        elif part in ("outbox", "cm", "smsmode", "kcell", "smpp") and out.startswith("providers."):
            continue  # the discriminator tag pydantic inserts, not a key
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _hint(msg: str, value: Any) -> str:
    if isinstance(value, int) and "valid string" in msg:
        return msg + " (quote it in YAML: unquoted 0601020304 is read as a number)"
    return msg


def _pydantic_problems(err: ValidationError) -> Iterator[str]:
    for e in err.errors():
        msg = str(e["msg"]).removeprefix("Value error, ")
        yield f"{_format_loc(tuple(e['loc']))}: {_hint(msg, e.get('input'))}"


def parse_config(data: Any, *, base_dir: Path, source: str = "config") -> Config:
    """Validate an already-loaded YAML tree; raise ConfigError with every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping of sections"])
    problems: list[str] = []
    data = _expand_env(data, "", problems)
    try:
        config = Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as err:
        # A key whose variable is unset already has its problem; don't add a second.
        unset = {p.split(":", 1)[0] for p in problems}
        problems.extend(p for p in _pydantic_problems(err) if p.split(":", 1)[0] not in unset)
        raise ConfigError(source, problems) from None
    problems += _cross_section_problems(config)
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: Path) -> Config:
    """Read and validate a config file; raise ConfigError naming every bad key."""
    try:
        # A file object, so that YAML errors name the file ("in 'config.yaml', line 3").
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(str(path), [f"(file): cannot read: {err.strerror}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"(yaml): {err}"]) from None
    except UnicodeDecodeError as err:
        raise ConfigError(str(path), [f"(file): not UTF-8 ({err.reason})"]) from None
    return parse_config(data, base_dir=path.resolve().parent, source=str(path))
