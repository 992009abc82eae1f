#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster (munge + slurmctld + slurmd) and a
# real GlusterFS volume over loopback, mounted twice, for integration tests.
# Facts behind every step: shared/CLUSTER.md.
#
# Idempotent: running it again while everything is up only re-verifies; parts
# that are down or stale are (re)started.  Every wait is bounded.
#
# Env:
#   LEDGERBC_CI_NO_SLURM=1    skip Slurm
#   LEDGERBC_CI_NO_GLUSTER=1  skip GlusterFS
#   LEDGERBC_CI_WAIT=SECONDS  bound of each readiness wait (default 60)
#
# Slurm declares 4 GPUs as generic resources (CLUSTER.md "GPUs as generic resources"): stand-in
# character devices (null devices, harmless if opened) under /run/ledgerbc-ci/gpu/nvidia0..3 and a
# gres.conf naming them, so a task of `sbatch --ntasks=1 --gpus-per-task=1` gets its own
# CUDA_VISIBLE_DEVICES, as on a real GPU node. A config change restarts slurmctld (keeping queued and
# running jobs) and slurmd by pid file.
#
# Writes /run/ledgerbc-ci/env with the parts that came up:
#   LEDGERBC_TEST_SLURM=1
#   LEDGERBC_TEST_GLUSTER_A=/mnt/ledger-a
#   LEDGERBC_TEST_GLUSTER_B=/mnt/ledger-b
set -euo pipefail

RUN_DIR=/run/ledgerbc-ci
ENV_FILE=$RUN_DIR/env
WAIT=${LEDGERBC_CI_WAIT:-60}
NO_SLURM=${LEDGERBC_CI_NO_SLURM:-0}
NO_GLUSTER=${LEDGERBC_CI_NO_GLUSTER:-0}

SLURM_CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
GPU_DIR=$RUN_DIR/gpu
N_GPUS=4
SLURMCTLD_PID=/run/slurm/slurmctld.pid
SLURMD_PID=/run/slurm/slurmd.pid
MUNGED_PID=/run/munge/munged.pid
JOBCOMP_LOG=/var/log/slurm/jobcomp.log

GLUSTER_HOST=ci-gluster
GLUSTER_VOL=ledger
GLUSTERD_PID=$RUN_DIR/glusterd.pid
BRICK_PARENT=/srv/ci-gluster
BRICK=$BRICK_PARENT/brick
MNT_A=/mnt/ledger-a
MNT_B=/mnt/ledger-b
MOUNT_OPTS=direct-io-mode=enable,attribute-timeout=0,entry-timeout=0,negative-timeout=0
# Without these off, SQLite loses updates between the two clients (CLUSTER.md).
GLUSTER_OFF_OPTS="quick-read io-cache read-ahead stat-prefetch write-behind open-behind readdir-ahead nl-cache"

T0=$(date +%s.%N)
die() { echo "[cluster-up] ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
log() { printf '[cluster-up %5ss] %s\n' "$(elapsed)" "$*" >&2; }

# wait_until DESCRIPTION TIMEOUT_S CMD...: poll CMD (quietly) until it succeeds.
wait_until() {
    local desc=$1 timeout=$2; shift 2
    local deadline=$(( $(date +%s) + timeout ))
    until "$@" >/dev/null 2>&1; do
        if (( $(date +%s) >= deadline )); then
            echo "[cluster-up] ERROR: timed out after ${timeout}s waiting for: $desc" >&2
            return 1
        fi
        sleep 0.2
    done
}

# pid_alive PIDFILE COMM_PREFIX: the pid in PIDFILE is a live process whose
# name starts with COMM_PREFIX (guards against a stale file and a reused pid).
pid_alive() {
    local pidfile=$1 comm=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] && [[ -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm"* ]] || return 1
    # not a zombie (a just-killed daemon not yet reaped)
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

[[ $(id -u) -eq 0 ]] || die "must run as root"
mkdir -p "$RUN_DIR"
rm -f "$ENV_FILE"

# ---------------------------------------------------------------- packages --
need=()
if [[ $NO_SLURM != 1 ]]; then need+=(slurmctld slurmd slurm-client munge); fi
if [[ $NO_GLUSTER != 1 ]]; then need+=(glusterfs-server glusterfs-client); fi
missing=()
for p in "${need[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    # ci/test.sh may have updated the lists a moment ago (LEDGERBC_APT_UPDATED=1): once is enough.
    if [[ ${LEDGERBC_APT_UPDATED:-0} != 1 ]]; then
        apt-get update -qq >/dev/null || die "apt-get update failed"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    log "packages installed"
fi

# --------------------------------------------------------------------- slurm --
slurm_up=0
if [[ $NO_SLURM != 1 ]]; then
    node=$(hostname -s)
    if ! getent hosts "$node" >/dev/null; then
        log "short hostname $node does not resolve; adding it to /etc/hosts"
        echo "127.0.0.1 $node" >>/etc/hosts
    fi

    # munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if pid_alive "$MUNGED_PID" munged && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already running (pid $(cat "$MUNGED_PID"))"
    else
        if pid_alive "$MUNGED_PID" munged; then
            die "munged (pid $(cat "$MUNGED_PID")) is running but 'munge -n | unmunge' fails; run ci/cluster-down.sh"
        fi
        log "starting munged"
        # --force: take over a socket left by a munged that died uncleanly.
        runuser -u munge -- /usr/sbin/munged --force \
            || die "munged failed to start; see /var/log/munge/munged.log"
    fi
    munge_ok() { munge -n | unmunge; }
    wait_until "munge (munge -n | unmunge)" "$WAIT" munge_ok \
        || die "munge not working; see /var/log/munge/munged.log"

    # slurm.conf
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
    chown slurm:slurm /var/spool/slurmctld /var/log/slurm /run/slurm
    conf_new=$(cat <<EOF
# Written by ledgerbc ci/cluster-up.sh (see shared/CLUSTER.md); overwritten on each run.
ClusterName=ci
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120 s): short for tests.
AuthInfo=cred_expire=20
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${JOBCOMP_LOG}
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${SLURMCTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MinJobAge=30
KillWait=10
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=${node} NodeAddr=127.0.0.1 CPUs=16 RealMemory=1000 Gres=gpu:${N_GPUS} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
    # Stand-in GPUs: slurmd ignores a gres File= that is not a character or block device.
    mkdir -p "$GPU_DIR"
    for ((i = 0; i < N_GPUS; i++)); do
        dev=$GPU_DIR/nvidia$i
        if [[ ! -c $dev ]]; then
            rm -f "$dev"
            mknod -m 0666 "$dev" c 1 3 || die "mknod $dev failed"
        fi
    done
    gres_new="NodeName=${node} Name=gpu File=${GPU_DIR}/nvidia[0-$((N_GPUS - 1))]"

    # write_if_changed FILE CONTENT: true when FILE was (re)written.
    write_if_changed() {
        [[ -f $1 && "$(cat "$1")" == "$2" ]] && return 1
        printf '%s\n' "$2" >"$1.tmp"
        chmod 0644 "$1.tmp"
        mv "$1.tmp" "$1"
        log "wrote $1 (node $node)"
    }
    conf_changed=0
    # gres.conf first: a slurm.conf declaring GresTypes=gpu must never meet a slurmd without it.
    if write_if_changed "$GRES_CONF" "$gres_new"; then conf_changed=1; fi
    if write_if_changed "$SLURM_CONF" "$conf_new"; then conf_changed=1; fi

    stop_by_pidfile() {  # used only to restart after a config change
        local pidfile=$1 comm=$2 pid
        pid_alive "$pidfile" "$comm" || return 0
        pid=$(tr -dc '0-9' <"$pidfile")
        kill -TERM "$pid" 2>/dev/null || true
        # gone, or a zombie not yet reaped by init
        wait_until "$comm (pid $pid) to exit" 20 bash -c \
            "! kill -0 $pid || [[ \$(awk '{print \$3}' /proc/$pid/stat) == Z ]]" \
            || die "$comm (pid $pid) did not exit"
    }
    # Node and gres changes need both daemons restarted (scontrol reconfigure is not enough).
    ctld_opts=(-c)
    if ((conf_changed)) && pid_alive "$SLURMCTLD_PID" slurmctld; then
        log "configuration changed: restarting slurmctld and slurmd"
        stop_by_pidfile "$SLURMD_PID" slurmd
        stop_by_pidfile "$SLURMCTLD_PID" slurmctld
        # A restart of a running cluster keeps its jobs: others may be using it.
        ctld_opts=()
    elif ((conf_changed)); then
        stop_by_pidfile "$SLURMD_PID" slurmd
    fi

    if pid_alive "$SLURMCTLD_PID" slurmctld; then
        log "slurmctld already running (pid $(cat "$SLURMCTLD_PID"))"
    else
        # -c (fresh start) drops old jobs; job ids still continue from the last one
        # (kept in StateSaveLocation), so jobcomp.log keeps unique ids.
        log "starting slurmctld ${ctld_opts[*]}"
        /usr/sbin/slurmctld "${ctld_opts[@]}" || die "slurmctld failed to start; see /var/log/slurm/slurmctld.log"
    fi
    wait_until "slurmctld to answer (scontrol ping)" "$WAIT" \
        bash -c 'scontrol ping | grep UP >/dev/null' \
        || die "slurmctld not answering; see /var/log/slurm/slurmctld.log"

    slurmd_started=0
    if pid_alive "$SLURMD_PID" slurmd; then
        log "slurmd already running (pid $(cat "$SLURMD_PID"))"
    else
        log "starting slurmd"
        slurmd_started=$(date +%s)
        /usr/sbin/slurmd || die "slurmd failed to start; see /var/log/slurm/slurmd.log"
    fi
    # registered_since EPOCH: slurmctld has heard from a slurmd started at or after EPOCH (a restarted
    # slurmctld shows the node's saved state before the new slurmd registers its GPUs).
    registered_since() {
        local t
        t=$(scontrol show node "$node" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2)
        [[ -n $t && $t != None ]] && (( $(date -d "$t" +%s) >= $1 - 1 ))
    }

    # Wait for the node to be idle (or busy with leftover jobs: mix/alloc).
    deadline=$(( $(date +%s) + WAIT ))
    resumed=0
    while :; do
        state=$(sinfo -h -n "$node" -o %t 2>/dev/null | head -n1 || true)
        case $state in
            idle|mix|alloc) registered_since "$slurmd_started" && break ;;
            down|drain|drng|down\*|drain\*|fail|failg)
                if ((resumed < 3)); then
                    log "node $node is '$state'; resuming it"
                    scontrol update nodename="$node" state=resume 2>/dev/null || true
                    resumed=$((resumed + 1))
                fi ;;
        esac
        if (( $(date +%s) >= deadline )); then
            scontrol show node "$node" >&2 2>/dev/null || true
            die "node $node not idle after ${WAIT}s (state '${state:-none}'); see /var/log/slurm/slurmd.log and slurmctld.log"
        fi
        sleep 0.2
    done
    gres=$(sinfo -h -n "$node" -o %G 2>/dev/null | head -n1)
    [[ $gres == gpu:${N_GPUS}* ]] || die "node $node has gres '$gres', not gpu:${N_GPUS}; see /var/log/slurm/slurmd.log"
    log "slurm up: node $node state $state, gres $gres"
    slurm_up=1
fi

# ----------------------------------------------------------------- gluster --
gluster_up=0
if [[ $NO_GLUSTER != 1 ]]; then
    G() { timeout 60 gluster --mode=script "$@"; }

    if ! grep -Eq "^[[:space:]]*127\.0\.0\.1([[:space:]].*)?[[:space:]]${GLUSTER_HOST}([[:space:]]|\$)" /etc/hosts; then
        log "adding '127.0.0.1 $GLUSTER_HOST' to /etc/hosts"
        echo "127.0.0.1 $GLUSTER_HOST" >>/etc/hosts
    fi

    if pid_alive "$GLUSTERD_PID" glusterd; then
        log "glusterd already running (pid $(cat "$GLUSTERD_PID"))"
    else
        log "starting glusterd"
        glusterd -p "$GLUSTERD_PID" || die "glusterd failed to start; see /var/log/glusterfs/glusterd.log"
    fi
    wait_until "glusterd (gluster pool list)" "$WAIT" G pool list \
        || die "glusterd not answering; see /var/log/glusterfs/glusterd.log"

    brick_online() {
        local x
        x=$(G volume status "$GLUSTER_VOL" --xml 2>/dev/null | tr -d ' \n') || return 1
        [[ $x == *"<path>${BRICK}</path>"*"<status>1</status>"* ]]
    }
    set_vol_opts() {
        local o
        for o in $GLUSTER_OFF_OPTS; do
            G volume set "$GLUSTER_VOL" "performance.$o" off >/dev/null \
                || die "gluster volume set performance.$o off failed"
        done
    }
    create_volume() {
        # A brick folder cannot be reused by a new volume: wipe it.
        if [[ -e $BRICK ]]; then
            log "wiping old brick $BRICK"
            rm -rf "$BRICK"
        fi
        mkdir -p "$BRICK_PARENT"
        log "creating volume $GLUSTER_VOL"
        G volume create "$GLUSTER_VOL" "$GLUSTER_HOST:$BRICK" force >/dev/null \
            || die "gluster volume create failed; see /var/log/glusterfs/glusterd.log"
    }

    if G volume info "$GLUSTER_VOL" >/dev/null 2>&1; then
        if ! G volume info "$GLUSTER_VOL" | grep -x "Brick1: $GLUSTER_HOST:$BRICK" >/dev/null; then
            die "a volume '$GLUSTER_VOL' with another brick exists; run ci/cluster-down.sh"
        fi
        log "volume $GLUSTER_VOL exists"
    else
        create_volume
    fi
    set_vol_opts
    if ! brick_online; then
        log "starting volume $GLUSTER_VOL"
        if ! G volume start "$GLUSTER_VOL" force >/dev/null; then
            log "volume start failed; recreating the volume"
            G volume stop "$GLUSTER_VOL" force >/dev/null 2>&1 || true
            G volume delete "$GLUSTER_VOL" >/dev/null 2>&1 || true
            create_volume
            set_vol_opts
            G volume start "$GLUSTER_VOL" force >/dev/null \
                || die "gluster volume start failed; see /var/log/glusterfs/glusterd.log and bricks/"
        fi
    fi
    wait_until "brick $GLUSTER_HOST:$BRICK online" "$WAIT" brick_online \
        || die "brick not online; see /var/log/glusterfs/bricks/"

    mount_ok() {  # mounted, glusterfs, and answering
        [[ $(findmnt -n -o FSTYPE --target "$1" 2>/dev/null) == fuse.glusterfs ]] \
            && mountpoint -q "$1" && timeout 10 stat -f "$1" >/dev/null 2>&1 \
            && timeout 10 ls "$1" >/dev/null 2>&1
    }
    for m in "$MNT_A" "$MNT_B"; do
        if mount_ok "$m"; then
            log "$m already mounted"
            continue
        fi
        if mountpoint -q "$m" 2>/dev/null || grep -q " $m " /proc/mounts; then
            log "$m is mounted but not healthy; unmounting it"
            umount "$m" 2>/dev/null || umount -l "$m" || die "cannot unmount stale $m"
        fi
        mkdir -p "$m"
        log "mounting $GLUSTER_HOST:/$GLUSTER_VOL at $m"
        timeout "$WAIT" mount -t glusterfs -o "$MOUNT_OPTS" "$GLUSTER_HOST:/$GLUSTER_VOL" "$m" \
            || die "mount of $m failed; see /var/log/glusterfs/${m#/}.log (slashes as dashes)"
        wait_until "$m to answer" "$WAIT" mount_ok "$m" || die "$m mounted but not answering"
    done

    # Verify: a write through A is visible through B.
    tok="ci-$$-$RANDOM-$(date +%s%N)"
    printf '%s\n' "$tok" >"$MNT_A/.ci-probe"
    seen=$(cat "$MNT_B/.ci-probe" 2>/dev/null || true)
    [[ $seen == "$tok" ]] || die "write through $MNT_A not visible through $MNT_B (got '$seen')"
    rm -f "$MNT_B/.ci-probe"

    # Verify: flock on A excludes flock on B, and is released for B afterwards.
    lockf=.ci-flock-probe
    : >"$MNT_A/$lockf"
    held=$RUN_DIR/flock-held.$$
    rm -f "$held"
    flock -x -w 10 "$MNT_A/$lockf" -c "touch '$held'; sleep 2" &
    holder=$!
    wait_until "flock holder on $MNT_A" 15 test -e "$held" || { kill "$holder" 2>/dev/null; die "could not take flock on $MNT_A"; }
    if flock -n -x "$MNT_B/$lockf" true; then
        wait "$holder" || true
        die "flock on $MNT_B succeeded while $MNT_A held it: locks are not shared between the mounts"
    fi
    wait "$holder" || die "flock holder on $MNT_A failed"
    flock -x -w 10 "$MNT_B/$lockf" true || die "flock on $MNT_B not granted after $MNT_A released it"
    rm -f "$held" "$MNT_A/$lockf"
    log "gluster up: $MNT_A and $MNT_B share data and flock locks"
    gluster_up=1
fi

# --------------------------------------------------------------------- env --
{
    if ((slurm_up)); then echo "LEDGERBC_TEST_SLURM=1"; fi
    if ((gluster_up)); then
        echo "LEDGERBC_TEST_GLUSTER_A=$MNT_A"
        echo "LEDGERBC_TEST_GLUSTER_B=$MNT_B"
    fi
} >"$ENV_FILE.tmp"
mv "$ENV_FILE.tmp" "$ENV_FILE"

echo "cluster-up done in $(elapsed)s:"
if ((slurm_up)); then
    echo "  slurm:   node $(hostname -s) $(sinfo -h -n "$(hostname -s)" -o '%t cpus=%c gres=%G' | head -n1); logs /var/log/slurm/, jobs in $JOBCOMP_LOG"
else
    echo "  slurm:   skipped (LEDGERBC_CI_NO_SLURM=1)"
fi
if ((gluster_up)); then
    echo "  gluster: volume $GLUSTER_VOL ($GLUSTER_HOST:$BRICK) at $MNT_A and $MNT_B; logs /var/log/glusterfs/"
else
    echo "  gluster: skipped (LEDGERBC_CI_NO_GLUSTER=1)"
fi
echo "  env:     $ENV_FILE"
sed 's/^/    /' "$ENV_FILE"
