"""Record and metric keys shared by the ServerApp and the ClientApp (one place, one convention)."""

# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys (server -> client)
SERVER_ROUND = "server-round"
NOISE_MULTIPLIER = "noise-multiplier"
RUN_ID = "run-id"
LEDGER_PATH = "ledger-path"
RELEASES_DIR = "releases-dir"
AUDIT_DIR = "audit-dir"  # where an audit run's clients write what the auditor observes
ACCOUNTANT_URL = "accountant-url"
PHASE = "phase"  # "train" (default) or "init" (a strategy's one-off initialisation exchange)
PHASE_INIT = "init"

# MetricRecord keys (client -> server)
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_TIME = "train-time-s"
SAT_OUT = "sat-out"
ACCOUNTANT_UNREACHABLE = "accountant-unreachable"
PARTITION_ID = "partition-id"
EPSILON_SPENT = "epsilon-spent"
STEPS = "steps"

# Flower node_config keys
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"

# Context.run_config key that carries the whole validated privfed config (deployment mode)
RUN_CONFIG_JSON = "privfed-config"
