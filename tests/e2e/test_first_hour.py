"""What a new user meets in the first hour (issue 33): every refusal is one ``error:`` line,
exit code 2, naming the fix in the words of the entry point in use; a model directory is
taken wherever a tensors file is; ``--help`` shows each command's own flags; runs say what
they checked. No engine starts here (vLLM's refusals come before one would)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tensorize_vllm_model import ConfigError, EncryptionError, LayoutError, NotFound
from tensorize_vllm_model.cli import main
from tensorize_vllm_model.config import TensorizerConfig
from tensorize_vllm_model.config.plan import resolve_read
from tensorize_vllm_model.core import errors
from tensorize_vllm_model.format.record import FileRecord, ParallelLayout
from tensorize_vllm_model.format.writer import write_tensors
from tensorize_vllm_model.inspection.checks import check_shards
from tensorize_vllm_model.read.modules import load_into_module
from tensorize_vllm_model.read.reader import open_tensors
from tests.support.commands import ENGINE_FLAGS, run_main, subprocess_env

KEY = bytes(range(32))


def model_dir(root: Path, checkpoint: Path, *, ranks: int = 1, key: bytes | None = None) -> Path:
    """A serialized-looking model directory: `checkpoint`'s config and tokenizer, and one
    small vLLM-tensorized file per rank (``model.tensors`` at one rank)."""
    root.mkdir(parents=True)
    for name in os.listdir(checkpoint):
        if not name.endswith(".safetensors"):
            shutil.copy(checkpoint / name, root)
    for rank in range(ranks):
        name = "model.tensors" if ranks == 1 else f"model-rank-{rank:03d}.tensors"
        record = FileRecord(architecture="LlamaForCausalLM", tensor_parallel_size=ranks, rank=rank)
        write_tensors(
            str(root / name), [("w", torch.ones(2, 2), False)], record=record, key=key
        ).commit()
    return root


@pytest.fixture(scope="module")
def tp2_dir(tmp_path_factory, tiny_llama) -> Path:
    return model_dir(tmp_path_factory.mktemp("first") / "tp2", tiny_llama, ranks=2)


@pytest.fixture(scope="module")
def encrypted_dir(tmp_path_factory, tiny_llama) -> Path:
    return model_dir(tmp_path_factory.mktemp("first") / "enc", tiny_llama, key=KEY)


# -- the key, in the words of each entry point ---------------------------------------------


@pytest.mark.parametrize(
    ("entry", "hint"),
    [
        ("python", 'give the key in the config= argument, e.g. config={"encryption_keyfile"'),
        ("LLM", "as encryption_keyfile in model_loader_extra_config, e.g. LLM(..., model_loader"),
        ("vllm serve", "as encryption_keyfile in --model-loader-extra-config, e.g. --model-"),
        ("cli", "give the key with --keyfile KEYFILE"),
    ],
)
def test_missing_key_names_the_fix_of_the_entry_point(encrypted_dir, entry, hint):
    with errors.entry_point(entry), pytest.raises(EncryptionError) as caught:
        open_tensors(str(encrypted_dir / "model.tensors"))
    message = str(caught.value)
    assert message.startswith(f"{encrypted_dir}/model.tensors is encrypted: give the key ")
    assert hint in message
    assert "--keyfile" not in str(caught.value) or entry == "cli"


def test_missing_key_on_the_command_line(capsys, encrypted_dir):
    code, err = run_main(capsys, "verify", encrypted_dir)
    assert (code, err) == (
        2,
        f"error: {encrypted_dir}/model.tensors is encrypted: give the key with --keyfile KEYFILE",
    )


def test_vllm_serve_refusal_is_one_line(encrypted_dir):
    """vLLM's own command line, with this package's plug-in: one line, exit code 2, the
    key named as vllm serve takes it (no engine starts: the check comes first)."""
    vllm = Path(sys.executable).parent / "vllm"
    proc = subprocess.run(
        [str(vllm), "serve", str(encrypted_dir), "--load-format", "tensorizer"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {encrypted_dir}/model.tensors is encrypted: give the key as "
        "encryption_keyfile in --model-loader-extra-config, e.g. --model-loader-extra-config "
        '\'{"encryption_keyfile": "KEYFILE"}\''
    )
    assert "Traceback" not in proc.stderr


# -- a directory wherever a tensors file is --------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "flags"),
    [
        ("cli", "--tensor-parallel-size 2 --pipeline-parallel-size 1"),
        ("LLM", "tensor_parallel_size=2 pipeline_parallel_size=1"),
    ],
)
def test_directory_of_rank_files_at_one_rank_names_their_layout(tp2_dir, entry, flags):
    """What deserialize --serialized-directory and vllm serve check before an engine starts
    (`registration.check_engine_files`): it said "no such file: DIR/model.tensors"."""
    config = TensorizerConfig(tensorizer_dir=str(tp2_dir))
    plan = resolve_read(config, ParallelLayout())
    with errors.entry_point(entry), pytest.raises(LayoutError) as caught:
        check_shards(plan.file_config(), 1, 1)
    assert str(caught.value) == (
        f"{tp2_dir}/model-rank-000.tensors was serialized for TP=2 x PP=1 but is being loaded "
        f"with TP=1 x PP=1; load it with {flags}, or serialize the model again for this layout"
    )


def test_tensorizer_uri_naming_a_directory_reads_its_files(tp2_dir):
    """``--path-to-tensors DIR`` / ``tensorizer_uri=DIR`` read DIR's files, as
    ``tensorizer_dir`` does (it said "is a directory, not a file")."""
    config = TensorizerConfig(tensorizer_uri=str(tp2_dir))
    plan = resolve_read(config, ParallelLayout(tensor_parallel_size=2))
    assert plan.rank_uris() == [f"{tp2_dir}/model-rank-00{r}.tensors" for r in (0, 1)]
    check_shards(plan.file_config(), 2, 1)
    one = resolve_read(config, ParallelLayout())
    with pytest.raises(LayoutError, match="was serialized for TP=2 x PP=1"):
        check_shards(one.file_config(), 1, 1)


def test_inspect_and_verify_take_a_directory(capsys, tp2_dir):
    assert main(["inspect", str(tp2_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{tp2_dir}/model-rank-000.tensors" in out and f"{tp2_dir}/model-rank-001.tensors" in out
    assert main(["verify", str(tp2_dir), "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert [(f["uri"], f["intact"], f["layout"]) for f in files] == [
        (f"{tp2_dir}/model-rank-00{r}.tensors", True, f"TP=2 x PP=1, rank {r}") for r in (0, 1)
    ]


def test_open_tensors_takes_a_directory(tmp_path, tp2_dir, encrypted_dir):
    with open_tensors(
        str(encrypted_dir), config={"encryption_keyfile": None}, header_only=True
    ) as r:
        assert r.uri == f"{encrypted_dir}/model.tensors"
    with pytest.raises(ConfigError) as caught:
        open_tensors(str(tp2_dir))
    assert str(caught.value) == (
        f"{tp2_dir} holds one file per rank ({tp2_dir}/model-rank-000.tensors, ...): open one "
        f"of them, e.g. open_tensors('{tp2_dir}/model-rank-000.tensors')"
    )
    with pytest.raises(NotFound, match=r"is a directory without tensors \(neither model.tensors"):
        open_tensors(str(tmp_path))


# -- help -------------------------------------------------------------------------------------


def test_top_level_help_is_short_and_says_where_engine_flags_are(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 30  # it was vLLM's 2,321 lines
    for command in ("serialize", "deserialize", "inspect", "verify", "convert"):
        assert f"\n  {command} " in out
    assert "--help=all" in out and "COMMAND --help" in out


@pytest.mark.parametrize(
    ("command", "described"),
    [
        ("serialize", "--keyfile KEYFILE     Encrypt the weights."),
        ("deserialize", "--keyfile KEYFILE     The key that decrypts the weights"),
    ],
)
def test_command_help_shows_its_own_flags(capsys, command, described):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert described in out
    assert "Config Groups" not in out
    assert "--help=all" in " ".join(out.split())


def test_engine_flags_help_by_word(capsys):
    assert main(["--help=tensor-parallel"]) == 0
    assert "--tensor-parallel-size" in capsys.readouterr().out


# -- vLLM's own refusal of the engine flags --------------------------------------------------


@pytest.fixture(scope="module")
def nine_heads(tmp_path_factory) -> Path:
    from demo_models import build_model

    return build_model(tmp_path_factory.mktemp("nine") / "nine", hidden_size=576, num_heads=9)


def test_layout_vllm_refuses_is_one_line(capsys, nine_heads, tmp_path):
    code, err = run_main(
        capsys, "--model", nine_heads, *ENGINE_FLAGS, "--tensor-parallel-size", "2",
        "serialize", "--serialized-directory", tmp_path,
    )  # fmt: skip
    assert (code, err.splitlines()[-1]) == (
        2,
        "error: vLLM refused the engine flags: Total number of attention heads (9) must be "
        "divisible by tensor parallel size (2).",
    )
    assert not list(tmp_path.iterdir())


# -- what a run did ---------------------------------------------------------------------------


def test_convert_to_an_existing_suffix_says_replaced(capsys, tiny_llama, tmp_path):
    argv = ["--model", str(tiny_llama), "convert", "--serialized-directory", str(tmp_path)]
    assert main([*argv, "--suffix", "v1"]) == 0
    assert "replaced" not in capsys.readouterr().out
    assert main([*argv, "--suffix", "v1"]) == 0
    out = capsys.readouterr().out
    assert f"  replaced the model that was in {tmp_path}/vllm/tiny-llama/v1 (same --suffix" in out


def test_verify_says_what_it_checked(capsys, encrypted_dir, tmp_path):
    key = tmp_path / "k.key"
    key.write_bytes(KEY)
    assert main(["verify", str(encrypted_dir), "--keyfile", str(key)]) == 0
    assert capsys.readouterr().out.startswith(
        f"OK {encrypted_dir}/model.tensors: 1 tensors, 0.0 MB, hashes checked, decrypted with "
        "the key, layout TP=1 x PP=1, rank 0 in "
    )


def test_vllm_form_file_into_a_module_is_short_and_names_convert(tmp_path):
    """A serialized (vLLM-form) file into a transformers-like module: it was one 13.6 KB
    line of every name; now a few names of each kind and the form that loads there."""
    path = tmp_path / "model.tensors"
    names = [
        (f"model.layers.{i}.self_attn.qkv_proj.weight", torch.ones(3, 2), False) for i in range(40)
    ]
    write_tensors(str(path), names, record=FileRecord()).commit()
    module = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(40)))
    with open_tensors(str(path)) as reader, pytest.raises(errors.ModelMismatchError) as caught:
        load_into_module(module, reader)
    message = str(caught.value)
    assert len(message) < 1200 and "\n" not in message
    assert (
        "not in the model: model.layers.0.self_attn.qkv_proj.weight, "
        "model.layers.1.self_attn.qkv_proj.weight" in message
    )
    assert "model.layers.5.self_attn.qkv_proj.weight and 34 more (40 in all); " in message
    assert message.endswith(
        "holds vLLM's own parameters (as serialize writes them, e.g. fused qkv_proj), which "
        "load into vLLM; the file that loads into the checkpoint's own (transformers) model is "
        "convert's output"
    )


def test_unreachable_s3_endpoint_names_the_setting():
    import socket

    from tensorize_vllm_model import StorageError, storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there
    options = {"s3_access_key_id": "k", "s3_secret_access_key": "s", "force_http": True}
    start = time.monotonic()
    with pytest.raises(StorageError) as caught:
        storage.read_bytes(
            "s3://models/model.tensors", {**options, "s3_endpoint": endpoint, "timeout": 2.0}
        )
    assert str(caught.value).endswith(
        "is it up? The endpoint is --s3-endpoint (s3_endpoint in the config), else S3_ENDPOINT_URL"
    )
    assert time.monotonic() - start < 30


# -- review-33: a directory or model that is not what deserialize needs -------------------


def test_serialized_directory_that_is_no_model_directory(capsys, tiny_llama, tmp_path):
    """``deserialize --serialized-directory`` given a checkpoint without tensors, a missing
    directory or a file said "no such file: DIR/model.tensors" (after starting vLLM)."""
    code, err = run_main(capsys, "deserialize", "--serialized-directory", tiny_llama)
    assert (code, err) == (
        2,
        f"error: {tiny_llama} is a directory without tensors (neither model.tensors nor "
        "model-rank-000.tensors); give the directory serialize or convert printed, or a "
        "tensors file",
    )
    for path, what in (
        (tmp_path / "nothere", "no such directory"),
        (tiny_llama / "config.json", "not a directory"),
    ):
        code, err = run_main(capsys, "deserialize", "--serialized-directory", path)
        assert (code, err) == (
            2,
            f"error: --serialized-directory {path}: {what}; give the directory serialize or "
            "convert printed (or --path-to-tensors for a tensors file)",
        )


def test_engine_files_check_names_a_directory_without_tensors(tiny_llama):
    """What ``vllm serve DIR --load-format tensorizer`` / ``LLM(DIR, ...)`` check before an
    engine starts, for a model directory with no tensors in it."""
    from vllm.engine.arg_utils import EngineArgs

    from tensorize_vllm_model.integrations.vllm.registration import check_engine_files

    with pytest.raises(NotFound, match=f"^{tiny_llama} is a directory without tensors "):
        check_engine_files(EngineArgs(model=str(tiny_llama), load_format="tensorizer"))


def test_model_vllm_cannot_find_is_one_line(capsys, tmp_path, monkeypatch, encrypted_dir):
    """A --model that is neither a local directory nor a Hub id reachable from here (and
    deserialize --path-to-tensors without --model, which tries vLLM's default model): it
    was huggingface_hub's traceback, exit code 1."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: fail at once, not after retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, err = run_main(
        capsys, "--model", "no-such-org/no-such-model", *ENGINE_FLAGS,
        "serialize", "--serialized-directory", tmp_path,
    )  # fmt: skip
    err = err.splitlines()[-1]  # after vLLM's own warnings, if any
    assert code == 2, err
    assert err.startswith("error: vLLM cannot find the model --model no-such-org/no-such-model: ")
    assert err.endswith(
        "Give a local model directory (config.json, tokenizer) or a Hub id this "
        "machine can download"
    )
    assert not list(tmp_path.iterdir())
    code, err = run_main(
        capsys, *ENGINE_FLAGS, "deserialize", "--path-to-tensors", encrypted_dir / "model.tensors"
    )
    assert code == 2, err
    assert err.splitlines()[-1].endswith(
        "(--path-to-tensors loads the model's config and tokenizer from --model, not given: "
        "give it before the command, python -m tensorize_vllm_model --model DIR deserialize "
        "--path-to-tensors URI, or give --serialized-directory DIR instead)"
    )


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (
            [
                "--model",
                "M",
                "serialize",
                "--serialized-directory",
                "D",
                "--tensor-parallel-size",
                "2",
            ],
            "--tensor-parallel-size",
        ),  # noqa: E501
        (["deserialize", "--serialized-directory", "D", "--dtype=bfloat16"], "--dtype"),
        (["--model", "M", "serialize", "--serialized-directory", "D", "-tp", "2"], "-tp"),
        (["deserialize", "--model", "M", "--path-to-tensors", "F"], "--model"),
        (
            ["--model", "M", "convert", "--serialized-directory", "D", "--dtype", "float16"],
            "--dtype",
        ),  # noqa: E501
    ],
)
def test_flag_of_before_the_command_given_after_it(capsys, argv, flag):
    """An engine flag (or convert's --dtype) after the command said only "unrecognized
    arguments: --tensor-parallel-size 2"; now where it goes."""
    command = next(a for a in argv if a in ("serialize", "deserialize", "convert"))
    code, err = run_main(capsys, *argv)
    assert (code, err) == (
        2,
        f"error: {flag} goes before the command, not after it: python -m tensorize_vllm_model "
        f"... {flag} VALUE {command} ...",
    )


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ("python", "the config= argument"),
        ("LLM", "model_loader_extra_config"),
        ("vllm serve", "--model-loader-extra-config"),
        ("cli", "--model-loader-extra-config"),
    ],
)
def test_unknown_config_key_named_where_it_was_given(encrypted_dir, entry, where):
    """``open_tensors(path, config={"encryption_key": ...})`` said "unknown key(s) in
    model_loader_extra_config", which open_tensors does not take."""
    with errors.entry_point(entry), pytest.raises(ConfigError) as caught:
        open_tensors(str(encrypted_dir), config={"encryption_key": "k"})
    assert str(caught.value).startswith(f"unknown key(s) in {where}: 'encryption_key'; known keys")


def test_refused_http_connection_is_not_called_a_timeout():
    """urllib3 2 makes a refused connection a ConnectTimeoutError: it read "no answer
    within 30 s (timed out)" though the refusal came at once."""
    import socket

    from tensorize_vllm_model import StorageError, storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/model.tensors"  # nothing listens there
    with pytest.raises(StorageError) as caught:
        storage.read_bytes(url, {"timeout": 2.0})
    message = str(caught.value)
    assert "timed out" not in message
    assert (
        "cannot connect ([Errno 111] Connection refused); is the server up at that host and "
        "port?" in message
    )
