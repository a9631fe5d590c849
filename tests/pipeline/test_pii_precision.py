"""Precision and recall of the `pii` filter on a labelled set of technical and personal text (issue 22 bug 5:
version pins, OIDs, Debian revisions became `[IP_ADDRESS]`, Luhn-valid timestamps and row ids
`[CARD_NUMBER]`, so a student learnt to write placeholders).

Each case is a sentence with one candidate string and its label: the kind of personal information it is, or
None for text that must survive verbatim. Per kind, a true positive is a labelled string replaced by its
kind's placeholder; a false positive a string replaced by that kind's placeholder that is not of that kind.

    .venv/bin/python -m tests.pipeline.test_pii_precision            # the table in the README
    .venv/bin/python -m tests.pipeline.test_pii_precision OLD.py     # the same for another filters.py
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable

from pipeline.filters import luhn, scrub

PLACEHOLDERS = {"email": "[EMAIL]", "card": "[CARD_NUMBER]", "ip": "[IP_ADDRESS]", "phone": "[PHONE]"}


def _luhn_valid(start: int, count: int, step: int = 1) -> list[str]:
    """The first `count` Luhn-valid numbers from `start` (timestamps and ids that pass the card check)."""
    out, n = [], start
    while len(out) < count:
        if luhn(str(n)):
            out.append(str(n))
        n += step
    return out


TIMESTAMPS = _luhn_valid(1_717_171_717_000, 12, 37)  # millisecond timestamps (13 digits, 2024)
ROW_IDS = _luhn_valid(4_000_000_000_000_000, 6, 1_000_003)  # 16-digit ids with a Visa-like prefix

CASES: list[tuple[str, str, str | None]] = [
    # e-mail addresses
    ("write to {} for access", "jane.doe@example.com", "email"),
    ("Contact: {}", "bob.smith+billing@mail.example.co.uk", "email"),
    ("maintainer {} (please cc)", "a_b-c@sub.example.org", "email"),
    ("git config user.email {}", "dev123@company.io", "email"),
    ("user {} logged in", "root@localhost", None),
    ("pip install pkg@{}", "git+https://github.com/org/repo", None),
    ("decorators like {} are common", "@functools.cache", None),
    # card numbers as people write them: groups, or a card word before
    ("card {} exp 12/27", "4111 1111 1111 1111", "card"),
    ("pay with {}", "5555-5555-5555-4444", "card"),
    ("Amex {}", "3782 822463 10005", "card"),
    ("my visa number is {}", "4012888888881881", "card"),
    ("credit card: {}", "6011111111111117", "card"),
    ("CC# {} cvv 123", "5105105105105100", "card"),
    ("Discover {}", "6011 0009 9013 9424", "card"),
    ("JCB {}", "3530-1113-3330-0000", "card"),
    ("billing details: card {}", "4242424242424242", "card"),
    ("charge {} now", "2223 0031 2200 3222", "card"),
    *[("event at {} ms", t, None) for t in TIMESTAMPS[:6]],
    *[("{}", t, None) for t in TIMESTAMPS[6:]],
    *[("SELECT * FROM orders WHERE id = {};", r, None) for r in ROW_IDS[:3]],
    *[("row_id={}", r, None) for r in ROW_IDS[3:]],
    ("sizes {} bytes", "1234567890123", None),
    ("the card game lasted {} turns", "12", None),
    # IP addresses
    ("server at {} is down", "192.168.1.20", "ip"),
    ("ssh admin@{} -p 22", "10.0.0.5", "ip"),
    ("curl http://{}:8080/health", "172.16.254.1", "ip"),
    ("DNS: {}", "8.8.8.8", "ip"),
    ("connection from {} port 51234", "203.0.113.7", "ip"),
    ("host {} unreachable", "2001:db8:85a3::8a2e:370:7334", "ip"),
    ("link-local {}", "fe80::1ff:fe23:4567:890a", "ip"),
    ("my IP is {}.", "98.76.54.32", "ip"),
    ("pip install numpy=={}", "1.26.4.0", None),
    ("requires torch>={}", "2.4.1.0", None),
    ("the OID {} is commonName", "2.5.4.3", None),
    ("apt install zlib1g={}", "1.2.5.1", None),
    ("zlib1g {}-2 (Debian)", "1.2.5.1", None),
    ("Version {}", "10.0.19041.1", None),
    ("release {}", "4.2.0.1", None),
    ("tag v{}", "1.2.3.4", None),
    ("libfoo-{}.tar.gz", "1.2.3.4", None),
    ("Mozilla/5.0 Chrome/{} Safari", "120.0.6099.109", None),
    ("build {}", "3.1.4.1", None),
    ("OID: {}", "1.3.6.1", None),
    ("numpy {}+cu121", "2.1.0.3", None),
    ("x[{}] and a::b", "1::2", None),
    ("version {}", "1.2.3.4.5", None),
    # phone numbers
    ("call {} today", "+1 (555) 123-4567", "phone"),
    ("office {}", "555-123-4567", "phone"),
    ("London {}", "+44 20 7946 0958", "phone"),
    ("python {} released 2024-01-15", "3.11.2", None),
]


def _load(path: str) -> Callable[[str], tuple[str, dict[str, int]]]:
    spec = importlib.util.spec_from_file_location("other_filters", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["other_filters"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.scrub


def measure(scrubber: Callable[[str], tuple[str, dict[str, int]]] = scrub) -> dict[str, dict[str, float]]:
    """Per kind: true positives, false positives, false negatives, precision and recall."""
    counts = {k: {"tp": 0, "fp": 0, "fn": 0} for k in PLACEHOLDERS}
    for template, candidate, label in CASES:
        out, _ = scrubber(template.format(candidate))
        kept = candidate in out
        for kind, placeholder in PLACEHOLDERS.items():
            replaced_as_kind = not kept and placeholder in out
            if label == kind:
                counts[kind]["tp" if replaced_as_kind else "fn"] += 1
            elif replaced_as_kind:
                counts[kind]["fp"] += 1
    for c in counts.values():
        c["precision"] = c["tp"] / max(1, c["tp"] + c["fp"])
        c["recall"] = c["tp"] / max(1, c["tp"] + c["fn"])
    return counts


def test_the_labelled_set_is_what_it_says():
    assert all(luhn(t) and len(t) == 13 for t in TIMESTAMPS)
    assert all(luhn(r) and r.startswith("4") for r in ROW_IDS)
    labels = [label for *_, label in CASES]
    assert sum(label is None for label in labels) > 30 and all(labels.count(k) >= 3 for k in PLACEHOLDERS)


def test_precision_and_recall_per_kind():
    result = measure()
    for kind, c in result.items():
        assert c["precision"] == 1.0 and c["recall"] == 1.0, (kind, c)


def test_technical_text_survives_verbatim():
    """The issue's own examples, in one text: nothing in it is personal."""
    text = ("pip install numpy==1.26.4.0 'torch>=2.4.1.0'; the OID 2.5.4.3 names commonName; Debian's zlib1g "
            f"1.2.5.1-2; logged at {TIMESTAMPS[0]} ms, row {ROW_IDS[0]}")
    assert scrub(text) == (text, {})


def test_counts_per_kind_are_reported():
    text = "mail jane@example.com, card 4111 1111 1111 1111, host 10.1.2.3, call +44 20 7946 0958"
    assert scrub(text) == ("mail [EMAIL], card [CARD_NUMBER], host [IP_ADDRESS], call [PHONE]",
                           {"email": 1, "card": 1, "ip": 1, "phone": 1})


def main(argv: list[str]) -> None:
    scrubber = _load(argv[0]) if argv else scrub
    result = measure(scrubber)
    labels = [label for *_, label in CASES]
    print(f"{len(CASES)} cases: " + ", ".join(f"{labels.count(k)} {k}" for k in PLACEHOLDERS) +
          f", {labels.count(None)} not personal")
    print("| kind | true pos. | false pos. | false neg. | precision | recall |")
    print("|---|---|---|---|---|---|")
    for kind, c in result.items():
        print(f"| {kind} | {c['tp']} | {c['fp']} | {c['fn']} | {c['precision']:.2f} | {c['recall']:.2f} |")
    micro = {k: sum(c[k] for c in result.values()) for k in ("tp", "fp", "fn")}
    print(f"all kinds: precision {micro['tp'] / max(1, micro['tp'] + micro['fp']):.3f}, recall "
          f"{micro['tp'] / max(1, micro['tp'] + micro['fn']):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
