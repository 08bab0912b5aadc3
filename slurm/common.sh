# shellcheck shell=bash
# Shared by the vlpretrain batch scripts (sourced, never submitted). Bash.
#
# Site settings come from the environment of `sbatch` (SLURM exports it to the job) or from a
# small file of shell assignments, $VLP_SITE_ENV (default: slurm/site.env in the repository, see
# slurm/site.env.example). Nothing about a particular cluster is written here.
#
#   VLP_ACTIVATE       command that makes `python` the project's environment, run on every node
#                      e.g. "source $HOME/vlpretrain/.venv/bin/activate" or "module load x; conda activate y"
#   VLP_LAUNCHER       torchrun (one launcher per node, default) or srun (one task per GPU)
#   VLP_GPUS_PER_NODE  processes per node for the torchrun launcher (default: GPUs SLURM gave the
#                      node, else 1)
#   VLP_MAX_REQUEUES   how many times a job may requeue itself after a preemption signal (10)
#   VLP_STOP_TIMEOUT   seconds torchrun lets its workers checkpoint after the signal before it
#                      kills them (170; keep it below the lead time of --signal=B:USR1@T)
#   MASTER_PORT        rendezvous port (default: 20000 + job id mod 20000, so jobs sharing a node differ)
#   VLP_MASTER_ADDR    rendezvous address (default: the first node's name, as SLURM lists it)
#   VLP_RDZV_CONF      extra torchrun --rdzv-conf entries, e.g. join_timeout=1200
#   DS_ACCELERATOR, NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, ...: passed through untouched

vlp_log() { echo "[$(date +%FT%T)] ${SLURM_JOB_ID:+job $SLURM_JOB_ID: }$*" >&2; }
vlp_die() { vlp_log "error: $*"; exit 2; }

# Load site settings, activate the Python environment, check that the package imports.
vlp_setup() {
    local site_env="${VLP_SITE_ENV:-$VLP_REPO/slurm/site.env}"
    if [ -n "${VLP_SITE_ENV:-}" ] && [ ! -f "$site_env" ]; then
        vlp_die "VLP_SITE_ENV=$site_env does not exist"
    fi
    if [ -f "$site_env" ]; then
        vlp_log "site settings from $site_env"
        # shellcheck disable=SC1090
        source "$site_env"
    fi
    if [ -n "${VLP_ACTIVATE:-}" ]; then
        eval "$VLP_ACTIVATE" || vlp_die "VLP_ACTIVATE failed: $VLP_ACTIVATE"
    fi
    command -v python >/dev/null || vlp_die "no python on PATH; set VLP_ACTIVATE to activate the project's environment"
    vlp_log "python: $(command -v python); nodes: ${SLURM_JOB_NODELIST:-none}"
}

# Rendezvous host and port: the first node of the allocation, a port derived from the job id.
vlp_rendezvous() {
    MASTER_ADDR="${VLP_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
    [ -n "$MASTER_ADDR" ] || vlp_die "cannot read the first node of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    export MASTER_ADDR MASTER_PORT
}

# Wait for a background child even when traps interrupt `wait`; return the child's exit status.
_vlp_wait() {
    local pid=$1 status=0
    while true; do
        status=0
        wait "$pid" || status=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    # The child may have ended while a trap ran: ask again for its real status.
    status=0
    wait "$pid" 2>/dev/null || status=$?
    return "$status"
}

# On the preemption signal (USR1, sent to this shell by `--signal=B:USR1@T` or by hand with
# `scancel --signal=USR1 --batch JOB`) and on TERM, ask the training processes to checkpoint and
# stop: USR1 to every process of every step. The trainers treat USR1, TERM and INT alike and
# their DataLoader workers ignore all three; USR1 is the one no part of SLURM sends on its own,
# and it does not go through srun, which answers TERM by killing the step.
_vlp_on_signal() {
    VLP_SIGNAL="$1"
    vlp_log "received SIG$1: asking the training processes to checkpoint and stop"
    scancel --signal=USR1 "$SLURM_JOB_ID" || vlp_log "scancel --signal=USR1 $SLURM_JOB_ID failed"
}

# Run a distributed training stage over the whole allocation, then requeue the job when it was
# stopped before finishing. Usage: vlp_train MODULE DONE_FILE ARGS...
#   MODULE     python module (pretrain, finetune), started with --resume so that a
#              requeued job continues from the latest checkpoint
#   DONE_FILE  file the module writes when the run is complete; its absence after a clean stop
#              means "stopped early: requeue"
vlp_train() {
    local module=$1 done_file=$2
    shift 2
    local launcher="${VLP_LAUNCHER:-torchrun}"
    local gpus="${VLP_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
    if ! [[ "$gpus" =~ ^[0-9]+$ ]] || [ "$gpus" -lt 1 ]; then
        [ -z "${VLP_GPUS_PER_NODE:-}" ] || vlp_die "--gpus-per-node/VLP_GPUS_PER_NODE must be a positive integer, not '$gpus'"
        gpus=1  # a CPU node (SLURM_GPUS_ON_NODE=0): one process
    fi
    local nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
    vlp_rendezvous
    # Ranks come from the launcher, never from the submitting shell.
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
    local restarts="${SLURM_RESTART_COUNT:-0}"
    vlp_log "$module on $nnodes node(s), launcher=$launcher, rendezvous $MASTER_ADDR:$MASTER_PORT, restart $restarts"

    local cmd
    case "$launcher" in
        torchrun)
            # torchrun dies on USR1 unless told to handle it; handling it means passing it on to
            # the workers and giving them VLP_STOP_TIMEOUT seconds to save before SIGKILL. PET_*
            # variables are torchrun's flags read from the environment (ignored by old versions).
            export PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
            export PET_SHUTDOWN_TIMEOUT="${VLP_STOP_TIMEOUT:-170}"
            if ! torchrun --help 2>/dev/null | grep -q -- "--signals-to-handle"; then
                vlp_log "warning: this torchrun has no --signals-to-handle: a preemption signal kills it without a checkpoint; use --launcher srun"
            fi
            # One torchrun per node. The first node of the allocation hosts the c10d rendezvous
            # store: decided by SLURM's node index, because torchrun's own guess compares host
            # names, which fails wherever SLURM node names differ from host names.
            # shellcheck disable=SC2016  # expanded on each node, not here
            cmd=(srun --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1
                 bash -c 'exec torchrun --rdzv-conf="is_host=$([ "$SLURM_NODEID" = 0 ] && echo 1 || echo 0)${VLP_RDZV_CONF:+,$VLP_RDZV_CONF}" "$@"' torchrun
                 --nnodes="$nnodes" --nproc-per-node="$gpus"
                 --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
                 --max-restarts=0 -m "$module" --resume "$@")
            ;;
        srun)
            # One task per GPU: the allocation's task layout (--ntasks-per-node) is the world; the
            # module reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and MASTER_ADDR/PORT itself.
            cmd=(srun --kill-on-bad-exit=1 python -m "$module" --resume "$@")
            ;;
        *) vlp_die "VLP_LAUNCHER/--launcher must be torchrun or srun, not '$launcher'" ;;
    esac

    VLP_SIGNAL=""
    trap '_vlp_on_signal USR1' USR1
    trap '_vlp_on_signal TERM' TERM
    "${cmd[@]}" &
    local status=0
    _vlp_wait $! || status=$?
    trap - USR1 TERM

    if [ -f "$done_file" ]; then
        vlp_log "$module finished: $done_file"
        return 0
    fi
    if [ "$VLP_SIGNAL" = TERM ]; then
        # SLURM itself is ending the job (time limit, scancel, or preemption, which requeues
        # on its own): leave the decision to it.
        vlp_log "$module stopped on SIGTERM (exit $status); SLURM decides what follows"
        return "$status"
    fi
    if [ "$VLP_SIGNAL" = USR1 ] || [ "$status" -eq 0 ]; then
        local max="${VLP_MAX_REQUEUES:-10}"
        if [ "$restarts" -ge "$max" ]; then
            vlp_die "$module stopped early (exit $status) and the job already ran $restarts times (VLP_MAX_REQUEUES=$max)"
        fi
        vlp_log "$module stopped before finishing (exit $status); requeueing to resume from its last checkpoint"
        scontrol requeue "$SLURM_JOB_ID" || vlp_die "scontrol requeue $SLURM_JOB_ID failed (was the job submitted with --requeue?)"
        return 0
    fi
    vlp_log "$module failed with exit $status"
    return "$status"
}
