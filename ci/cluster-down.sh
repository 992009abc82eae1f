#!/usr/bin/env bash
# Tear down what ci/cluster-up.sh brought up, in the order of shared/CLUSTER.md:
# cancel Slurm jobs, unmount both Gluster mounts, stop + delete the volume,
# then glusterd, slurmd, slurmctld, munged -- each by its pid file, never by name.
#
# Always exits 0: a teardown hiccup is printed, never fails the CI run.
# Prints any related process still alive at the end.
set -uo pipefail

RUN_DIR=/run/ledgerbc-ci
ENV_FILE=$RUN_DIR/env
GLUSTERD_PID=$RUN_DIR/glusterd.pid
GLUSTER_VOL=ledger
MNT_A=/mnt/ledger-a
MNT_B=/mnt/ledger-b
SLURMCTLD_PID=/run/slurm/slurmctld.pid
SLURMD_PID=/run/slurm/slurmd.pid
MUNGED_PID=/run/munge/munged.pid

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
log() { printf '[cluster-down %5ss] %s\n' "$(elapsed)" "$*" >&2; }
problems=0
warn() { printf '[cluster-down] WARNING: %s\n' "$*" >&2; problems=$((problems + 1)); }

# wait_gone PID TIMEOUT_S: true once PID has exited.
wait_gone() {
    local pid=$1 deadline=$(( $(date +%s) + $2 ))
    # A zombie (exited, not yet reaped by init) counts as gone.
    while kill -0 "$pid" 2>/dev/null \
        && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]; do
        (( $(date +%s) >= deadline )) && return 1
        sleep 0.1
    done
}

# stop_pid PID COMM_PREFIX WHAT: TERM, wait, KILL; only if PID is COMM_PREFIX*.
stop_pid() {
    local pid=$1 comm=$2 what=$3 name
    [[ -n $pid && -r /proc/$pid/comm ]] || return 0
    name=$(cat "/proc/$pid/comm" 2>/dev/null) || return 0
    if [[ $name != "$comm"* ]]; then
        return 0   # stale pid file: the pid now belongs to something else
    fi
    log "stopping $what (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    if ! wait_gone "$pid" 15; then
        warn "$what (pid $pid) ignored SIGTERM for 15s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        wait_gone "$pid" 5 || warn "$what (pid $pid) still alive after SIGKILL"
    fi
}

# stop_pidfile PIDFILE COMM_PREFIX WHAT
stop_pidfile() {
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 0
    pid=$(tr -dc '0-9' <"$pidfile")
    stop_pid "$pid" "$2" "$3"
    rm -f "$pidfile"
}

alive_comm() {  # alive_comm PIDFILE COMM_PREFIX
    local pid
    [[ -s $1 ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$2"* ]]
}

# ------------------------------------------------------------ slurm jobs --
if alive_comm "$SLURMCTLD_PID" slurmctld && command -v squeue >/dev/null; then
    jobs=$(timeout 20 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        log "cancelling Slurm jobs: $jobs"
        # shellcheck disable=SC2086
        timeout 20 scancel $jobs 2>/dev/null || warn "scancel failed"
    fi
    # Wait for jobs (incl. COMPLETING) to leave the queue: KillWait=10 before SIGKILL.
    deadline=$(( $(date +%s) + 30 ))
    while :; do
        left=$(timeout 10 squeue -h -t all -o '%A %t' 2>/dev/null | awk '$2 ~ /^(R|CG|PD|S|CF|RQ|RS|SO|ST)$/' | wc -l)
        [[ $left -eq 0 ]] && break
        if (( $(date +%s) >= deadline )); then
            warn "$left Slurm job(s) still running/completing after 30s"
            # What keeps them: processes in uninterruptible sleep (a wedged mount, docs/locking.md).
            for stat in /proc/[0-9]*/stat; do
                state=$(sed 's/.*) //' "$stat" 2>/dev/null | cut -d' ' -f1)  # after "(comm)", which may hold spaces
                [[ $state == D ]] || continue
                pid=${stat#/proc/}; pid=${pid%/stat}
                printf '    D %s %s | %s\n' "$pid" "$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-120)" \
                    "$(head -4 "/proc/$pid/stack" 2>/dev/null | sed 's/^\[<0>\] //' | tr '\n' ' ')" >&2
            done
            break
        fi
        sleep 0.5
    done
fi

# --------------------------------------------------------------- gluster --
for m in "$MNT_A" "$MNT_B"; do
    if grep -q " $m fuse.glusterfs " /proc/mounts 2>/dev/null || mountpoint -q "$m" 2>/dev/null; then
        # The FUSE client process of this mount, to check it exits afterwards.
        cpid=$(ps -eo pid=,args= | awk -v m="$m" '$2 ~ /glusterfs$/ && $NF == m {print $1}' | head -n1)
        log "unmounting $m"
        if ! timeout 30 umount "$m" 2>/dev/null; then
            warn "umount $m failed (busy?); lazy unmount"
            timeout 30 umount -l "$m" || warn "lazy umount $m failed"
        fi
        if [[ -n $cpid ]] && ! wait_gone "$cpid" 10; then
            warn "gluster client of $m (pid $cpid) still running after unmount; stopping it"
            stop_pid "$cpid" glusterfs "gluster client of $m"
        fi
    fi
done

G() { timeout 60 gluster --mode=script "$@"; }
if alive_comm "$GLUSTERD_PID" glusterd; then
    if G volume info "$GLUSTER_VOL" >/dev/null 2>&1; then
        log "stopping and deleting volume $GLUSTER_VOL"
        G volume stop "$GLUSTER_VOL" force >/dev/null || warn "gluster volume stop $GLUSTER_VOL failed"
        G volume delete "$GLUSTER_VOL" >/dev/null || warn "gluster volume delete $GLUSTER_VOL failed"
    fi
fi
# Brick (glusterfsd) and helper daemons (glustershd, ...) keep pid files under
# /var/run/gluster; after `volume stop` none should be alive.
for pf in /var/run/gluster/vols/*/*.pid /var/run/gluster/*.pid /var/run/gluster/*/*.pid; do
    [[ -e $pf ]] || continue
    if alive_comm "$pf" glusterfs; then
        warn "gluster process from $pf still alive after volume stop"
        stop_pidfile "$pf" glusterfs "gluster process ($pf)"
    fi
done
stop_pidfile "$GLUSTERD_PID" glusterd glusterd

# ----------------------------------------------------------------- slurm --
stop_pidfile "$SLURMD_PID" slurmd slurmd
stop_pidfile "$SLURMCTLD_PID" slurmctld slurmctld
stop_pidfile "$MUNGED_PID" munged munged

rm -f "$ENV_FILE" "$ENV_FILE.tmp"
# A later slurm.conf without GresTypes must never meet this gres.conf; the stand-in GPUs go with it.
rm -f /etc/slurm/gres.conf
rm -rf "$RUN_DIR/gpu"

# ---------------------------------------------------------------- report --
# Zombies (exited, waiting for init to reap them; ~2 s here) are not leftovers.
leftover=$(ps -eo pid=,stat=,comm=,args= | awk '$2 !~ /^Z/ && $3 ~ /^(glusterd|glusterfs|glusterfsd|gluster|slurmctld|slurmd|slurmstepd|munged)$/')
if [[ -n $leftover ]]; then
    warn "processes still running (not stopped: no pid file of ours):"
    printf '%s\n' "$leftover" | sed 's/^/    /' >&2
fi
for m in "$MNT_A" "$MNT_B"; do
    grep -q " $m " /proc/mounts 2>/dev/null && warn "$m is still mounted"
done
echo "cluster-down done in $(elapsed)s ($problems warning(s))"
exit 0
