"""pdserve.proto: the wire protocol (protobuf messages and gRPC services).

Generated modules are checked in (`pdserve_pb2`, `pdserve_pb2_grpc`); regenerate with
``python -m pdserve.proto.generate``. ``PROTOCOL_VERSION`` is checked when a worker
registers: a mismatch is refused instead of failing per request.
"""

PROTOCOL_VERSION = 4
"""4: hop outcomes and transfer leases (a version-3 decode worker would read a
PrefillResponse that says HOP_NEVER_STARTED as a success; a version-3 prefill worker
writes without claiming, which a version-4 decode worker refuses) and
``GenerateRequest.resume`` (a version-3 worker would restart a migrated completion).
3: structured outputs, prompt logprobs, include_stop_str_in_output and
spaces_between_special_tokens (a version-2 worker would ignore them silently).
2: SamplingParams gained penalties, logit_bias, min_tokens and allowed/banned token ids
(a version-1 worker would silently ignore them)."""
