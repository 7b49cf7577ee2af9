#!/usr/bin/env python3
"""Print the msgids of the French catalog that are untranslated or fuzzy (translator's to-do list),
or, with --apply FILE.json, fill them from a JSON object {msgid: translation} and clear 'fuzzy'."""

import json
import re
import sys
from pathlib import Path

PO = Path(__file__).resolve().parent.parent / "kiwi_restore/locale/fr/LC_MESSAGES/kiwi_restore.po"


def unescape(s: str) -> str:
    return s.encode().decode("unicode_escape").encode("latin-1").decode("utf-8")


def escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")


def entries(text: str):
    for block in text.split("\n\n"):
        m = re.search(r'^msgid "(.*)"\nmsgstr "(.*)"$', block, re.M | re.S)
        if m and m.group(1):
            yield block, unescape(m.group(1)), unescape(m.group(2)), "#, fuzzy" in block


def main() -> None:
    text = PO.read_text()
    if len(sys.argv) == 3 and sys.argv[1] == "--apply":
        tr = json.loads(Path(sys.argv[2]).read_text())
        for block, mid, mstr, fuzzy in list(entries(text)):
            if mid in tr and (fuzzy or not mstr):
                new = re.sub(r"^#\| .*\n", "", block, flags=re.M)
                new = new.replace("#, fuzzy, python-brace-format\n", "#, python-brace-format\n")
                new = new.replace("#, fuzzy\n", "")
                new = re.sub(r'^msgstr ".*"$', lambda _m, t=tr[mid]: f'msgstr "{escape(t)}"', new, flags=re.M | re.S)
                text = text.replace(block, new)
        PO.write_text(text)
        return
    todo = {mid: "" for _b, mid, mstr, fuzzy in entries(text) if fuzzy or not mstr}
    print(json.dumps(todo, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
