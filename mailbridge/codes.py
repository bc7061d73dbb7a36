"""THE code table: Ack codes, per-recipient (Not) codes and their texts.

Every other module refers to codes by the names below; the texts live here only.
Provider outcomes are mapped to these codes by the provider adapters through
`provider_code()`, so a new provider adds rows here, not string matching elsewhere.
"""

from __future__ import annotations

from enum import IntEnum


class Ack(IntEnum):
    """Ack report codes (SPEC section 5)."""

    PROCESSED = 0
    DUPLICATE_EMAIL_ID = 1
    MISSING_EMAIL_ID = 2
    INVALID_FORMAT = 3


ACK_MESSAGES: dict[int, str] = {
    Ack.PROCESSED: "Votre email a bien ete traite",
    Ack.DUPLICATE_EMAIL_ID: "emailId deja traite",
    Ack.MISSING_EMAIL_ID: "emailId non renseigne",
    Ack.INVALID_FORMAT: "Format d'email invalide",
}


class Code(IntEnum):
    """Per-recipient codes of the iSendPro table (SPEC section 3)."""

    SENT = 0
    EMPTY_NUMBER = 6
    MALFORMED_NUMBER = 7
    BLACKLISTED = 11
    NO_CREDIT = 12
    EMPTY_SENDER = 16
    UNASSIGNED_NUMBER = 21
    TOO_MANY_NUMBERS = 23
    QUIET_HOURS = 24
    COUNTRY_NOT_ALLOWED = 27
    OVERFLOW = 29
    SENDER_NOT_ALLOWED = 33
    SMSLONG_NOT_INTEGER = 34
    ERROR = 999


# Texts exactly as in the iSendPro annexe (seeds/001), rendered ISO-8859-1 in reports.
NOT_MESSAGES: dict[int, str] = {
    0: "Votre message a bien été envoyé",
    1: "Le champ Login est vide",
    2: "Le champ PWD est vide",
    3: "Vos identifiants sont incorrects",
    6: "Vous devez saisir un numéro de téléphone",
    7: "Un numéro de téléphone est sur 10 chiffres",
    11: "Le numéro de téléphone est dans la liste noire",
    12: "Votre crédit de MT est épuisé",
    14: "L'adresse IP n'est pas autorisée",
    16: "L'émetteur ne peut pas être vide",
    21: "Le numéro de téléphone n'est pas attribué",
    22: "Le téléphone est attribué à un Full MVNO",
    23: "Le nombre maximum de téléphones par requête est de 500",
    24: "Pas d'envoi commercial entre 20h et 08h, ni les dimanches et jours fériés",
    27: "L'indicatif pays du téléphone n'est pas autorisé !",
    29: "Nous ne pouvons donner suite à votre demande (overflow)",
    30: "Erreur sur le domaine de connexion",
    33: "Cet émetteur n'est pas autorisé!",
    34: "La valeur de smslong doit être un entier !",
    999: "Une erreur est survenue. Merci de contacter le service technique",
}


def ack_message(code: int) -> str:
    """Text of an Ack code."""
    return ACK_MESSAGES[code]


def not_message(code: int) -> str:
    """Text of a per-recipient code; unknown codes read as 999's text."""
    return NOT_MESSAGES.get(code, NOT_MESSAGES[Code.ERROR])


class ProviderFailure(IntEnum):
    """What a provider said about one recipient, before it becomes a Code.

    Adapters classify their provider's answers into these kinds; `provider_code`
    is the single mapping to the client-visible table.
    """

    ACCEPTED = 0
    INVALID_NUMBER = 1
    SENDER_REFUSED = 2
    BLACKLISTED = 3
    NO_BALANCE = 4
    THROTTLED = 5
    OTHER = 6


_PROVIDER_CODES: dict[ProviderFailure, Code] = {
    ProviderFailure.ACCEPTED: Code.SENT,
    ProviderFailure.INVALID_NUMBER: Code.MALFORMED_NUMBER,
    ProviderFailure.SENDER_REFUSED: Code.SENDER_NOT_ALLOWED,
    ProviderFailure.BLACKLISTED: Code.BLACKLISTED,
    ProviderFailure.NO_BALANCE: Code.NO_CREDIT,
    ProviderFailure.THROTTLED: Code.OVERFLOW,
    ProviderFailure.OTHER: Code.ERROR,
}


def provider_code(kind: ProviderFailure) -> Code:
    """Map a classified provider outcome to the iSendPro code the client sees."""
    return _PROVIDER_CODES[kind]


# Each provider's answers, classified. Adapters look their provider's error
# codes up here and never map to client codes themselves.

# --- CM.com (providers/cm.py) ---
# CM JSON gateway `errorCode` (whole request) and `messageErrorCode` (per msg/recipient),
# from seeds/000 "JSON POST Codes d'erreur". 101/103 (authentication / product token) are
# not here: the adapter raises ProviderAuthError for them. A recipient whose `status` is
# "Accepted" is accepted whatever its code; these rows classify the rejected ones.
CM_AUTH_ERROR_CODES: frozenset[int] = frozenset({101, 103})
CM_FAILURES: dict[int, ProviderFailure] = {
    102: ProviderFailure.NO_BALANCE,  # account balance insufficient
    201: ProviderFailure.OTHER,  # some/all msg in error (details are per msg)
    202: ProviderFailure.OTHER,  # malformed request / wrong data types
    203: ProviderFailure.OTHER,  # msg array incorrect
    301: ProviderFailure.SENDER_REFUSED,  # invalid or missing `from`
    302: ProviderFailure.INVALID_NUMBER,  # invalid `to` field
    303: ProviderFailure.INVALID_NUMBER,  # invalid MSISDN in `to`
    304: ProviderFailure.OTHER,  # invalid body
    305: ProviderFailure.OTHER,  # some other invalid field
    401: ProviderFailure.OTHER,  # filtered as spam
    402: ProviderFailure.BLACKLISTED,  # message blacklisted
    403: ProviderFailure.OTHER,  # message rejected
    500: ProviderFailure.OTHER,  # internal error
    999: ProviderFailure.OTHER,  # unknown error
}


def cm_failure(error_code: object) -> ProviderFailure:
    """Classify a CM error code (int or numeric string); unknown or missing codes are OTHER."""
    if isinstance(error_code, int):
        code = error_code
    elif isinstance(error_code, str) and error_code.strip().isdigit():
        code = int(error_code)
    else:
        return ProviderFailure.OTHER
    return CM_FAILURES.get(code, ProviderFailure.OTHER)


# --- end CM.com ---

# --- sMsmode (providers/smsmode.py) ---
# sendSMS.do and sendSMSBatch.do answer `code | description | smsID` once per HTTP request
# (seeds/002 §3, §17): the code is the verdict for every recipient of that request. The API
# has no per-recipient verdict at submission; an invalid (status 3998) or blacklisted (3999)
# number only shows up later, in its delivery report.
SMSMODE_ACCEPTED = 0
# 32 "Erreur d'authentification": the access token is refused, an operator error.
SMSMODE_AUTH_CODES: frozenset[int] = frozenset({32})
# 31 "Erreur interne", 50 "Temporairement inaccessible": the whole request may pass later.
SMSMODE_TRANSIENT_CODES: frozenset[int] = frozenset({31, 50})
SMSMODE_FAILURES: dict[int, ProviderFailure] = {
    0: ProviderFailure.ACCEPTED,
    33: ProviderFailure.NO_BALANCE,  # "Crédits insuffisants"
    35: ProviderFailure.OTHER,  # "Paramètre obligatoire manquant" (or incorrect)
}


def smsmode_failure(code: int) -> ProviderFailure:
    """Classify a final sMsmode answer code; codes the document does not list are OTHER."""
    return SMSMODE_FAILURES.get(code, ProviderFailure.OTHER)


# --- end sMsmode ---

# --- Kcell SMSGW2 (providers/kcell.py) ---
# SMSGW2's error directory ("Справочник кодов ошибок", seeds/003). The codes come
# in delivery reports (`error_code`, a string, "" when none) and may come in
# error answers; codes absent here are OTHER. 23 (duplicate client_message_id)
# means an earlier submission of the very same message was accepted: ACCEPTED.
KCELL_DUPLICATE = 23
KCELL_ERRORS: dict[int, ProviderFailure] = {
    0: ProviderFailure.ACCEPTED,
    10: ProviderFailure.SENDER_REFUSED,  # Invalid sender / source address
    11: ProviderFailure.INVALID_NUMBER,  # Invalid recipient (format should be 7xxxYYYzzzz)
    16: ProviderFailure.INVALID_NUMBER,  # MSC record not found in HLR for this subscriber
    20: ProviderFailure.THROTTLED,  # Message queue full
    KCELL_DUPLICATE: ProviderFailure.ACCEPTED,
    24: ProviderFailure.SENDER_REFUSED,  # Timebound not allowed for given sender
    30: ProviderFailure.BLACKLISTED,  # banned from receiving SMS (complaint, corporate rule)
    34: ProviderFailure.BLACKLISTED,  # in provider's black list / no routing (MNP)
    35: ProviderFailure.SENDER_REFUSED,  # no MNP support set up for this sender
    36: ProviderFailure.SENDER_REFUSED,  # no context support for this sender
    72: ProviderFailure.SENDER_REFUSED,  # Invalid Source address TON
    73: ProviderFailure.SENDER_REFUSED,  # Invalid Source address NPI
    80: ProviderFailure.INVALID_NUMBER,  # Invalid Destination address TON
    81: ProviderFailure.INVALID_NUMBER,  # Invalid Destination address NPI
    88: ProviderFailure.THROTTLED,  # Throttling error
}
# Error answers of the REST API carry only `error_message` in the seed's sample
# ("User can't use alias SMSGW to send messages"): words of the directory's
# texts, tried in order (black list before "recipient", duplicate first).
_KCELL_TEXTS: tuple[tuple[str, ProviderFailure], ...] = (
    ("duplicate client_message_id", ProviderFailure.ACCEPTED),
    ("black list", ProviderFailure.BLACKLISTED),
    ("blacklist", ProviderFailure.BLACKLISTED),
    ("banned", ProviderFailure.BLACKLISTED),
    ("throttl", ProviderFailure.THROTTLED),
    ("queue full", ProviderFailure.THROTTLED),
    ("alias", ProviderFailure.SENDER_REFUSED),
    ("sender", ProviderFailure.SENDER_REFUSED),
    ("source address", ProviderFailure.SENDER_REFUSED),
    ("recipient", ProviderFailure.INVALID_NUMBER),
    ("destination address", ProviderFailure.INVALID_NUMBER),
)


def kcell_failure(error_code: object, error_message: str) -> ProviderFailure:
    """Classify a Kcell error: its numeric `error_code` when known, else its text."""
    text = str(error_code).strip() if error_code is not None else ""
    if text.isdigit() and int(text) in KCELL_ERRORS:
        return KCELL_ERRORS[int(text)]
    lowered = error_message.lower()
    for words, kind in _KCELL_TEXTS:
        if words in lowered:
            return kind
    return ProviderFailure.OTHER


# --- end Kcell SMSGW2 ---

# --- SMPP 3.4 (providers/smpp.py; SPEC section 10) ---
# submit_sm_resp command_status. ESME_RTHROTTLED (0x58) and ESME_RMSGQFUL (0x14)
# are not here: the adapter pauses and submits the same part again. Refused
# binds (0x0D, 0x0E, 0x0F) raise ProviderAuthError. Anything else is OTHER.
SMPP_FAILURES: dict[int, ProviderFailure] = {
    0x00: ProviderFailure.ACCEPTED,
    0x0B: ProviderFailure.INVALID_NUMBER,  # ESME_RINVDSTADR
    0x0A: ProviderFailure.SENDER_REFUSED,  # ESME_RINVSRCADR
}


def smpp_failure(status: int) -> ProviderFailure:
    """Classify a submit_sm_resp command_status (SPEC 10: 0x0B -> 7, 0x0A -> 33, else 999)."""
    return SMPP_FAILURES.get(status, ProviderFailure.OTHER)


# --- end SMPP ---
