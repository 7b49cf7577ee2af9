#!/usr/bin/env bash
# The README's first command: set up, then run kiwi-restore's main job on the embedded
# default (local directory store, local keystore; no server needed), in ./demo:
# a health-data contract, two machines, a few snapshots, listing and restoring a file,
# an integrity check and the audit trail's verification.
# Re-running starts the demo afresh (./demo is replaced).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
ROOT=$PWD/demo
rm -rf "$ROOT"
mkdir -p "$ROOT"
export KIWI_RESTORE_HOME=$ROOT/site
export KIWI_RESTORE_PASSPHRASE_FILE=$ROOT/passphrase
export KIWI_RESTORE_ACTOR=demo-operator
head -c 24 /dev/urandom | base64 > "$KIWI_RESTORE_PASSPHRASE_FILE"
chmod 600 "$KIWI_RESTORE_PASSPHRASE_FILE"
K() { echo; echo "\$ kiwi-restore $*"; .venv/bin/kiwi-restore "$@"; }

# a small medical office's data, on two machines
.venv/bin/python scripts/make_demo_tree.py "$ROOT/reception" "$ROOT/cabinet"

K init
K contract create cabinet-martin --offer sante --client "Cabinet du Dr Martin"
K machine add cabinet-martin reception
K machine add cabinet-martin cabinet
K backup cabinet-martin --machine reception "$ROOT/reception" --time 2026-09-01T18:00
K backup cabinet-martin --machine cabinet "$ROOT/cabinet" --time 2026-09-01T18:30
echo "Lettre modifiée le 2 septembre" >> "$ROOT/cabinet/Patients/Dupont Jeanne/Courrier 2026-08-28.txt"
K backup cabinet-martin --machine cabinet "$ROOT/cabinet" --time 2026-09-02T18:30
rm "$ROOT/cabinet/Patients/Dupont Jeanne/Courrier 2026-08-28.txt"
K backup cabinet-martin --machine cabinet "$ROOT/cabinet" --time 2026-09-03T18:30
K snapshots cabinet-martin
K ls cabinet-martin latest "$ROOT/cabinet/Patients" --machine cabinet -l
echo; echo "# the letter was deleted on the 3rd: restore it as it was on the 2nd"
K restore cabinet-martin --at 2026-09-02T23:59 --machine cabinet \
  "$ROOT/cabinet/Patients/Dupont Jeanne/Courrier 2026-08-28.txt" --target "$ROOT/restored"
echo; echo "\$ cat $ROOT/restored/Courrier 2026-08-28.txt"
cat "$ROOT/restored/Courrier 2026-08-28.txt"
echo; echo "# browse: mount every snapshot read-only and copy a file out, as a client would"
mkdir -p "$ROOT/mnt"
if [ -e /dev/fuse ]; then
  K mount cabinet-martin "$ROOT/mnt"
  echo; echo "\$ ls $ROOT/mnt $ROOT/mnt/cabinet"; ls "$ROOT/mnt" "$ROOT/mnt/cabinet"
  SNAP2=$(ls "$ROOT/mnt/cabinet" | grep '^2026-09-02')
  LETTER="$ROOT/mnt/cabinet/$SNAP2$ROOT/cabinet/Patients/Dupont Jeanne/Courrier 2026-08-28.txt"
  echo; echo "\$ cp -a \"$LETTER\" $ROOT/copied.txt"; cp -a "$LETTER" "$ROOT/copied.txt"
  ls -l "$ROOT/copied.txt"
  K umount "$ROOT/mnt"
else
  echo "(no /dev/fuse on this machine: mount skipped)"
fi
echo; echo "# reversibility: the whole contract as a BagIt bag for the new provider, then re-verified there"
K export cabinet-martin --to "$ROOT/new-provider" --progress none
K export verify --to "$ROOT/new-provider" --progress none
K check cabinet-martin --read-data
K audit verify
echo; echo "# end of contract: the letter arrived on 2026-09-01; the health-data restore window"
echo "# (90 days after the end of contract) closes on 2027-03-01. The demo moves its clock past it."
K contract terminate cabinet-martin --letter-received 2026-09-01
K contract status cabinet-martin
export KIWI_RESTORE_CLOCK=2027-03-02T03:00   # demo only: refused on a production site
K purge --due
unset KIWI_RESTORE_CLOCK
CERT=$(ls "$KIWI_RESTORE_HOME"/certificates/KR-DEL-*.json | grep -v canonical)
echo; echo "\$ cat $CERT"; cat "$CERT"
K certificate verify "$CERT"
.venv/bin/kiwi-restore key public > "$ROOT/provider.pem"
echo; echo "\$ openssl pkeyutl -verify -pubin -inkey provider.pem -rawin -in ${CERT%.json}.canonical.json -sigfile ${CERT%.json}.sig"
openssl pkeyutl -verify -pubin -inkey "$ROOT/provider.pem" -rawin -in "${CERT%.json}.canonical.json" -sigfile "${CERT%.json}.sig"
K restore cabinet-martin latest --target "$ROOT/too-late" || echo "(refused, as it must be)"
K audit verify
echo
echo "Demo site: $KIWI_RESTORE_HOME (passphrase in $KIWI_RESTORE_PASSPHRASE_FILE)."
echo "Try: KIWI_RESTORE_HOME=$KIWI_RESTORE_HOME KIWI_RESTORE_PASSPHRASE_FILE=$KIWI_RESTORE_PASSPHRASE_FILE .venv/bin/kiwi-restore --help"
