"""config.yaml -> frozen, validated objects, once, at start.

Input: a YAML file (SPEC section 6) where `${VAR}` / `${VAR:-default}` read the
environment. Output: a `Config`. Failure: `ConfigError` carrying every problem
found, each naming its key (`accounts[0].keyid: field required`).
Relative paths are read relative to the directory of the config file.
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

    cert: ConfigPath  # PEM certificate chain, the server's certificate first
    key: ConfigPath  # PEM private key (keep it mode 0600, readable by the daemon only)
    # true: every command but EHLO/NOOP/STARTTLS/QUIT before STARTTLS gets 530 5.7.0.
    required: bool = False

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
    listen: str = "127.0.0.1:2525"
    recipients: list[str] = Field(default_factory=lambda: ["sendsms@localhost"], min_length=1)
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    hostname: str | None = None  # the name in the greeting; default: the machine's FQDN
    # Seconds a client may stay silent between commands, and the most the whole
    # DATA transfer may take; then 421 4.4.2 and the connection is closed.
    timeout_s: float = Field(300.0, gt=0)
    # Connections at once, in all and from one client address (an IPv6 /64 counts
    # as one address); more get 421 4.7.0 and are closed. Behind an MTA on this
    # host every connection comes from 127.0.0.1: the per-address limit is then
    # the MTA's concurrency (Postfix uses up to 20 per destination).
    max_connections: int = Field(200, gt=0)
    max_connections_per_ip: int = Field(50, gt=0)
    # Rate limits, per rate_window_s, as token buckets in memory (the limit at
    # once, then one more every rate_window_s / limit seconds). ip_rate_limit:
    # messages (MAIL commands) from one client address; past it MAIL gets
    # 450 4.7.1 so that the client's MTA retries later (0, the default: no
    # limit, so that an ERP's burst is absorbed at once; set it on a listener
    # open to many hosts, e.g. 600). Behind an MTA on this host every message
    # comes from 127.0.0.1: leave it 0 and let the MTA limit its clients.
    rate_window_s: float = Field(60.0, gt=0)
    ip_rate_limit: int = Field(0, ge=0)
    # Failed AUTH from one client address; past it AUTH gets 454 4.7.0, even with
    # the right password, until the window allows again (credential stuffing).
    auth_failure_limit: int = Field(10, ge=1)
    tls: TlsConfig | None = None
    # Plain mode (SPEC section 9): RCPT TO:<0601020304@sms.example> for these
    # domains takes the number from the local part. Empty (the default): off.
    number_domains: list[str] = Field(default_factory=list)

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
    sqlite: ConfigPath | None = None
    postgresql: str | None = None
    # "full": a 250 survives power loss (fsync per commit). "normal": survives a
    # crash of the daemon, but the last commits may be lost on power loss.
    synchronous: Literal["full", "normal"] = "full"
    # How long a write waits for a lock held by another process before the
    # intake answers 451 (the client retries later).
    busy_timeout_s: float = Field(5.0, gt=0)
    # Cap on the database file (SQLite max_page_count); past it the intake answers
    # 451 (the client retries) instead of filling the disk. None: no cap.
    max_size_mb: float | None = Field(None, gt=0)
    # PostgreSQL: connections each process keeps in its pool (checked before use).
    pool_size: int = Field(4, ge=1, le=100)
    # Finished requests older than this lose their recipients and reports (a daily
    # purge in the daemon, and `mailbridge purge`); their (account, emailId)
    # stays, so that a late duplicate still gets Ack 1.
    retention_days: float = Field(90.0, gt=0)

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
    host: str
    port: int = 25
    starttls: bool = False  # upgrade with STARTTLS after connecting
    tls: bool = False  # implicit TLS (port 465)
    username: str | None = None
    password: str | None = None
    timeout_s: float = Field(30.0, gt=0)
    # Reports in flight at once, each on its own reused connection: a burst of
    # Nots is not paced by one connection's round trips.
    connections: int = Field(4, ge=1, le=64)


class ReportsConfig(_Model):
    from_address: str = Field("mailbridge@localhost", alias="from")
    # RFC 3834: automatic replies go out with a null envelope sender so that no
    # bounce can come back; set an address if your relay refuses `MAIL FROM:<>`.
    envelope_from: str = ""
    maildir: ConfigPath | None = None
    smtp: RelayConfig | None = None
    retry_backoff_s: float = Field(30.0, gt=0)  # first wait after a failed delivery, doubling
    retry_max_backoff_s: float = Field(3600.0, gt=0)
    # A report the relay keeps refusing temporarily (4xx, no connection) is
    # retried this long after it was made (5 days, as Postfix's queue), then
    # failed; a permanent refusal (5xx) fails it at once. Failed reports are
    # listed by `mailbridge reports list` and tried again by `reports retry`.
    max_age_s: float = Field(5 * 86400.0, gt=0)
    # etatDlr mails (SPEC section 7): one per request once every sent recipient has
    # its final status, or this many seconds after the Not with those final by then
    # (the rest follow, at most every delay); none after delivery_report_max_age.
    delivery_report_delay: float = Field(3600.0, gt=0)
    delivery_report_max_age: float = Field(3 * 86400.0, gt=0)

    @model_validator(mode="after")
    def _one_sink(self) -> ReportsConfig:
        if (self.maildir is None) == (self.smtp is None):
            raise ValueError("set exactly one of reports.maildir or reports.smtp")
        return self


class HttpTlsConfig(_Model):
    """TLS on the HTTP receiver, for a port providers reach without a reverse proxy."""

    cert: ConfigPath
    key: ConfigPath

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
    """The HTTP receiver (SPEC section 7): provider callbacks, /healthz, /metrics."""

    listen: str = "127.0.0.1:8025"
    # The shared secret in the callback paths (/hooks/<token>/cm); never logged.
    token: str = Field(min_length=16, repr=False)
    tls: HttpTlsConfig | None = None
    # The receiver's address as providers reach it (https://sms.example.com): when
    # set, sMsmode requests carry their notification_url; CM and Kcell take the
    # URL in their consoles (docs/providers.md).
    public_url: str | None = None
    # Hardening (aiohttp's defaults keep idle connections an hour and read a body
    # with no deadline): bodies, headers, idle keep-alive, body read time, and
    # connections at once (more are closed at once).
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_header_bytes: int = Field(8190, ge=1024)
    max_headers: int = Field(64, ge=8)
    keepalive_s: float = Field(15.0, gt=0)
    body_timeout_s: float = Field(10.0, gt=0)
    max_connections: int = Field(256, ge=1)

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
    timeout_s: float = Field(10.0, gt=0)
    retry_attempts: int = Field(3, ge=1)  # all attempts, the first included
    retry_backoff_s: float = Field(1.0, ge=0)  # doubling, with jitter
    # Circuit breaker: after this many failed calls in a row, skip the provider
    # (fail over at once) for circuit_cooldown_s, then try one call again.
    circuit_failures: int = Field(3, ge=1)
    circuit_cooldown_s: float = Field(30.0, gt=0)


class OutboxProviderConfig(_ProviderBase):
    type: Literal["outbox"]
    path: ConfigPath


class CmProviderConfig(_ProviderBase):
    type: Literal["cm"]
    url: str = "https://gw.cmtelecom.com/v1.0/message"
    product_token: str = Field(min_length=1)


class SmsmodeProviderConfig(_ProviderBase):
    type: Literal["smsmode"]
    url: str = "https://api.smsmode.com/http/1.6/"
    access_token: str = Field(min_length=1)
    # Sent with every message (notification_url, notification_url_reponse) so that
    # sMsmode calls our receiver back; default: derived from http.public_url.
    notification_url: str | None = None
    reply_notification_url: str | None = None


class KcellProviderConfig(_ProviderBase):
    type: Literal["kcell"]
    url: str = "https://api.kcell.kz/app/smsgw/rest/v2"
    username: str = Field(min_length=1)
    password: str = Field(min_length=1)
    # When SMSGW may deliver. Its own default, "def", is weekdays 09:00-18:00:
    # mailbridge applies quiet hours itself, so "full" by default; null omits the field.
    time_bounds: Literal["def", "wd99", "wd911", "ad96", "ad99", "ad911", "full"] | None = "full"


ProviderConfig = Annotated[
    OutboxProviderConfig | CmProviderConfig | SmsmodeProviderConfig | KcellProviderConfig,
    Field(discriminator="type"),
]


class RouteConfig(_Model):
    prefix: str = ""  # matched against the E.164 number ("+7", "+336"); "" matches all
    providers: list[str] = Field(min_length=1)

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

    enabled: bool = False
    # Who may send plain mails for this account: addresses (alarm@masociete.com)
    # or whole domains written with a leading @ (@masociete.com). MAIL FROM and
    # every From: address must match. With smtp_password, AUTH is required too.
    senders: list[str] = Field(default_factory=list)
    # The SMS text: the body (the Subject when the body is empty), the Subject,
    # or the Subject, a line break and the body.
    text: Literal["body", "subject", "subject_body"] = "body"
    # The body is cut at the first of these (any case), e.g. "--end", "Envoyé de mon iPhone".
    cut_markers: list[str] = Field(default_factory=list)
    # Plain-text report mails to the sender: only for numbers that failed, for
    # every number, or none.
    reports: Literal["failures", "all", "none"] = "failures"

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
    # The secret clients put in <keyid>: compared in constant time, never logged
    # (repr=False keeps it out of any repr of the config).
    keyid: str = Field(min_length=1, repr=False)
    # For logs, and the SMTP AUTH user name; default: a fingerprint of the keyid.
    name: str | None = None
    sender_domains: list[str] = Field(default_factory=list)
    sender_addresses: list[str] = Field(default_factory=list)
    allowed_ips: list[IpNetwork] | None = None
    # SMTP AUTH (PLAIN/LOGIN, only after STARTTLS) as user `name`. When set, this
    # account only takes requests from sessions authenticated as it: others get
    # 530 5.7.0. At least 12 characters; put it in the environment: "${VAR}".
    smtp_password: str | None = Field(None, repr=False)
    # Messages accepted for this account per smtp.rate_window_s; past it the end
    # of DATA gets 450 4.7.1 (nothing stored, the client's MTA retries). None: no limit.
    rate_limit: int | None = Field(None, ge=1)
    provider: str | None = None
    routes: list[RouteConfig] | None = None
    default_sender: str | None = None
    senders: list[str] | None = None
    commercial: bool = True  # iSendPro's default: lifting the restriction is explicit
    quiet_hours: Literal["reject", "defer"] = "reject"
    holiday_subdivision: str | None = None
    transliterate: bool = False
    stop_number: str | None = None
    nostop_allowed: bool = False
    default_region: str = "FR"
    countries: list[str] | None = None
    max_parts: int = Field(5, ge=1, le=255)
    credit: int | None = Field(None, ge=0)
    report_domains: list[str] | None = None
    blacklist: list[str] = Field(default_factory=list)
    delivery_reports: bool = False
    reply_to: str | None = None
    plain: PlainConfig = Field(default_factory=PlainConfig)

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
    workers: int = Field(4, ge=1, le=64)  # batches of requests sent at once
    # Requests claimed together: their SMS share provider requests (one CM call
    # for the SMS of many emails that arrived together).
    batch_requests: int = Field(200, ge=1)
    # Provider calls of one batch in flight at once: while one call waits for
    # its answer, the next is built and the last one's results are written.
    calls_in_flight: int = Field(4, ge=1, le=64)
    # After new work wakes it, the dispatcher waits this long before claiming,
    # so that the emails of a burst share one batch (and one provider request)
    # instead of one each. Adds at most this much to an SMS's latency.
    linger_s: float = Field(0.02, ge=0, le=5)
    lease_s: float = Field(300.0, gt=0)  # a claim older than this is taken back
    max_attempts: int = Field(10, ge=1)  # request-level failures before quarantine
    provider_wait_s: float = Field(60.0, gt=0)  # wait before retrying a request whose route is down
    # When the last provider of a route is down as a whole (its circuit is open),
    # recipients wait for it instead of getting 999, up to this long after the
    # email arrived. 0: fail at once after retry_attempts, as for a lone failure.
    outage_hold_s: float = Field(900.0, ge=0)
    # No SMS is handed to a provider later than this after it first became due
    # (arrival, or the end of its quiet hours); then 999 and the Not. The time
    # left goes to the providers that take an expiry (CM, Kcell, SMPP).
    validity_s: float = Field(86400.0, gt=0)
    # The one HTTP client all providers share: connections open at once, kept alive.
    http_max_connections: int = Field(50, ge=1)
    http_max_keepalive: int = Field(20, ge=0)
    # Sending and reporting run in a child process of their own, so that the SMTP
    # intake keeps a core (and the GIL) to itself. false: one process (simpler
    # to debug, slower under load).
    # The send side writes a heartbeat into the store every heartbeat_s; one older
    # than heartbeat_stale_s means it hangs: /healthz answers 503 and the systemd
    # watchdog is no longer fed.
    heartbeat_s: float = Field(5.0, gt=0)
    heartbeat_stale_s: float = Field(30.0, gt=0)
    separate_process: bool = True
    # Niceness of that process: when the CPU is short, the SMTP dialogue (a
    # client waiting) goes first and sending catches up after the burst.
    process_nice: int = Field(10, ge=0, le=19)


class Config(_Model):
    smtp: SmtpConfig = Field(default_factory=SmtpConfig)
    store: StoreConfig
    reports: ReportsConfig
    http: HttpConfig | None = None
    providers: dict[str, ProviderConfig] = Field(min_length=1)
    accounts: list[AccountConfig] = Field(min_length=1)
    blacklist: list[str] = Field(default_factory=list)  # numbers no account may send to
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


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
        elif part in ("outbox", "cm", "smsmode", "kcell") and out.startswith("providers."):
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
