"""SIGKILL after 250, then restart: nothing lost, nothing sent or reported twice."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from tests.support import (
    DaemonProcess,
    config_dict,
    not_codes,
    outbox_lines,
    reports_for,
    request_mail,
    send_on,
    wait_for,
)


def test_sigkill_right_after_250_then_restart(tmp_path: Path) -> None:
    rng = random.Random(20261123)
    config = config_dict(tmp_path)
    accepted: dict[str, int] = {}  # emailId -> number of recipients
    proc = DaemonProcess(tmp_path, config).start()
    try:
        for cycle in range(4):
            with proc.smtp() as smtp:
                for n in range(6):
                    email_id = f"k{cycle}-{n}"
                    count = rng.randint(1, 40)
                    numbers = {
                        f"num{i}": f"061{rng.randrange(10**7):07d}" for i in range(1, count + 1)
                    }
                    msg = request_mail(sms=f"crash test {email_id}", emailId=email_id, **numbers)
                    code, _ = send_on(smtp, msg)
                    assert code == 250
                    accepted[email_id] = count
            proc.kill()  # right after the last 250: work is in flight
            proc = DaemonProcess(tmp_path, config).start()

        def all_reported() -> bool:
            return all(len(reports_for(proc.maildir, e)["not"]) >= 1 for e in accepted)

        wait_for(all_reported, timeout=120, what="every Not report after the restarts")
    finally:
        proc.stop()

    lines = outbox_lines(proc.outbox)
    per_message = Counter(line["id"] for line in lines)
    assert max(per_message.values()) == 1, "a recipient was sent twice"
    per_request = Counter(line["request_id"] for line in lines)
    assert sorted(per_request.values()) == sorted(accepted.values())
    for email_id, count in accepted.items():
        reports = reports_for(proc.maildir, email_id)
        assert len(reports["ack"]) == 1 and len(reports["not"]) == 1, email_id
        assert [code for _, code in not_codes(reports["not"][0])] == [0] * count
