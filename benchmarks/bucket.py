"""The benchmark's S3 bucket: SeaweedFS's ``weed mini`` on loopback (tests/support/servers.py's
`SeaweedServer`), holding every file the S3 and vLLM scenarios read, and the environment
that points every client at it: this package and tensorizer (``S3_*``), boto3 and
runai-model-streamer (``AWS_*``, ``RUNAI_STREAMER_S3_*``).

Unlike moto, SeaweedFS serves a byte range without reading the whole object, so the
default parallel-range reader is measured against a server that serves ranges.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUCKET = "bench"


class Bucket:
    """A started SeaweedFS with the bucket `BUCKET` filled from `files` (see run.prepare)."""

    def __init__(self, directory: Path, files: dict[str, str]):
        sys.path.insert(0, str(HERE.parent / "tests" / "support"))
        from servers import SeaweedServer

        self.server = SeaweedServer(directory)
        client = self.server.client()
        client.create_bucket(Bucket=BUCKET)
        uploads = {
            "model.tensors": files["tensors"],
            "model-enc.tensors": files["encrypted"],
        }
        # the Hugging Face directory (runai_streamer and the default loader read it) and the
        # vLLM-tensorized directory (load_format="tensorizer" reads it), file by file
        for prefix, root in (("hf", files["model_dir"]), ("vllm", files["vllm_dir"])):
            for path in Path(root).rglob("*"):
                if path.is_file():
                    uploads[f"{prefix}/{path.relative_to(root)}"] = str(path)
        for key, path in uploads.items():
            if os.path.exists(path):
                client.upload_file(path, BUCKET, key)
        self.client = client
        self.endpoint = self.server.endpoint

    def url(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}"

    def presigned(self, key: str) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=7200
        )

    def environment(self) -> dict[str, str]:
        key, secret = self.server.access_key_id, self.server.secret_access_key
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "S3_ACCESS_KEY_ID": key,
            "S3_SECRET_ACCESS_KEY": secret,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            # runai-model-streamer: path-style requests to a plain-HTTP endpoint
            "RUNAI_STREAMER_S3_ENDPOINT": self.endpoint,
            "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        }

    def download(self, prefix: str, directory: str) -> None:
        """Every object under `prefix`/ into `directory` (boto3's managed transfer)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=prefix + "/"
        )
        for page in pages:
            for item in page.get("Contents", []):
                target = Path(directory) / item["Key"][len(prefix) + 1 :]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(BUCKET, item["Key"], str(target))

    def stop(self) -> None:
        self.server.stop()
