"""The SMSC peer's own limit at a window: a bare SMPP client (our PDU codec and
nothing else: no store, no pipeline) binds once and submits N one-part SMS,
keeping W submit_sm outstanding. bench/run.py compares mailbridge's parts/s at
the same window with it, as it compares the intake with a bare aiosmtpd.

    python bench/smsc_limit.py PORT SYSTEM_ID PASSWORD N WINDOW

Prints one JSON line: {"parts": N, "seconds": S, "parts_per_s": R}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from mailbridge.providers import smpp_pdu as pdu


async def read_pdu(reader: asyncio.StreamReader) -> pdu.Pdu:
    header = await reader.readexactly(16)
    rest = await reader.readexactly(pdu.frame_length(header) - 16)
    return pdu.decode(header + rest)


async def blast(port: int, system_id: str, password: str, total: int, window: int) -> float:
    """Seconds from the first submit_sm to the last submit_sm_resp."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    bind = pdu.Pdu(
        pdu.BIND_TRANSCEIVER,
        1,
        fields={
            "system_id": system_id.encode(),
            "password": password.encode(),
            "interface_version": pdu.INTERFACE_VERSION,
        },
    )
    writer.write(pdu.encode(bind))
    answer = await read_pdu(reader)
    if answer.status != pdu.ESME_ROK:
        raise SystemExit(f"bind refused: {pdu.status_name(answer.status)}")
    sent = answered = 0
    started = time.monotonic()
    while answered < total:
        while sent < total and sent - answered < window:
            sent += 1
            submit = pdu.Pdu(
                pdu.SUBMIT_SM,
                sent + 1,
                fields={
                    "source_addr": b"Bench",
                    "destination_addr": f"336{10_000_000 + sent:08d}".encode(),
                    "registered_delivery": 1,
                    "short_message": b"Bench SMPP",
                },
            )
            writer.write(pdu.encode(submit))
        reply = await read_pdu(reader)
        if reply.command_id == pdu.SUBMIT_SM_RESP:
            if reply.status != pdu.ESME_ROK:
                raise SystemExit(f"submit refused: {pdu.status_name(reply.status)}")
            answered += 1
    seconds = time.monotonic() - started
    writer.close()
    return seconds


def main() -> None:
    port, system_id, password, total, window = sys.argv[1:6]
    seconds = asyncio.run(blast(int(port), system_id, password, int(total), int(window)))
    print(
        json.dumps({"parts": int(total), "seconds": seconds, "parts_per_s": int(total) / seconds})
    )


if __name__ == "__main__":
    main()
