#!/usr/bin/env bash
# scripts/bench_mount/run.sh: the FUSE browse view (kiwi-restore mount) against restic mount,
# borg mount and a minimal pyfuse3 passthrough of the plain tree (ptfs.py, the ceiling of
# Python FUSE here), on the same generated dataset, in the same run.
#
# Usage:  scripts/bench_mount/run.sh [small|medium|full] [REPS]
#   needs root (drops caches), restic and borgbackup (apt), python3-llfuse for borgll,
#   the project's .venv (scripts/setup.sh); prints a summary table of medians per tool.
# Env:    TOOLS   FUSE tools to measure       (default "source ptfs restic borg" + "ours" if OURS_ENABLED=1)
#         EXPORTS tools to measure export for (default "source restic borg"      + "ours" if OURS_ENABLED=1)
#         HOT_TOOLS tools for the "hot" phase (default = TOOLS)
#         PHASES  default "dataset limits prepare measure hot export summary"; also
#                 "latency" (cold mount latency only, LAT_REPS rounds, default 7)
#         BORG_FUSE_IMPL (default pyfuse3), PTFS_PY (python for ptfs.py, default: python3 with pyfuse3 and trio)
#
# Idempotent: the dataset and repositories are created only if missing; each
# run appends JSON lines to results/<RUN_ID>.jsonl and writes
# results/<RUN_ID>.summary.md (median/min/max per tool×metric) and
# results/<RUN_ID>.env.json (versions, machine).
#
# "cold" = `sync; echo 3 > /proc/sys/vm/drop_caches` right before the step (and for
# FUSE tools additionally a fresh mount per repetition). Needs root.
set -euo pipefail

SCALE=${1:-small}
REPS=${2:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
DATA=/tmp/bench-data/$SCALE
SRC=$DATA/src
MNTBASE=/tmp/bench-mnt
RESULTS=${RESULTS:-/tmp/bench-data/results}
RUN_ID=${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)-$SCALE}
OUT=$RESULTS/$RUN_ID.jsonl
PY=${PY:-python3}
PTFS_PY=${PTFS_PY:-$(cd "$HERE/../.." && pwd)/.venv/bin/python}
U="$PY $HERE/bench_util.py"
PHASES=${PHASES:-dataset limits prepare measure hot export summary}

export RESTIC_PASSWORD=${RESTIC_PASSWORD:-bench-password}
export BORG_PASSPHRASE=${BORG_PASSPHRASE:-bench-password}
export BORG_FUSE_IMPL=${BORG_FUSE_IMPL:-pyfuse3}
export BORG_BASE_DIR=$DATA/borg-base          # keep borg cache/config out of ~
export RESTIC_CACHE_DIR=$DATA/restic-cache
RESTIC_REPO=$DATA/restic-repo
BORG_REPO=$DATA/borg-repo
BORG_ARCHIVE=snap

# the peers, from Debian's packages (borg mount needs Debian's pyfuse3 or llfuse)
need=""
for p in restic borgbackup python3-pyfuse3 python3-llfuse fuse3; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done
if [[ -n $need ]]; then
  echo "[bench] installing:$need" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >&2 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >&2; }
fi
mkdir -p "$RESULTS" "$MNTBASE"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
has_phase() { [[ " $PHASES " == *" $1 "* ]]; }
q() { printf '%q' "$1"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

###############################################################################
# Tool adapters. Each FUSE tool T provides:
#   T_prepare SRC_DIR   ingest the dataset (idempotent; may emit ingest_* figures)
#   T_mount MNT         start the mount IN THE FOREGROUND as a background job and
#                       set MOUNT_PID to the process that serves the FUSE fs
#   T_root MNT          print the path inside MNT that corresponds to SRC_DIR
#   T_export            write a tar of the whole snapshot to stdout
# "source" is the plain directory (physical limit): no mount, root = SRC.
###############################################################################

source_prepare() { :; }
source_root() { echo "$SRC"; }
source_export() { tar cf - -C "$DATA" src; }

# --- minimal pyfuse3 passthrough (FUSE + Python ceiling) ---------------------
ptfs_prepare() { :; }
ptfs_mount() { "$PTFS_PY" "$HERE/ptfs.py" "$SRC" "$1" >"$DATA/ptfs.log" 2>&1 & MOUNT_PID=$!; }
ptfs_root() { echo "$1"; }

# --- borg again, but through llfuse instead of pyfuse3/trio (same app, other binding)
borgll_prepare() { borg_prepare "$@"; }
borgll_mount() { BORG_FUSE_IMPL=llfuse borg mount -f "$BORG_REPO::$BORG_ARCHIVE" "$1" >"$DATA/borgll-mount.log" 2>&1 & MOUNT_PID=$!; }
borgll_root() { echo "$1/src"; }

# storage behind each tool (pre-read into the page cache by the "hot" phase)
source_store() { echo "$SRC"; }
ptfs_store() { echo "$SRC"; }
restic_store() { echo "$RESTIC_REPO"; echo "$RESTIC_CACHE_DIR"; }
borg_store() { echo "$BORG_REPO"; }
borgll_store() { echo "$BORG_REPO"; }

# --- restic --------------------------------------------------------------------
restic_prepare() {
  if ! restic -r "$RESTIC_REPO" cat config >/dev/null 2>&1; then
    rm -rf "$RESTIC_REPO"; restic -r "$RESTIC_REPO" init -q
  fi
  if [[ -z "$(restic -r "$RESTIC_REPO" snapshots -q --json 2>/dev/null | tr -d '[]\n ')" ]]; then
    log "restic backup (ingest)"
    (cd "$DATA" && $U run $TAGS --tag tool=restic --metric ingest --out "$OUT" "restic -r $(q "$RESTIC_REPO") backup -q src")
    $U emit $TAGS --tag tool=restic --out "$OUT" --metric repo_size_MiB --unit MiB \
      --value "$(du -sm "$RESTIC_REPO" | cut -f1)"
  fi
}
restic_mount() { restic -r "$RESTIC_REPO" mount "$1" >"$DATA/restic-mount.log" 2>&1 & MOUNT_PID=$!; }
restic_root() { echo "$1/snapshots/latest/src"; }
restic_export() { restic -r "$RESTIC_REPO" dump latest /; }

# --- borg ------------------------------------------------------------------------
borg_prepare() {
  if [[ ! -f "$BORG_REPO/config" ]]; then
    rm -rf "$BORG_REPO"; borg init -e repokey-blake2 "$BORG_REPO" 2>/dev/null
  fi
  if ! borg list "$BORG_REPO::$BORG_ARCHIVE" >/dev/null 2>&1; then
    log "borg create (ingest)"
    (cd "$DATA" && $U run $TAGS --tag tool=borg --metric ingest --out "$OUT" "borg create $(q "$BORG_REPO::$BORG_ARCHIVE") src")
    $U emit $TAGS --tag tool=borg --out "$OUT" --metric repo_size_MiB --unit MiB \
      --value "$(du -sm "$BORG_REPO" | cut -f1)"
  fi
}
borg_mount() { borg mount -f "$BORG_REPO::$BORG_ARCHIVE" "$1" >"$DATA/borg-mount.log" 2>&1 & MOUNT_PID=$!; }
borg_root() { echo "$1/src"; }
borg_export() { borg export-tar "$BORG_REPO::$BORG_ARCHIVE" -; }

###############################################################################
# >>>>>>>>>>>>>>>>>>>>>>>>>>>>  HOOK: OUR TOOL  <<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<
# Fill in these four functions and run with OURS_ENABLED=1 to measure our
# restore service exactly like the peers. Contract:
#   ours_prepare DATASET_DIR : back up DATASET_DIR (== $SRC; its parent is $DATA,
#                              the archived top-level name must be "src") into a
#                              repo under $DATA, idempotently; wrap the ingest in
#                              `$U run ... --metric ingest` to record its time.
#   ours_mount MNT           : start the read-only FUSE mount in the FOREGROUND
#                              as a background job; set MOUNT_PID=$! (the PID whose
#                              VmHWM is reported). Must not daemonize.
#   ours_root MNT            : echo the path inside MNT equal to DATASET_DIR.
#   ours_export              : stream the whole snapshot as tar to stdout.
###############################################################################
OURS_ENABLED=${OURS_ENABLED:-1}
ROOT=$(cd "$HERE/../.." && pwd)
KIWI=${KIWI:-$ROOT/.venv/bin/kiwi-restore}
OURS_REPO=$DATA/ours-site
ours_env() {
  export KIWI_RESTORE_HOME=$OURS_REPO KIWI_RESTORE_PASSPHRASE=bench-password KIWI_RESTORE_NO_COMMAND_SERVER=1
  unset KIWI_RESTORE_RUNTIME_DIR
}
ours_prepare() {
  ours_env
  if [[ ! -f $OURS_REPO/kiwi.json ]]; then
    "$KIWI" init >/dev/null && "$KIWI" contract create bench --offer sante >/dev/null && "$KIWI" machine add bench pc1 >/dev/null
  fi
  if [[ "$("$KIWI" snapshots bench --json)" == "[]" ]]; then
    log "kiwi-restore backup (ingest)"
    (cd "$DATA" && $U run $TAGS --tag tool=ours --metric ingest --out "$OUT" "$(q "$KIWI") backup bench -m pc1 src")
    $U emit $TAGS --tag tool=ours --out "$OUT" --metric repo_size_MiB --unit MiB \
      --value "$(du -sm "$OURS_REPO/store" | cut -f1)"
  fi
}
ours_mount() { ours_env; "$KIWI" mount bench "$1" --foreground >"$DATA/ours-mount.log" 2>&1 & MOUNT_PID=$!; }
ours_root() { echo "$1/pc1/latest$SRC"; }
# whole-contract export is measured by scripts/bench_export.py (ours writes to a destination, not stdout)
ours_export() { false; }
ours_store() { echo "$OURS_REPO/store"; }
# "ourscs": the same, the command forked by a warm `kiwi-restore command-server` (started
# once before the first timing, as a systemd service would be). MOUNT_PID is the caller
# (the mount ends with it; unmount waits for it); the RSS is the serving child's.
OURSCS_RUNTIME=$DATA/ourscs-runtime
OURSCS_PID=""
ourscs_prepare() { ours_prepare "$@"; }
ourscs_before_mount() {
  ours_env; export KIWI_RESTORE_RUNTIME_DIR=$OURSCS_RUNTIME
  if [[ -z $OURSCS_PID ]] || ! kill -0 "$OURSCS_PID" 2>/dev/null; then
    "$KIWI" command-server >"$DATA/ourscs-server.log" 2>&1 & OURSCS_PID=$!
    for _ in $(seq 600); do grep -q "listening on" "$DATA/ourscs-server.log" && break; sleep 0.1; done
    grep -q "listening on" "$DATA/ourscs-server.log" || { log "command server did not start"; exit 1; }
    drop_caches  # what its start read is not left in the page cache for the first timing
  fi
  unset KIWI_RESTORE_NO_COMMAND_SERVER
}
ourscs_mount() { "$KIWI" mount bench "$1" --foreground >"$DATA/ourscs-mount.log" 2>&1 & MOUNT_PID=$!; }
ourscs_rss_pid() { sed -n 's/^command server: child \([0-9]*\) .*/\1/p' "$DATA/ourscs-server.log" | tail -1; }
ourscs_root() { ours_root "$@"; }
ourscs_export() { false; }
ourscs_store() { ours_store; }
# <<<<<<<<<<<<<<<<<<<<<<<<<<<<<  END HOOK  >>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>

# export commands run in `bash -c` (see bench_util.py run): export what they need
export DATA SRC RESTIC_REPO BORG_REPO BORG_ARCHIVE OURS_CMD OURS_REPO
export -f source_export restic_export borg_export ours_export ourscs_export

TOOLS=${TOOLS:-"source ptfs restic borg"}
EXPORTS=${EXPORTS:-"source restic borg"}
if [[ $OURS_ENABLED == 1 && " $TOOLS " != *" ours "* ]]; then TOOLS="$TOOLS ours"; fi
HOT_TOOLS=${HOT_TOOLS:-$TOOLS}

# ---- mount bookkeeping / cleanup ---------------------------------------------
ACTIVE_MNT=""; MOUNT_PID=""
unmount_tool() {
  local mnt=$1 pid=$2
  if mountpoint -q "$mnt"; then fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" || true; fi
  if [[ -n "$pid" ]]; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "pid $pid still alive after unmount, sending TERM"; kill "$pid" || true; fi
    wait "$pid" 2>/dev/null || true
  fi
  ACTIVE_MNT=""; MOUNT_PID=""
}
cleanup() {
  [[ -n "$ACTIVE_MNT" ]] && unmount_tool "$ACTIVE_MNT" "$MOUNT_PID"
  [[ -n $OURSCS_PID ]] && kill "$OURSCS_PID" 2>/dev/null
  true
}
# the process whose peak RSS is the tool's (the mount's server; ourscs: the forked child)
rss_pid() { if declare -F "${1}_rss_pid" >/dev/null; then "${1}_rss_pid"; else echo "$MOUNT_PID"; fi; }
trap cleanup EXIT INT TERM

# ---- dataset -----------------------------------------------------------------
if has_phase dataset || [[ ! -f $DATA/manifest.json ]]; then
  log "dataset ($SCALE)"
  $PY "$HERE/../make_dataset.py" --scale "$SCALE" >/dev/null
fi
mf() { $PY -c "import json,sys; print(json.load(open('$DATA/manifest.json'))[sys.argv[1]])" "$1"; }
SMALL_DIR=$(mf small_dir)
BIG1=$($PY -c "import json; print(json.load(open('$DATA/manifest.json'))['big_files'][0])")
BIG2=$($PY -c "import json; print(json.load(open('$DATA/manifest.json'))['big_files'][1])")
TAGS="--tag scale=$SCALE --tag run=$RUN_ID"

# ---- environment record --------------------------------------------------------
$PY - "$RESULTS/$RUN_ID.env.json" <<EOF
import json, platform, subprocess, sys, os
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception as e: return str(e)
env = dict(run=os.environ.get("RUN_ID", "$RUN_ID"), scale="$SCALE", reps=$REPS, tools="$TOOLS", exports="$EXPORTS",
  kernel=platform.release(), cpu=sh("grep -m1 'model name' /proc/cpuinfo"), ncpu=os.cpu_count(),
  mem=sh("grep MemTotal /proc/meminfo"), restic=sh("restic version"), borg=sh("borg --version"),
  borg_fuse_impl=os.environ.get("BORG_FUSE_IMPL"), fuse=sh("fusermount3 -V"), tar=sh("tar --version"),
  openssl=sh("openssl version"), python=sys.version.split()[0],
  ptfs_python=sh("$PTFS_PY -c 'import sys,pyfuse3,trio; print(sys.version.split()[0], pyfuse3.__version__, trio.__version__)'"),
  sys_pyfuse3=sh("/usr/bin/python3 -c 'import pyfuse3,trio; print(pyfuse3.__version__, trio.__version__)'"),
  manifest=json.load(open("$DATA/manifest.json")))
json.dump(env, open(sys.argv[1], "w"), indent=1, ensure_ascii=False)
EOF

# ---- physical limits -----------------------------------------------------------
if has_phase limits; then
  log "limits: openssl speed, hashlib, python AEAD"
  for alg in aes-256-gcm chacha20-poly1305; do
    v=$(openssl speed -mr -seconds 3 -bytes 16384 -evp "$alg" 2>/dev/null | awk -F: '/^\+F:/ {print $4}')
    $U emit $TAGS --tag tool=limits --out "$OUT" --metric "openssl_${alg}_16KiB_MBps" --unit MB/s \
      --value "$($PY -c "print(round($v/1e6,1))")"
  done
  $U hashspeed $TAGS --tag tool=limits --out "$OUT" >/dev/null
  $U cryptospeed $TAGS --tag tool=limits --out "$OUT" >/dev/null || true
fi

# ---- prepare (backups) -----------------------------------------------------------
if has_phase prepare; then
  for t in $TOOLS; do log "prepare $t"; "${t}_prepare" "$SRC"; done
fi

# ---- FUSE / read-path measurements -----------------------------------------------
# mount_fresh TOOL "WAITLS ARGS": a fresh mount of TOOL, timed until its root lists (the
# mount latency); sets ROOT (the dataset inside it; the plain directory for "source")
mount_fresh() {
  local tool=$1 wargs=$2 mnt t0
  if [[ $tool == source ]]; then
    ROOT=$SRC
    return
  fi
  mnt=$MNTBASE/$tool
  mountpoint -q "$mnt" && fusermount3 -u "$mnt"
  mkdir -p "$mnt"
  if declare -F "${tool}_before_mount" >/dev/null; then "${tool}_before_mount"; fi
  ROOT=$("${tool}_root" "$mnt")
  local t0 t1 entries deadline=$((SECONDS + 900))
  t0=$(date +%s.%N)
  "${tool}_mount" "$mnt"; ACTIVE_MNT=$mnt
  # polled from this shell (a glob reads the directory): a Python poller started here would
  # count its own start, 0.1-0.25 s cold on this machine, in every tool's latency
  shopt -s nullglob dotglob
  while entries=("$ROOT"/*); ((${#entries[@]} == 0)) && ((SECONDS < deadline)); do sleep 0.01; done
  shopt -u nullglob dotglob
  t1=$(date +%s.%N)
  $U waitls $wargs --t0 "$t0" --t1 "$t1" --path "$ROOT" >/dev/null
}

measure_tool() {
  local tool=$1 rep=$2 root mnt
  local T="$TAGS --tag tool=$tool --tag rep=$rep --out $OUT"
  log "measure $tool rep $rep"
  drop_caches
  mount_fresh "$tool" "$T"; root=$ROOT; mnt=$MNTBASE/$tool
  $U run $T --metric find_cold --count-from-stdout "find $(q "$root") | wc -l" >/dev/null
  $U run $T --metric find_warm --count-from-stdout "find $(q "$root") | wc -l" >/dev/null
  drop_caches
  $U run $T --metric tar_small_cold --bytes-from-stdout "tar cf - -C $(q "$root") $(q "$SMALL_DIR") | wc -c" >/dev/null
  drop_caches
  $U run $T --metric seq_read_bigfile_cold --bytes-from-stdout \
    "dd if=$(q "$root/$BIG1") of=/dev/null bs=1M status=none && stat -L -c %s $(q "$root/$BIG1")" >/dev/null
  drop_caches
  $U pread $T --file "$root/$BIG2" --n 2000 --seed "$rep" >/dev/null
  if [[ $tool != source ]]; then
    $U hwm $T --pid "$(rss_pid "$tool")" >/dev/null
    unmount_tool "$mnt" "$MOUNT_PID"
  fi
}
if has_phase measure; then
  # as an installed package would be: our modules compiled ahead (PYTHONDONTWRITEBYTECODE
  # would otherwise make every mount compile them again)
  project=$(cd "$HERE/../.." && pwd)
  "$project/.venv/bin/python" -m compileall -q "$project/kiwi_restore" "$project/exporter" "$project/fuse" >/dev/null
  for rep in $(seq "$REPS"); do
    for t in $TOOLS; do measure_tool "$t" "$rep"; done
  done
fi

# ---- latency: cold mount latency alone, LAT_REPS rounds, tools interleaved ----------
if has_phase latency; then
  for rep in $(seq "${LAT_REPS:-7}"); do
    for t in $TOOLS; do
      [[ $t == source ]] && continue
      log "latency $t rep $rep"
      drop_caches
      mount_fresh "$t" "$TAGS --tag tool=$t --tag rep=$rep --out $OUT --metric mount_latency_only_s"
      unmount_tool "$MNTBASE/$t" "$MOUNT_PID"
    done
  done
fi

# ---- hot: backing storage already in the page cache, fresh mount ----------------
# Isolates the tool's CPU/FUSE cost from disk I/O. For "source" this is pure tar/dd speed.
measure_hot() {
  local tool=$1 rep=$2 root mnt d
  local T="$TAGS --tag tool=$tool --tag rep=$rep --out $OUT"
  log "hot $tool rep $rep"
  while read -r d; do [[ -e $d ]] && find "$d" -type f -print0 | xargs -0 -r cat > /dev/null; done < <("${tool}_store")
  mount_fresh "$tool" "$T --metric mount_latency_hot_s"; root=$ROOT; mnt=$MNTBASE/$tool
  $U run $T --metric tar_small_hot --bytes-from-stdout "tar cf - -C $(q "$root") $(q "$SMALL_DIR") | wc -c" >/dev/null
  $U run $T --metric seq_read_bigfile_hot --bytes-from-stdout \
    "dd if=$(q "$root/$BIG1") of=/dev/null bs=1M status=none && stat -L -c %s $(q "$root/$BIG1")" >/dev/null
  $U pread $T --prefix rand4k_hot --file "$root/$BIG2" --n 2000 --seed "$rep" >/dev/null
  if [[ $tool != source ]]; then
    $U hwm $T --metric rss_hwm_hot_MiB --pid "$(rss_pid "$tool")" >/dev/null
    unmount_tool "$mnt" "$MOUNT_PID"
  fi
}
if has_phase hot; then
  for rep in $(seq "$REPS"); do
    for t in $HOT_TOOLS; do measure_hot "$t" "$rep"; done
  done
fi

# ---- export (whole snapshot as tar, streamed to a pipe; rep 1 also to a file) ----
if has_phase export; then
  for rep in $(seq "$REPS"); do
    for t in $EXPORTS; do
      log "export $t rep $rep"
      drop_caches
      $U run $TAGS --tag tool="$t" --tag rep="$rep" --out "$OUT" --metric export_pipe --bytes-from-stdout \
        "${t}_export | wc -c" >/dev/null
      if [[ $rep == 1 ]]; then
        drop_caches
        $U run $TAGS --tag tool="$t" --tag rep="$rep" --out "$OUT" --metric export_file --bytes-from-stdout \
          "${t}_export > /tmp/bench-data/x.tar && sync && stat -c %s /tmp/bench-data/x.tar" >/dev/null
        rm -f /tmp/bench-data/x.tar
      fi
    done
  done
fi

if has_phase summary; then
  $U summary "$OUT" > "$RESULTS/$RUN_ID.summary.md"
  cat "$RESULTS/$RUN_ID.summary.md"
fi
log "done: $OUT"
