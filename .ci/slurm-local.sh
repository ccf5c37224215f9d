#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the sweep tests (Debian 12, root, no systemd).
#
#   bash .ci/slurm-local.sh up     install if needed, configure, start munged/slurmctld/slurmd, wait until idle
#   bash .ci/slurm-local.sh down   stop the daemons by the PIDs in their pid files
#   bash .ci/slurm-local.sh status
#
# Idempotent: "up" on a running cluster only checks it (and has it reread a changed slurm.conf).
set -euo pipefail
CONF=/etc/slurm/slurm.conf
RUN=/run/slurm-local
STATE=/var/spool/slurm-local

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
     || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi
}

configure() {
  local host node mem
  host=$(hostname -s)
  getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts
  node=$(slurmd -C | head -1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<< "$node")
  node=$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 95 / 100))/" <<< "$node")
  mkdir -p "$RUN" "$STATE/ctld" "$STATE/d" /var/log/slurm-local
  cat > "$CONF.tmp" <<EOF
# written by .ci/slurm-local.sh
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldLogFile=/var/log/slurm-local/slurmctld.log
SlurmdLogFile=/var/log/slurm-local/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=4
# schedule a batch job at once (the default waits up to 3 s after a submission or a job's end,
# which the tests' tiny cells mostly spent waiting)
SchedulerParameters=batch_sched_delay=0
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$CONF.tmp" "$CONF"; then rm "$CONF.tmp"; return; fi
  mv "$CONF.tmp" "$CONF"  # new or changed: a running controller rereads it (up)
  CHANGED=1
}

up() {
  install
  CHANGED=0
  configure
  mkdir -p /run/munge && chown munge:munge /run/munge
  if ! munge -n >/dev/null 2>&1; then  # munged not answering: (re)start it
    su -s /bin/sh munge -c "/usr/sbin/munged --force"
    for _ in $(seq 40); do munge -n >/dev/null 2>&1 && break; sleep 0.25; done
  fi
  if running "$RUN/slurmctld.pid" && [ "$CHANGED" = 1 ]; then scontrol reconfigure; fi
  running "$RUN/slurmctld.pid" || /usr/sbin/slurmctld
  running "$RUN/slurmd.pid" || /usr/sbin/slurmd
  for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then sinfo; return 0; fi
    sleep 0.5
  done
  echo "slurm-local: the node did not become idle" >&2
  sinfo -N -l >&2 || true
  tail -20 /var/log/slurm-local/slurmctld.log >&2 || true
  return 1
}

down() {
  for d in slurmd slurmctld; do
    if running "$RUN/$d.pid"; then kill "$(cat "$RUN/$d.pid")"; fi
  done
  for _ in $(seq 20); do
    running "$RUN/slurmd.pid" || running "$RUN/slurmctld.pid" || break
    sleep 0.25
  done
  pkill -x munged || true
  for _ in $(seq 20); do pgrep -x munged >/dev/null || break; sleep 0.25; done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
