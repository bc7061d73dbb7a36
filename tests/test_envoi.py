"""The lenient <envoi> reader: seed examples, raw values, entities, hostile input."""

from __future__ import annotations

import pytest

from mailbridge.envoi import Envoi, parse_envoi

SEED_SINGLE = """<envoi>
<keyid>a296464ce012b8ab710a</keyid>
<num>0601020304</num>
<sms>L'été est fini! Super promo -10% à partir de 50€ d'achat !!!</sms>
<emetteur>MaSociete</emetteur>
<emailNot>not@masociete.com</emailNot>
<emailAck>ack@masociete.com</emailAck>
<emailId>1548</emailId>
</envoi>
"""

SEED_TWO_SAME = """<envoi>
<keyid>a296464ce012b8ab710a</keyid>
<num1>0601020304</num1>
<num2>0601020305</num2>
<sms>L'été est fini! Super promo -10% à partir de 50€ d'achat !!!</sms>
<emetteur>MaSociete</emetteur>
<emailNot>not@masociete.com</emailNot>
<emailAck>ack@masociete.com</emailAck>
<emailId>1548</emailId>
</envoi>
"""

SEED_TWO_EACH = """<envoi>
<keyid>a296464ce012b8ab710a</keyid>
<num1>0601020304</num1>
<num2>0601020305</num2>
<sms1>L'été est fini! Super promo -10% à partir de 50€ d'achat !!!</sms1>
<sms2>L'été est fini! Super promo -20% à partir de 100€ d'achat !!!</sms2>
<emetteur>MaSociete</emetteur>
<emailNot>not@masociete.com</emailNot>
<emailAck>ack@masociete.com</emailAck>
<emailId>1548</emailId>
</envoi>
"""


def block(inner: str) -> str:
    return f"<envoi>{inner}</envoi>"


def test_seed_single_recipient() -> None:
    envoi = parse_envoi(SEED_SINGLE)
    assert envoi.fields == {
        "keyid": "a296464ce012b8ab710a",
        "num": "0601020304",
        "sms": "L'été est fini! Super promo -10% à partir de 50€ d'achat !!!",
        "emetteur": "MaSociete",
        "emailnot": "not@masociete.com",
        "emailack": "ack@masociete.com",
        "emailid": "1548",
    }


def test_seed_two_recipients_same_message() -> None:
    envoi = parse_envoi(SEED_TWO_SAME)
    assert envoi.get("num1") == "0601020304"
    assert envoi.get("num2") == "0601020305"
    assert envoi.get("sms") == "L'été est fini! Super promo -10% à partir de 50€ d'achat !!!"
    assert envoi.get("num") is None
    assert len(envoi.fields) == 8


def test_seed_two_recipients_own_messages() -> None:
    envoi = parse_envoi(SEED_TWO_EACH)
    assert envoi.get("sms1") == "L'été est fini! Super promo -10% à partir de 50€ d'achat !!!"
    assert envoi.get("sms2") == "L'été est fini! Super promo -20% à partir de 100€ d'achat !!!"
    assert envoi.get("sms") is None
    assert envoi.get("emailId") == "1548"


def test_raw_ampersand_and_less_than_are_kept() -> None:
    assert parse_envoi(block("<sms>Tom & Jerry <3</sms>")).get("sms") == "Tom & Jerry <3"
    envoi = parse_envoi(block("<sms>a<b && c <d e> f</g> h</sms>"))
    assert envoi.get("sms") == "a<b && c <d e> f</g> h"


def test_named_entities_decoded() -> None:
    envoi = parse_envoi(block("<sms>&amp; &lt;b&gt; &quot;x&quot; &apos;y&apos;</sms>"))
    assert envoi.get("sms") == "& <b> \"x\" 'y'"


def test_entities_are_decoded_once() -> None:
    assert parse_envoi(block("<sms>&amp;lt;</sms>")).get("sms") == "&lt;"


def test_unknown_entities_and_bare_ampersands_kept() -> None:
    envoi = parse_envoi(block("<sms>&eacute; &nbsp; &AMP; & ; &amp</sms>"))
    assert envoi.get("sms") == "&eacute; &nbsp; &AMP; & ; &amp"


def test_numeric_entities() -> None:
    envoi = parse_envoi(block("<sms>&#233;t&#xE9; &#X20AC; &#0000065; &#128512;</sms>"))
    assert envoi.get("sms") == "été € A \U0001f600"


@pytest.mark.parametrize(
    "ref", ["&#0;", "&#x0;", "&#1;", "&#xD800;", "&#xDFFF;", "&#x110000;", "&#99999999999999;"]
)
def test_invalid_numeric_entity_kept_as_written(ref: str) -> None:
    assert parse_envoi(block(f"<sms>a{ref}b</sms>")).get("sms") == f"a{ref}b"


def test_huge_numeric_entity_does_not_crash() -> None:
    ref = "&#" + "9" * 10_000 + ";"
    assert parse_envoi(block(f"<sms>{ref}</sms>")).get("sms") == ref


def test_cdata_taken_literally() -> None:
    envoi = parse_envoi(block("<sms>x <![CDATA[a & b &amp; <c> </sms>]]> &amp; y</sms>"))
    assert envoi.get("sms") == "x a & b &amp; <c> </sms> & y"


def test_unclosed_cdata_is_plain_text() -> None:
    envoi = parse_envoi(block("<sms><![CDATA[abc &amp;</sms>"))
    assert envoi.get("sms") == "<![CDATA[abc &"


def test_tags_in_any_case() -> None:
    envoi = parse_envoi("<ENVOI><EmailId>7</emailid><KEYID>k</KeyId><Sms>hi</SMS></Envoi>")
    assert envoi.fields == {"emailid": "7", "keyid": "k", "sms": "hi"}
    assert envoi.get("EMAILID") == "7"
    assert envoi.get("emailId") == "7"


def test_opening_tags_with_whitespace_and_attributes() -> None:
    envoi = parse_envoi('<envoi version="1">\n<sms lang="fr" >x</sms >\n</envoi >')
    assert envoi.get("sms") == "x"


def test_self_closing_is_present_but_empty() -> None:
    envoi = parse_envoi(block("<emetteur/><tracker /><nostop a='1'/><num>1</num>"))
    assert envoi.get("emetteur") == ""
    assert envoi.get("tracker") == ""
    assert envoi.get("nostop") == ""
    assert envoi.get("num") == "1"
    assert envoi.get("sms") is None


def test_empty_element() -> None:
    assert parse_envoi(block("<emetteur></emetteur>")).get("emetteur") == ""
    assert parse_envoi(block("<emetteur>  \n </emetteur>")).get("emetteur") == ""


def test_unclosed_tag_is_skipped() -> None:
    envoi = parse_envoi(block("<keyid>abc\n<num>0601020304</num>\n<sms>hi</sms>"))
    assert envoi.get("keyid") is None
    assert envoi.get("num") == "0601020304"
    assert envoi.get("sms") == "hi"


def test_closing_tag_must_have_the_same_name() -> None:
    envoi = parse_envoi(block("<num>0601</sms>2</NUM><sms>x</sms>"))
    assert envoi.get("num") == "0601</sms>2"
    assert envoi.get("sms") == "x"


def test_first_occurrence_wins() -> None:
    envoi = parse_envoi(block("<num>1</num><NUM>2</NUM><num>3</num>"))
    assert envoi.get("num") == "1"


def test_value_is_trimmed_and_raw_newlines_are_wrapping() -> None:
    envoi = parse_envoi(block("<sms>\n  ligne 1\n  ligne 2ÖfinÖ \r\n</sms>"))
    assert envoi.get("sms") == "ligne 1 ligne 2ÖfinÖ"


def test_text_around_the_block_is_ignored() -> None:
    text = (
        "Bonjour,\nvoici <b>ma</b> demande <num>999</num>:\n\n"
        + SEED_SINGLE
        + "\n--\nJean Dupont <jean@example.com>\n<sms>not this</sms>\n"
    )
    envoi = parse_envoi(text)
    assert envoi.get("num") == "0601020304"
    assert envoi.get("sms") == "L'été est fini! Super promo -10% à partir de 50€ d'achat !!!"


def test_only_the_first_block_is_read() -> None:
    envoi = parse_envoi(block("<num>1</num>") + block("<num>2</num><sms>x</sms>"))
    assert envoi.fields == {"num": "1"}


def test_missing_closing_envoi_reads_to_the_end() -> None:
    envoi = parse_envoi("<envoi>\n<keyid>k</keyid>\n<emailId>3</emailId>\n-- \nsignature")
    assert envoi.fields == {"keyid": "k", "emailid": "3"}


def test_envoi_name_must_be_whole() -> None:
    envoi = parse_envoi("<envoix><num>1</num></envoix>")
    assert not envoi.has_wrapper
    assert envoi.fields == {"num": "1"}  # read as a request without a wrapper


def test_self_closing_envoi_is_not_a_block() -> None:
    assert parse_envoi("<envoi/> <envoi><num>1</num></envoi>").get("num") == "1"
    assert not parse_envoi("<envoi /><num>1</num>").has_wrapper


def test_commented_out_elements_are_ignored() -> None:
    envoi = parse_envoi(block("<num1>1</num1>\n<!-- <num2>2</num2> -->\n<sms>x</sms>"))
    assert envoi.fields == {"num1": "1", "sms": "x"}


def test_block_inside_a_comment_is_not_the_block() -> None:
    text = "<!-- exemple: <envoi><num>0</num></envoi> -->\n" + block("<num>1</num>")
    assert parse_envoi(text).get("num") == "1"


def test_unclosed_comment_is_plain_text() -> None:
    assert parse_envoi(block("<!-- <num>1</num>")).get("num") == "1"


@pytest.mark.parametrize("text", ["", "hello", "<envoi", "<env>x</env>", "&lt;envoi&gt;"])
def test_no_block_reads_no_wrapper(text: str) -> None:
    envoi = parse_envoi(text)
    assert not envoi.has_wrapper


def test_misspelled_wrapper_still_reads_the_fields() -> None:
    """SPEC 8: no <envoi> but readable <keyid>/<emailAck>: Ack 3 goes there."""
    text = "<envoie>\n<keyid>k</keyid>\n<emailAck>a@b.test</emailAck>\n<sms>x</sms>\n</envoie>"
    envoi = parse_envoi(text)
    assert not envoi.has_wrapper
    assert envoi.get("keyid") == "k" and envoi.get("emailack") == "a@b.test"


def test_wrapped_value_lines_become_one_space() -> None:
    """SPEC 2: a raw line break in a value is the client's wrapping."""
    text = block(
        "<sms>Votre colis 4521 est arrive au point relais et peut etre  \n"
        "   recupere des demain.\r\n\n  Merci</sms>"
    )
    assert parse_envoi(text).get("sms") == (
        "Votre colis 4521 est arrive au point relais et peut etre recupere des demain. Merci"
    )


def test_referenced_line_break_and_o_umlaut_stay() -> None:
    envoi = parse_envoi(block("<sms>a&#10;bÖc\tlast</sms>"))
    assert envoi.get("sms") == "a\nbÖc\tlast"


def test_wrapped_cdata_is_unwrapped_too() -> None:
    assert parse_envoi(block("<sms><![CDATA[Tom &\n Jerry]]></sms>")).get("sms") == "Tom & Jerry"


XXE = """<?xml version="1.0"?>
<!DOCTYPE envoi [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<envoi><keyid>k</keyid><sms>&xxe;</sms><emailId>1</emailId></envoi>"""

BILLION_LAUGHS = """<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<envoi><sms>&lol3;</sms></envoi>"""


@pytest.mark.parametrize(
    "text",
    [
        XXE,
        BILLION_LAUGHS,
        block('<!ENTITY x "y"><sms>&x;</sms>'),
        block("<sms>a</sms>") + "<!doctype html>",
        "<!DocType x>" + block("<sms>a</sms>"),
        block("<sms><![CDATA[<!ENTITY a 'b'>]]></sms>"),
        block("<sms>a</sms><! ENTITY x 'y'>"),
    ],
)
def test_doctype_or_entity_declaration_is_flagged_never_expanded(text: str) -> None:
    envoi = parse_envoi(text)
    assert envoi.has_declarations
    # Nothing is expanded: entity references stay exactly as written.
    sms = envoi.get("sms") or ""
    assert "lol" not in sms.replace("&lol3;", "")
    assert "root:" not in sms


def test_declaration_keeps_the_fields_readable() -> None:
    envoi = parse_envoi(XXE)
    assert (envoi.get("keyid"), envoi.get("sms"), envoi.get("emailid")) == ("k", "&xxe;", "1")


def test_no_declaration_is_not_flagged() -> None:
    assert not parse_envoi(block("<sms>&lt;!DOCTYPE</sms>")).has_declarations


def test_get_is_case_insensitive_and_envoi_constructible() -> None:
    envoi = Envoi({"emailack": "a@b.c"})
    assert envoi.get("emailAck") == "a@b.c"
    assert envoi.get("EMAILACK") == "a@b.c"
    assert envoi.get("emailnot") is None


@pytest.mark.parametrize(
    "hostile",
    [
        "<" * 2_000_000,
        "<envoi>" + "<" * 2_000_000,
        "<envoi>" + "<a>" * 700_000,
        "<envoi>" + "".join(f"<t{i}>" for i in range(200_000)),
        "<envoi>" + "<a " * 700_000,
        "<envoi>" + "</a" * 700_000,
        "<envoi>" + "<![CDATA[<!--" * 150_000,
        "<envoi><sms>" + "&#" * 1_000_000,
        "<envoi><sms>" + "&#x" + "0" * 2_000_000,
        "<envoi " * 300_000,
        "<envoi>" + "<sms>" * 200_000 + "</sms>" * 200_000,
        "<envoi>" + "<sms><!-- " * 200_000,
    ],
)
def test_adversarial_input_returns(hostile: str) -> None:
    # Linear-time scanning: these finish in milliseconds (no timing asserted).
    envoi = parse_envoi(hostile)
    assert isinstance(envoi.fields, dict)


def test_nested_same_tag_ends_at_the_first_closing() -> None:
    envoi = parse_envoi(block("<sms>a <sms>b</sms> c</sms><num>1</num>"))
    assert envoi.get("sms") == "a <sms>b"
    assert envoi.get("num") == "1"


def test_o_umlaut_is_not_a_newline_here() -> None:
    assert parse_envoi(block("<sms>aÖb</sms>")).get("sms") == "aÖb"


def test_crlf_text() -> None:
    envoi = parse_envoi("<envoi>\r\n<keyid>k</keyid>\r\n<sms>a\r\nb</sms>\r\n</envoi>\r\n")
    assert envoi.get("keyid") == "k"
    assert envoi.get("sms") == "a b"
