"""The read and write plans: which file each rank reads or writes, decided in one place
(`plan.resolve_read` / `plan.resolve_write`) from what the user gave. No vLLM, no engine."""

import pytest

from tensorize_vllm_model import ConfigError, TensorizerConfig
from tensorize_vllm_model.config.plan import (
    check_rank_files,
    discover_rank_uris,
    resolve_read,
    resolve_write,
)
from tensorize_vllm_model.format.record import FileRecord, ParallelLayout

TP2_RANK1 = ParallelLayout(tensor_parallel_size=2, tp_rank=1)
PP2 = ParallelLayout(pipeline_parallel_size=2)


def test_config_keeps_what_the_user_gave():
    by_dir = TensorizerConfig(tensorizer_dir="/m/v1")
    assert by_dir.given_uri is None and by_dir.tensorizer_uri == "/m/v1/model.tensors"
    assert by_dir.to_serializable() == {"tensorizer_dir": "/m/v1"}
    by_uri = TensorizerConfig(tensorizer_uri="/m/v1/x.tensors")
    assert by_uri.given_uri == "/m/v1/x.tensors"
    assert by_uri.to_serializable() == {"tensorizer_uri": "/m/v1/x.tensors"}
    by_dir["tensorizer_uri"] = "/m/v1/model-rank-%03d.tensors"  # set later: given too
    assert by_dir.given_uri == "/m/v1/model-rank-%03d.tensors"
    by_dir = TensorizerConfig(tensorizer_dir="/m/v1")
    # The dict form comes back as the same config (vLLM hands the loader the dict).
    again = TensorizerConfig.from_extra_config(by_dir.to_serializable())
    assert again.given_uri is None and again == by_dir


def test_rank_template_gives_each_rank_its_file():
    plan = resolve_read(TensorizerConfig(tensorizer_uri="/m/model-rank-%03d.tensors"), TP2_RANK1)
    assert (plan.uri, plan.shared) == ("/m/model-rank-001.tensors", False)
    assert plan.rank_uris() == ["/m/model-rank-000.tensors", "/m/model-rank-001.tensors"]


def test_explicit_uri_without_template_is_shared():
    plan = resolve_read(TensorizerConfig(tensorizer_uri="/m/hf.tensors"), TP2_RANK1)
    assert (plan.uri, plan.shared) == ("/m/hf.tensors", True)
    assert plan.file_config().tensorizer_uri == "/m/hf.tensors"


def test_directory_with_rank_files_reads_them(tmp_path):
    (tmp_path / "model.tensors").write_bytes(b"x")
    (tmp_path / "model-rank-000.tensors").write_bytes(b"x")
    plan = resolve_read(TensorizerConfig(tensorizer_dir=str(tmp_path)), TP2_RANK1)
    assert (plan.uri, plan.shared) == (str(tmp_path / "model-rank-001.tensors"), False)
    assert plan.template == str(tmp_path / "model-rank-%03d.tensors")


def test_directory_with_one_file_shares_it(tmp_path):
    (tmp_path / "model.tensors").write_bytes(b"x")
    plan = resolve_read(TensorizerConfig(tensorizer_dir=str(tmp_path)), TP2_RANK1)
    assert (plan.uri, plan.shared) == (str(tmp_path / "model.tensors"), True)
    one_rank = resolve_read(TensorizerConfig(tensorizer_dir=str(tmp_path)), ParallelLayout())
    assert (one_rank.uri, one_rank.shared) == (str(tmp_path / "model.tensors"), False)


def test_plan_carries_key_and_stream_options():
    config = TensorizerConfig(
        tensorizer_uri="s3://b/m/model.tensors",
        encryption_keyfile="s3://b/m/model.key",
        s3_endpoint="http://127.0.0.1:9",
        stream_kwargs={"force_http": True},
    )
    plan = resolve_read(config, ParallelLayout())
    assert plan.keyfile == "s3://b/m/model.key"
    assert plan.options.get("s3_endpoint") == "http://127.0.0.1:9"
    assert plan.options.get("force_http") is True
    assert plan.options is config.options  # built once, at the edge


def test_write_needs_a_rank_template_at_several_ranks():
    with pytest.raises(ConfigError, match="needs one vLLM-tensorized file per rank"):
        resolve_write(TensorizerConfig(tensorizer_uri="/out/model.tensors"), TP2_RANK1)
    plan = resolve_write(
        TensorizerConfig(
            tensorizer_uri="/out/model-rank-%03d.tensors",
            serialization_kwargs={"compress_tensors": True},
        ),
        TP2_RANK1,
    )
    assert (plan.uri, plan.directory) == ("/out/model-rank-001.tensors", "/out")
    assert plan.serialization_kwargs == {"compress_tensors": True}


def test_check_layout_is_the_write_rule():
    """vLLM's verify_with_parallel_config asks the plan: a given URI needs a rank template
    at more than one rank; a directory's ranks get model-rank-%03d.tensors."""
    with pytest.raises(ConfigError, match=r"TP=1 x PP=2 .*'/m/model.tensors' has no rank"):
        check_rank_files(TensorizerConfig(tensorizer_uri="/m/model.tensors"), PP2)
    check_rank_files(TensorizerConfig(tensorizer_uri="/m/model-rank-%03d.tensors"), PP2)
    check_rank_files(TensorizerConfig(tensorizer_dir="/m"), PP2)
    with pytest.raises(ConfigError, match="not a valid rank template"):
        check_rank_files(TensorizerConfig(tensorizer_uri="/m/model-%s-%d.tensors"), PP2)


def test_rank_layouts_follow_vllms_numbering():
    plan = resolve_read(
        TensorizerConfig(tensorizer_uri="/m/r%d.tensors"),
        ParallelLayout(tensor_parallel_size=2, pipeline_parallel_size=2),
    )
    assert plan.rank_uris() == [f"/m/r{r}.tensors" for r in range(4)]
    assert [(plan.rank_layout(r).tp_rank, plan.rank_layout(r).pp_rank) for r in range(4)] == [
        (0, 0),
        (1, 0),
        (0, 1),
        (1, 1),
    ]


def test_discovery_counts_ranks_from_rank_zeros_record(tmp_path):
    template = str(tmp_path / "model-rank-%03d.tensors")
    asked: list[str] = []

    def record_of(uri):
        asked.append(uri)
        return FileRecord(architecture="Small", tensor_parallel_size=2, pipeline_parallel_size=2)

    found = discover_rank_uris(TensorizerConfig(tensorizer_uri=template), record_of)
    assert found == [template % r for r in range(4)]  # none exists: the record says 4
    assert asked == [template % 0]


def test_discovery_without_record_probes_until_a_rank_file_is_missing(tmp_path):
    for rank in (0, 1, 2, 4):
        (tmp_path / f"model-rank-{rank:03d}.tensors").write_bytes(b"x")
    template = str(tmp_path / "model-rank-%03d.tensors")
    found = discover_rank_uris(TensorizerConfig(tensorizer_uri=template), lambda uri: None)
    assert found == [template % r for r in range(3)]


def test_discovery_of_one_file_reads_nothing():
    def never(uri):
        raise AssertionError(f"read {uri}")

    assert discover_rank_uris(TensorizerConfig(tensorizer_uri="/m/model.tensors"), never) == [
        "/m/model.tensors"
    ]


def test_directory_that_is_not_a_template_gives_a_config_error(tmp_path):
    """A directory whose name holds ``%`` (not a rank template) at several ranks: a
    ConfigError naming it, not a TypeError from ``%`` formatting."""
    config = TensorizerConfig(tensorizer_dir=str(tmp_path / "50%off"))
    with pytest.raises(ConfigError, match="50%off"):
        resolve_read(config, TP2_RANK1)
