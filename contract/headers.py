"""Header names: the HTTP headers Envoy routes use to steer the runtime SDK (the
runtime never learns the topology), and the Kafka record headers of a hop."""

NEXT = "x-mll-next"  # path of the next hop on the sidecar's egress listener; absent on the last stage
TRANSPORT = "x-mll-transport"  # how to reach the own sidecar's egress: "http" (TCP) or "uds"
BRANCH_FIELD = "x-mll-branch-field"  # output field whose value picks the next stage's branch
BRANCH = "x-mll-branch"  # set by the SDK from that field; the egress route matches on it
STAGE = "x-mll-stage"  # the stage this request is for
SHADOW = "x-mll-shadow"  # a mirrored copy: answer, but never forward
MAX_BODY = "x-mll-max-body"  # the pipeline's max_body: a runtime refuses a bigger request body with 413
AGREE = "x-mll-agree"  # this stage has a shadow: keep the answer by request id (their agreement is measured)
TIMING = "x-mll-timing"  # response: "stage=model/runtime/next" ms per hop, first hop first (docs: the pipeline tax)
SERVED = "x-mll-served"  # response (and Kafka record): "stage=model:version" per hop, first hop first
FANOUT = "x-mll-fanout"  # an ensemble's members to ask: "name=timeout_ms" each, "?" after optional ones
FANOUT_PATH = "x-mll-fanout-path"  # the ensemble stage's path on the egress; members at "<path>/<name>"
FANOUT_BRANCH_FIELD = "x-mll-fanout-branch-field"  # output field that picks a member's branch
ASK = "x-mll-ask"  # an OIP stage's path on the egress: ask it, its answer is the output that goes on
PROTOCOL = "x-mll-protocol"  # set by the gateway: "oip" when the client spoke the Open Inference Protocol
OIP_MODEL = "x-mll-oip-model"  # ... and the pipeline ("model") and version its answer is encoded for
OIP_VERSION = "x-mll-oip-version"
# Response: a 503 the answering Envoy made itself (it could not reach its own runtime). Only such
# answers are retried by the hop before; a failure relayed from further down the chain is final.
RETRIABLE = "x-mll-retriable"

# Headers the control plane sets on a sidecar's ingress route; a request never carries them in.
STEERING = (
    *(NEXT, TRANSPORT, BRANCH_FIELD, SHADOW, AGREE, MAX_BODY, STAGE, FANOUT, FANOUT_PATH, FANOUT_BRANCH_FIELD, ASK),
)

LOG = "x-mll-log"  # set by the gateway: the percentage of this pipeline's requests the first stage logs
ENTRY = (PROTOCOL, OIP_MODEL, OIP_VERSION, LOG)  # the gateway's, for the first stage (or bridge) only

PRIORITY = "x-mll-priority"  # set by the gateway: the pipeline's priority (runtime_sdk/admission.py)
CALLER = "x-mll-caller"  # set by the gateway: the caller's key for fair shares (the named header, or its address)
SHARE = "x-mll-share"  # set by the gateway for a key the pipeline weighs: its weight in fair shares (absent: 1)
FLOW = (PRIORITY, CALLER, SHARE)
RATE_LIMIT = "x-mll-rate-limit"  # on a 429 from the gateway: the pipeline's quota per caller ("5/s, burst 10, per x-t")
PRIORITIES = {"critical": 100, "standard": 0, "sheddable": -100}  # by name; a number is -1000..1000, < 0 sheddable

# Propagated unchanged to the next hop, so one request can be followed end to end (and admitted by the same
# priority and caller at every stage).
PROPAGATED = (
    *FLOW,
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
)

# Kafka record headers.
CORRELATION = "mll-correlation-id"  # the HTTP bridge's request id
REPLY_TO = "mll-reply-to"  # the HTTP bridge's reply topic
ERROR = "mll-error"  # why a record was dead-lettered
TABLE_VERSION = "mll-version"  # the pipeline version (routing table) a message entered with
