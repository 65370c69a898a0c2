"""The S3 workflow: serialize a model to a bucket, serve it straight from the bucket.

By default it starts an S3 API server on loopback (moto), so it runs without an account:

    make s3-demo                        # or: .venv/bin/python examples/s3_workflow.py

To use a real bucket instead, set the endpoint, credentials and bucket first:

    S3_ENDPOINT_URL=https://s3.us-east-1.amazonaws.com S3_ACCESS_KEY_ID=... \
    S3_SECRET_ACCESS_KEY=... .venv/bin/python examples/s3_workflow.py --bucket my-bucket

Steps: build a small local model (random weights: its text is noise, the point is the
transfer); ``python -m tensorize_vllm_model ... serialize --serialized-directory
s3://BUCKET/demo`` (tensors, config and tokenizer to the bucket);
``LLM("s3://BUCKET/demo/vllm/tiny-llama/v1", load_format="tensorizer")``, which fetches
only the small files into a local cache and streams the tensors from S3 into memory.

The loopback server lives as long as the script: with ``--keep-serving`` it stays up after
the run (until Ctrl-C), and the ``vllm serve`` command printed last works in another shell.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# examples/ also holds vLLM's example script, named like the package.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from demo_models import build_model  # noqa: E402

WORK = ROOT / ".demo"


def start_loopback_s3(bucket: str):
    """An S3 API server on 127.0.0.1 (moto), with `bucket` created."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        sys.exit(
            "the embedded S3 server needs moto: .venv/bin/pip install 'moto[server]' "
            "(or run `make s3-demo`)"
        )
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        S3_ENDPOINT_URL=endpoint, S3_ACCESS_KEY_ID="demo", S3_SECRET_ACCESS_KEY="demo-secret"
    )
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="demo",
        aws_secret_access_key="demo-secret",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    return server, endpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", default="demo-models")
    parser.add_argument(
        "--keep-serving",
        action="store_true",
        help="keep the loopback S3 server up after the run (until Ctrl-C), so that the "
        "printed vllm serve command works",
    )
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    gpu = not current_platform.is_cpu()
    server = None
    if os.environ.get("S3_ENDPOINT_URL"):
        endpoint = os.environ["S3_ENDPOINT_URL"]
        print(f"using the S3 endpoint {endpoint}, bucket {args.bucket}")
    else:
        server, endpoint = start_loopback_s3(args.bucket)
        print(
            f"started an S3 API server on {endpoint} (moto, loopback only, in memory: it "
            f"stops with this script), bucket {args.bucket}"
        )
    # A loopback server speaks plain HTTP; real endpoints should be https://.
    allow_http = ["--allow-http"] if endpoint.startswith("http://") else []
    extra = {"stream_kwargs": {"force_http": True}} if allow_http else {}

    print("building a small model with random weights (its text is noise)", flush=True)
    model_dir = build_model(
        WORK / "tiny-llama", hidden_size=512, num_heads=8, num_layers=4, intermediate_size=1536
    )
    flags = ["--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager"]
    if not gpu:
        flags += ["--gpu-memory-utilization", "0.3"]
    command = [
        sys.executable,
        "-m",
        "tensorize_vllm_model",
        "--model",
        str(model_dir),
        *flags,
        "serialize",
        "--serialized-directory",
        f"s3://{args.bucket}/demo",
        "--suffix",
        "v1",
        *allow_http,
    ]
    print("$ python " + " ".join(command[1:]), flush=True)
    completed = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    uri = completed.stdout.strip().splitlines()[-1]
    print(f"serialized to {uri}", flush=True)

    start = time.perf_counter()
    llm = LLM(
        uri,
        load_format="tensorizer",
        model_loader_extra_config=extra,
        dtype="bfloat16",
        max_model_len=256,
        enforce_eager=True,
        gpu_memory_utilization=0.9 if gpu else 0.3,
        worker_extension_cls="tensorize_vllm_model.integrations.vllm.worker.WorkerExtension",
    )
    ready = time.perf_counter() - start
    [stats] = llm.collective_rpc("tensorize_vllm_model_load_stats")
    [output] = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.0, max_tokens=16))
    print(f"\n  {output.prompt!r} -> {output.outputs[0].text!r}\n")
    print(
        f"Streamed {stats['bytes'] / 1e6:.1f} MB from {stats['uri']} in {stats['seconds']:.3f} s "
        f"({stats['bytes'] / stats['seconds'] / 1e9:.2f} GB/s); engine ready in {ready:.1f} s"
    )
    llm.llm_engine.engine_core.shutdown()
    print_serve_command(
        uri, endpoint, flags, extra, loopback=server is not None, kept=args.keep_serving
    )
    if server is not None:
        if args.keep_serving:
            wait_for_ctrl_c(endpoint)
        server.stop()


def print_serve_command(
    uri: str, endpoint: str, flags: list[str], extra: dict, *, loopback: bool, kept: bool
) -> None:
    """The ``vllm serve`` command that serves the model from the bucket, when it can work
    after this script: with a real bucket, or a loopback server kept up (--keep-serving)."""
    environment = (
        f"S3_ENDPOINT_URL={endpoint} S3_ACCESS_KEY_ID=demo S3_SECRET_ACCESS_KEY=demo-secret "
        if loopback
        else ""
    )
    http = ' --model-loader-extra-config \'{"stream_kwargs": {"force_http": true}}\''
    command = (
        f"{environment}.venv/bin/vllm serve {uri} --load-format tensorizer "
        + " ".join(flags)
        + (http if extra else "")
    )
    if loopback and not kept:
        print(
            "\nThe loopback S3 server stopped with this script. To serve the model from it "
            "with vllm serve, run\n  .venv/bin/python examples/s3_workflow.py --keep-serving\n"
            "and, in another shell while it waits, the vllm serve command it prints."
        )
        return
    print(f"\nServe it from the bucket (in another shell):\n  {command}", flush=True)


def wait_for_ctrl_c(endpoint: str) -> None:
    """Keep the loopback server up until Ctrl-C."""
    print(f"\nThe S3 server on {endpoint} stays up until Ctrl-C.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the S3 server")


if __name__ == "__main__":
    main()
