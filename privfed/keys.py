"""Record and metric keys shared by the ServerApp and the ClientApp (one place, one convention),
and the client id convention both sides (and the ledger, and the audit) name clients by."""

from collections.abc import Mapping


def client_id(partition_id: int) -> str:
    """The id a client's ledger entries, tokens and audit records carry."""
    return f"client-{partition_id}"


def number(record: Mapping[str, object], key: str) -> float:
    """A numeric value from a received record; a missing or non-numeric one raises (a message
    from another version or a buggy peer must not become a silent default)."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"record key {key!r}: a number expected, got {value!r}")
    return float(value)


def integer(record: Mapping[str, object], key: str) -> int:
    value = number(record, key)
    if not value.is_integer():
        raise ValueError(f"record key {key!r}: an integer expected, got {value!r}")
    return int(value)


def integers(record: Mapping[str, object], key: str) -> list[int]:
    """A list of integers from a received record (an empty list included)."""
    value = record[key]
    if not isinstance(value, list) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in value
    ):
        raise ValueError(f"record key {key!r}: a list of integers expected")
    return list(value)


def blobs(record: Mapping[str, object], key: str) -> list[bytes]:
    """A list of byte strings from a received record (an empty list included)."""
    value = record[key]
    if not isinstance(value, list) or any(not isinstance(v, bytes) for v in value):
        raise ValueError(f"record key {key!r}: a list of bytes expected")
    return list(value)


def blob(record: Mapping[str, object], key: str) -> bytes:
    value = record[key]
    if not isinstance(value, bytes):
        raise ValueError(f"record key {key!r}: bytes expected")
    return value


# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# run_config keys (privfed -> the ServerApp in deployment mode)
RUN_DIR_KEY = "privfed-run-dir"

# ConfigRecord keys (server -> client)
SERVER_ROUND = "server-round"
NOISE_MULTIPLIER = "noise-multiplier"
RUN_ID = "run-id"
LEDGER_PATH = "ledger-path"
DEVICES_DIR = "devices-dir"  # simulated devices' own storage (their releases, their ledgers)
AUDIT_DIR = "audit-dir"  # where an audit run's clients write what the auditor observes
ACCOUNTANT_URL = "accountant-url"
PHASE = "phase"  # "train" (default) or "init" (a strategy's one-off initialisation exchange)
PHASE_INIT = "init"
PHASE_PROTOTYPES = "prototypes"  # the head recipe's one-off prototype release
PROTOTYPES = "class_sums"  # its payload: the noised per-class feature sums
# privacy.user.aggregation=secure (client/secure_aggregation.py, server/secure_round.py): the
# stages after training, each one message, and what they carry
PHASE_SECAGG_SHARE = "secagg-share"  # stage 2: the neighbours' keys in, encrypted shares out
PHASE_SECAGG_MASK = "secagg-mask"  # stage 3: the neighbours' shares in, the masked vector out
PHASE_SECAGG_UNMASK = "secagg-unmask"  # stage 4: who survived in, the shares it may reveal out
SECAGG_PHASES = (PHASE_SECAGG_SHARE, PHASE_SECAGG_MASK, PHASE_SECAGG_UNMASK)
SECAGG = "secagg"  # the ConfigRecord of a stage's request or reply
SECAGG_MASKED = "masked"  # the ArrayRecord tensor of stage 3's reply
# the round's plan, in every secure round's config (privacy/secure_plan.py's entries)
SECAGG_BITS = "secagg-bits"
SECAGG_PLAN = (
    *("secagg-rate", "secagg-clip", "secagg-gamma", "secagg-sigma"),
    *("secagg-beta", SECAGG_BITS, "secagg-survivors"),
)
FIXED_DIGEST = "fixed-digest"  # the digest of the strategy's fixed tensors (fixed_broadcast.py)
FIXED_OMITTED = "fixed-omitted"  # 1: left out of this broadcast, the node holds them

# MetricRecord keys (client -> server)
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"  # privacy=none only: a loss on private data
TRAIN_TIME = "train-time-s"  # privacy=none only: a timing measured on the client
SAT_OUT = "sat-out"
ACCOUNTANT_UNREACHABLE = "accountant-unreachable"
DEVICE_REFUSED = "device-refused"  # the device's own budget (or policy) refused the round
ROUND_IN_PROGRESS = "round-in-progress"  # another execution of this round holds its reservation
OVER_BUDGET = "over-budget"  # the run's accountant refused: the client's budget is spent
PARTITION_ID = "partition-id"
EPSILON_SPENT = "epsilon-spent"
STEPS = "steps"

# Why a client sat out, when it says (each is counted per round: clients_<reason> in metrics)
SAT_OUT_REASONS = (DEVICE_REFUSED, OVER_BUDGET, ROUND_IN_PROGRESS, ACCOUNTANT_UNREACHABLE)
# The reasons that mean "this client's budget is spent" (submit ends by saying who and how to reset)
BUDGET_REASONS = (DEVICE_REFUSED, OVER_BUDGET)

# Under DP a reply carries the release and these, public by construction, and nothing else
# (docs/privacy.md, "Threat model"): the example count and step count follow from the run's
# config (the server computes them itself to calibrate sigma), epsilon from the ledger's events.
PUBLIC_REPLY_METRICS = frozenset(
    {
        NUM_EXAMPLES,
        STEPS,
        PARTITION_ID,
        EPSILON_SPENT,
        SAT_OUT,
        ACCOUNTANT_UNREACHABLE,
        DEVICE_REFUSED,
        OVER_BUDGET,
        ROUND_IN_PROGRESS,
    }
)

# Flower node_config keys
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"

# Context.run_config key that carries the whole validated privfed config (deployment mode)
RUN_CONFIG_JSON = "privfed-config"
