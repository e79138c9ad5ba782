"""Where Prefect persists task results (and cache records) for a workdir on S3."""

from __future__ import annotations

import hashlib

from pneumo import storage


def s3_result_storage(workdir: str) -> str:
    """Save an S3Bucket block for ``{workdir}/prefect-results`` and return its slug.

    Task subprocesses (process pool, Dask, a worker's flow run) resolve result storage by
    name from the Prefect API, so the block must be saved there: an unsaved block object
    cannot be handed to ``task.with_options``. The block holds the bucket and prefix only.
    Its credentials are left empty on purpose, so boto3's default chain (environment,
    ``AWS_PROFILE``, instance role) and ``AWS_ENDPOINT_URL`` decide in each process, as they
    do for the shards, and no secret is ever stored on the Prefect server.
    """
    from prefect_aws import AwsCredentials, S3Bucket

    bucket, prefix = storage.split_s3(storage.join(workdir, "prefect-results"))
    # Named after the location, so runs on the same workdir share one block and its cache.
    name = "pneumo-results-" + hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:16]
    S3Bucket(bucket_name=bucket, bucket_folder=prefix, credentials=AwsCredentials()).save(name, overwrite=True)
    return f"s3-bucket/{name}"
