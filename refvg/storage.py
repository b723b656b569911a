"""The one module that talks to S3 (boto3): where refvg's data and artifacts live in a bucket, and
how the tools that move them (DVC, MLflow, boto3 here) reach it.

- Location: `storage` in params.yaml (bucket, prefix, endpoint), REFVG_S3_* environment variables
override.
  `s3://<bucket>/<prefix>/dvc` is the DVC remote, `s3://<bucket>/<prefix>/mlflow` the MLflow
  artifact root.
- Credentials: boto3's own chain only (AWS_* environment variables, an AWS profile, an instance
role). They
  are never read from params, never passed on the command line, and never part of a message: errors
  name the endpoint, bucket and key, not who asked.
- Faults: every client retries each request (botocore "standard" mode: exponential backoff with
jitter,
  `max_attempts` per request), then raises :class:`StorageError` that says what was being moved
  where.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from refvg.config import Config

ENV_OVERRIDES = {
    "bucket": "REFVG_S3_BUCKET",
    "prefix": "REFVG_S3_PREFIX",
    "endpoint_url": "REFVG_S3_ENDPOINT_URL",
}


class StorageError(RuntimeError):
    """An S3 transfer failed for good (after its retries)."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    endpoint_url: Optional[str]
    region: str
    profile: Optional[str]
    max_attempts: int
    connect_timeout: float
    read_timeout: float
    dvc_remote: str
    mlflow_artifacts: bool

    def uri(self, *parts: str) -> str:
        key = "/".join(p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/"))
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    @property
    def dvc_url(self) -> str:
        return self.uri("dvc")

    @property
    def mlflow_url(self) -> str:
        return self.uri("mlflow")

    @property
    def where(self) -> str:
        """For messages: the endpoint and bucket, nothing secret."""
        return f"bucket {self.bucket!r} at {self.endpoint_url or 'AWS S3'}"


def location(cfg: Config) -> Optional[S3Location]:
    """The configured S3 location, or None when no bucket is set (everything stays local)."""
    s = cfg.storage.model_dump()
    for key, var in ENV_OVERRIDES.items():
        if os.environ.get(var):
            s[key] = os.environ[var]
    if not s["bucket"]:
        return None
    if s["endpoint_url"] and (
        urlsplit(s["endpoint_url"]).username or urlsplit(s["endpoint_url"]).password
    ):
        raise StorageError(
            f"{ENV_OVERRIDES['endpoint_url']} must not carry credentials; "
            f"use AWS_* variables or a profile"
        )
    return S3Location(
        bucket=s["bucket"],
        prefix=s["prefix"].strip("/"),
        endpoint_url=s["endpoint_url"],
        region=s["region"],
        profile=s["profile"],
        max_attempts=s["max_attempts"],
        connect_timeout=s["connect_timeout"],
        read_timeout=s["read_timeout"],
        dvc_remote=s["dvc_remote"],
        mlflow_artifacts=s["mlflow_artifacts"],
    )


def split_uri(uri: str) -> tuple[str, str]:
    """ "s3://bucket/some/key" -> ("bucket", "some/key")."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parts.netloc, parts.path.lstrip("/")


def client(loc: S3Location):
    import boto3
    from botocore.config import Config as BotoConfig

    session = boto3.session.Session(profile_name=loc.profile, region_name=loc.region)
    return session.client(
        "s3",
        endpoint_url=loc.endpoint_url,
        config=BotoConfig(
            retries={"mode": "standard", "max_attempts": loc.max_attempts},
            connect_timeout=loc.connect_timeout,
            read_timeout=loc.read_timeout,
        ),
    )


def client_env(loc: S3Location) -> dict[str, str]:
    """Environment for the S3 clients other libraries build themselves (MLflow's boto3, DVC's s3fs /
    aiobotocore): same endpoint, region, profile and retry policy. No credentials: those are already
    in the environment or the profile, where those clients look for them too."""
    env = {
        "AWS_RETRY_MODE": "standard",
        "AWS_MAX_ATTEMPTS": str(loc.max_attempts),
        "AWS_DEFAULT_REGION": loc.region,
    }
    if loc.endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = loc.endpoint_url
    if loc.profile:
        env["AWS_PROFILE"] = loc.profile
    return env


def apply_client_env(cfg: Config) -> Optional[S3Location]:
    """Export `client_env` into this process (values already set by the user win)."""
    loc = location(cfg)
    if loc is not None:
        for key, value in client_env(loc).items():
            os.environ.setdefault(key, value)
    return loc


def ensure_bucket(loc: S3Location) -> bool:
    """Create the bucket if it does not exist (MinIO, a test server); True when it was created."""
    from botocore.exceptions import ClientError

    s3 = client(loc)
    try:
        s3.head_bucket(Bucket=loc.bucket)
        return False
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"{loc.where}: cannot check the bucket: {describe(err)}") from None
    kwargs = (
        {}
        if loc.region == "us-east-1"
        else {"CreateBucketConfiguration": {"LocationConstraint": loc.region}}
    )
    s3.create_bucket(Bucket=loc.bucket, **kwargs)
    return True


def list_keys(loc: S3Location, uri: str) -> list[str]:
    bucket, prefix = split_uri(uri)
    pages = client(loc).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def delete_prefix(loc: S3Location, uri: str) -> int:
    """Delete every object under `uri` (what a failed upload left); returns how many."""
    bucket, _ = split_uri(uri)
    keys = list_keys(loc, uri)
    s3 = client(loc)
    for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        s3.delete_objects(
            Bucket=bucket,
            Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
        )
    return len(keys)


def describe(err: BaseException) -> str:
    """A failure as one line without request signatures or credentials: botocore messages carry the
    operation, the error code and the retry count, never the keys."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:500]}"


def dvc_remote_commands(loc: S3Location) -> list[list[str]]:
    """The `dvc remote` commands that make the S3 location the default DVC remote. The endpoint and
    region go to the project's .dvc/config; the profile, being per machine, to .dvc/config.local."""
    name = loc.dvc_remote
    cmds = [
        ["dvc", "remote", "add", "--force", "--default", name, loc.dvc_url],
        ["dvc", "remote", "modify", name, "region", loc.region],
    ]
    if loc.endpoint_url:
        cmds.append(["dvc", "remote", "modify", name, "endpointurl", loc.endpoint_url])
    if loc.profile:
        cmds.append(["dvc", "remote", "modify", "--local", name, "profile", loc.profile])
    return cmds


def setup(cfg: Config, repo: Path = Path("."), create_bucket: bool = False) -> S3Location:
    """`refvg storage setup`: (optionally create the bucket and) point the DVC repo at the S3
    remote."""
    loc = location(cfg)
    if loc is None:
        raise StorageError(
            "no bucket configured: set storage.bucket in params.yaml or REFVG_S3_BUCKET"
        )
    if create_bucket:
        ensure_bucket(loc)
    for cmd in dvc_remote_commands(loc):
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
        if proc.returncode != 0:
            raise StorageError(f"{' '.join(cmd)} failed in {repo}: {proc.stderr.strip()[-500:]}")
    return loc
