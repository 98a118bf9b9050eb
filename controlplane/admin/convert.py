"""Domain objects <-> admin API messages, at the wire boundary only."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb
from controlplane.pipeline.model import Pipeline, PipelineVersion
from controlplane.pipeline.spec import parse_pipeline, pipeline_to_dict


def spec_from_proto(spec: pb.PipelineSpec) -> Pipeline:
    """Validates: raises InvalidPipeline with every problem and its field path."""
    return parse_pipeline(json_format.MessageToDict(spec, preserving_proto_field_name=True))


def spec_to_proto(pipeline: Pipeline) -> pb.PipelineSpec:
    return json_format.ParseDict(pipeline_to_dict(pipeline), pb.PipelineSpec())


def version_to_proto(version: PipelineVersion) -> pb.PipelineVersion:
    return pb.PipelineVersion(
        spec=spec_to_proto(version.pipeline),
        version=version.version,
        created_at=version.created_at,
        cause=version.cause,
        deleted=version.deleted,
    )


def version_from_proto(message: pb.PipelineVersion) -> PipelineVersion:
    return PipelineVersion(
        spec_from_proto(message.spec), int(message.version), message.created_at, message.cause, message.deleted
    )


def apply_request(
    pipeline: Pipeline, cause: str = "", expect_version: int = 0, dry_run: bool = False
) -> pb.ApplyRequest:
    spec = spec_to_proto(pipeline)
    return pb.ApplyRequest(spec=spec, cause=cause, expect_version=expect_version, dry_run=dry_run)


def version_to_dict(message: pb.PipelineVersion) -> dict[str, Any]:
    """For `-o json|yaml`: field names as in the YAML people write."""
    return dict(
        json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    )
