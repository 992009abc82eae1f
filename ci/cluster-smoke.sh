#!/usr/bin/env bash
# Smoke test of the cluster from ci/cluster-up.sh (reads /run/ledgerbc-ci/env):
#  - Slurm: a 4-task array of `sleep 2` runs and /var/log/slurm/jobcomp.log
#    shows 4 COMPLETED tasks for that job id.
#  - Gluster: 2 processes per mount x 200 `BEGIN IMMEDIATE` increments of one
#    row (rollback journal, exclusive flock on a separate lock file around each
#    transaction); the final count must be exactly 800.
set -euo pipefail

ENV_FILE=/run/ledgerbc-ci/env
JOBCOMP_LOG=/var/log/slurm/jobcomp.log
PER_PROC=${LEDGERBC_SMOKE_TX:-200}

die() { echo "[cluster-smoke] FAIL: $*" >&2; exit 1; }
log() { echo "[cluster-smoke] $*" >&2; }

[[ -r $ENV_FILE ]] || die "$ENV_FILE missing: run ci/cluster-up.sh first"
set -a
# shellcheck disable=SC1090
. "$ENV_FILE"
set +a
ran=0

# ----------------------------------------------------------------- slurm --
if [[ ${LEDGERBC_TEST_SLURM:-0} == 1 ]]; then
    # Only look at jobcomp lines written after submission.
    offset=$(stat -c %s "$JOBCOMP_LOG" 2>/dev/null || echo 0)
    out=$(mktemp -d /tmp/ledgerbc-smoke.XXXXXX)
    t0=$(date +%s.%N)
    jobid=$(timeout 30 sbatch --parsable --array=0-3 --job-name=ci-smoke \
        -o "$out/%A_%a.out" --wrap 'sleep 2') || die "sbatch of the 4-task array failed"
    jobid=${jobid%%;*}
    # Poll jobcomp.log (faster than sbatch --wait, which polls every few seconds):
    # one final record per task, each written when that task ends.
    deadline=$(( $(date +%s) + 120 ))
    while :; do
        lines=$(tail -c +"$((offset + 1))" "$JOBCOMP_LOG" 2>/dev/null | awk -v j="$jobid" '
            { for (i = 1; i <= NF; i++) if ($i == "ArrayJobId=" j) { print; next } }')
        ntasks=$(printf '%s\n' "$lines" | grep -oE 'ArrayTaskId=[0-9]+' | sort -u | wc -l || true)
        [[ $ntasks -ge 4 ]] && break
        if (( $(date +%s) >= deadline )); then
            squeue -j "$jobid" >&2 || true
            die "array $jobid: only $ntasks of 4 task records in $JOBCOMP_LOG after 120s"
        fi
        sleep 0.2
    done
    t1=$(date +%s.%N)
    log "array job $jobid: 4 task records after $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')s"
    printf '%s\n' "$lines" | awk '{for(i=1;i<=NF;i++) if($i ~ /^(JobId|JobState|ArrayTaskId|StartTime|EndTime|ExitCode)=/) printf "%s ", $i; print ""}' | sed '/^$/d; s/^/    /' >&2
    completed=$(printf '%s\n' "$lines" | awk '/ JobState=COMPLETED /' | grep -oE 'ArrayTaskId=[0-9]+' | sort -u | wc -l || true)
    [[ $completed -eq 4 ]] || die "jobcomp.log shows $completed COMPLETED task(s) of array $jobid, expected 4"
    rm -rf "$out"
    log "slurm OK: 4/4 tasks of array $jobid COMPLETED"
    ran=1
else
    log "slurm: skipped (not up)"
fi

# --------------------------------------------------------------- gluster --
if [[ -n ${LEDGERBC_TEST_GLUSTER_A:-} && -n ${LEDGERBC_TEST_GLUSTER_B:-} ]]; then
    sub=ci-smoke-$$-$(date +%s)
    da=$LEDGERBC_TEST_GLUSTER_A/$sub
    db=$LEDGERBC_TEST_GLUSTER_B/$sub
    mkdir -p "$da"
    py=$(mktemp /tmp/ledgerbc-smoke.XXXXXX.py)
    cat >"$py" <<'EOF'
import fcntl, os, sqlite3, sys, time

def connect(path):
    con = sqlite3.connect(path, timeout=60, isolation_level=None)
    con.execute("PRAGMA journal_mode=DELETE")   # rollback journal; WAL fails on Gluster
    return con

cmd = sys.argv[1]
if cmd == "init":
    con = connect(sys.argv[2])
    con.execute("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    con.execute("INSERT INTO counter VALUES (1, 0)")
    con.close()
elif cmd == "work":
    db, lock, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
    con = connect(db)
    with open(lock, "a+") as lf:
        for _ in range(n):
            fcntl.flock(lf, fcntl.LOCK_EX)
            try:
                con.execute("BEGIN IMMEDIATE")
                (v,) = con.execute("SELECT n FROM counter WHERE id = 1").fetchone()
                con.execute("UPDATE counter SET n = ? WHERE id = 1", (v + 1,))
                con.execute("COMMIT")
            finally:
                fcntl.flock(lf, fcntl.LOCK_UN)
    con.close()
elif cmd == "count":
    con = connect(sys.argv[2])
    print(con.execute("SELECT n FROM counter WHERE id = 1").fetchone()[0])
    con.close()
EOF
    python3 "$py" init "$da/counter.db"
    : >"$da/counter.lock"
    t0=$(date +%s.%N)
    pids=()
    for d in "$da" "$da" "$db" "$db"; do
        timeout 600 python3 "$py" work "$d/counter.db" "$d/counter.lock" "$PER_PROC" &
        pids+=($!)
    done
    rc=0
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    t1=$(date +%s.%N)
    [[ $rc -eq 0 ]] || die "a SQLite worker failed (exit $rc)"
    want=$((4 * PER_PROC))
    got_a=$(python3 "$py" count "$da/counter.db")
    got_b=$(python3 "$py" count "$db/counter.db")
    rate=$(awk -v a="$t0" -v b="$t1" -v n="$want" 'BEGIN{printf "%.1fs, %.0f tx/s", b-a, n/(b-a)}')
    rm -rf "$da" "$py"
    [[ $got_a == "$want" && $got_b == "$want" ]] \
        || die "SQLite counter on Gluster: got $got_a (via A) / $got_b (via B), expected $want ($rate)"
    log "gluster OK: counter = $want via both mounts (2 procs per mount x $PER_PROC tx, $rate)"
    ran=1
else
    log "gluster: skipped (not up)"
fi

((ran)) || die "nothing to test: neither Slurm nor Gluster is up"
echo "cluster-smoke passed"
