#!/usr/bin/env bash
# Re-extract translatable messages, merge them into the French catalog, compile it.
# Needs GNU gettext (apt-get install gettext). Run after changing user-facing messages,
# then translate the new or fuzzy entries in kiwi_restore/locale/fr/LC_MESSAGES/kiwi_restore.po.
set -euo pipefail
cd "$(dirname "$0")/.."
LOC=kiwi_restore/locale
PO=$LOC/fr/LC_MESSAGES/kiwi_restore.po
find kiwi_restore fuse exporter -name '*.py' | sort | xargs xgettext --language=Python --keyword=_ \
  --keyword=ngettext:1,2 --from-code=UTF-8 --package-name=kiwi-restore --no-wrap --sort-by-file \
  -o $LOC/kiwi_restore.pot
if [ -f "$PO" ]; then
  msgmerge --quiet --no-wrap --update --backup=none "$PO" $LOC/kiwi_restore.pot
else
  msginit --no-translator --no-wrap --locale=fr_FR.UTF-8 -i $LOC/kiwi_restore.pot -o "$PO"
fi
msgfmt --check -o "${PO%.po}.mo" "$PO"
msgfmt --statistics -o /dev/null "$PO"
