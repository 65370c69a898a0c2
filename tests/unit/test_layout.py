"""Where a serialize puts files, rank templates, and the record each file carries."""

import pytest

from tensorize_vllm_model import ConfigError, FormatError, LayoutError
from tensorize_vllm_model.format.names import model_ref_path, rank_uri, serialized_dir, tensors_uri
from tensorize_vllm_model.format.record import FileRecord, ParallelLayout


def test_hub_id_kept_as_in_the_seed():
    assert (
        serialized_dir("s3://my-bucket/", "facebook/opt-125m", "v1")
        == "s3://my-bucket/vllm/facebook/opt-125m/v1"
    )


def test_relative_path_kept():
    assert model_ref_path("models/llama") == "models/llama"
    assert model_ref_path("./models/llama/") == "models/llama"


@pytest.mark.parametrize(
    "model", ["/abs/path/to/llama-3", "../../llama-3", "a/../../llama-3", "/llama-3/"]
)
def test_paths_that_would_escape_become_their_last_component(model):
    assert model_ref_path(model) == "llama-3"
    assert serialized_dir("/out", model, "v1") == "/out/vllm/llama-3/v1"


@pytest.mark.parametrize("suffix", ["", "a/b", "..", "."])
def test_bad_suffix_named(suffix):
    with pytest.raises(ConfigError, match="--suffix"):
        serialized_dir("/out", "org/m", suffix)


def test_tensors_uri_by_world_size():
    assert tensors_uri("/d", 1) == "/d/model.tensors"
    assert tensors_uri("/d", 4) == "/d/model-rank-%03d.tensors"


def test_rank_uri_uses_global_rank():
    layout = ParallelLayout(tensor_parallel_size=2, pipeline_parallel_size=2, tp_rank=1, pp_rank=1)
    assert layout.rank == 3
    assert rank_uri("/d/model-rank-%03d.tensors", layout) == "/d/model-rank-003.tensors"


def test_rank_uri_without_template_refused_for_many_ranks():
    with pytest.raises(ConfigError, match=r"TP=2 x PP=1.*no rank template.*model-rank-%03d"):
        rank_uri("/d/model.tensors", ParallelLayout(tensor_parallel_size=2))
    assert rank_uri("/d/model.tensors", ParallelLayout()) == "/d/model.tensors"
    # A load may share one file between ranks (whether it can is check_shared_file's call).
    assert (
        rank_uri("/d/model.tensors", ParallelLayout(tensor_parallel_size=2, tp_rank=1), shared=True)
        == "/d/model.tensors"
    )


def test_check_shared_file():
    from tensorize_vllm_model.config.plan import check_shared_file

    tp2 = ParallelLayout(tensor_parallel_size=2)
    check_shared_file("/d/hf.tensors", tp2, vllm_tensorized=False, record=None)
    check_shared_file(
        "/d/model.tensors", ParallelLayout(), vllm_tensorized=True, record=FileRecord()
    )
    check_shared_file("/d/model-rank-%03d.tensors", tp2, vllm_tensorized=True, record=None)
    with pytest.raises(ConfigError, match=r"TP=2 x PP=1 needs one vLLM-tensorized file per rank"):
        check_shared_file("/d/model.tensors", tp2, vllm_tensorized=True, record=None)
    with pytest.raises(LayoutError, match=r"serialized for TP=1 x PP=1 but is being loaded with"):
        check_shared_file("/d/model.tensors", tp2, vllm_tensorized=True, record=FileRecord())


def test_record_round_trip_and_layout_check():
    record = FileRecord(
        architecture="LlamaForCausalLM", dtype="bfloat16", tensor_parallel_size=2, rank=1
    )
    again = FileRecord.from_bytes(record.to_bytes(), source="f")
    assert again == record
    again.check_written_for(ParallelLayout(tensor_parallel_size=2, tp_rank=1), source="f")
    with pytest.raises(
        LayoutError,
        match=r"f was serialized for TP=2 x PP=1 but is being loaded "
        r"with TP=1 x PP=1",
    ):
        again.check_written_for(ParallelLayout(), source="f")
    with pytest.raises(LayoutError, match="rank 1.*rank 0"):
        again.check_written_for(ParallelLayout(tensor_parallel_size=2, tp_rank=0), source="f")


@pytest.mark.parametrize("data", [b"\xff\xfe", b"[1, 2]", b'{"format": "other"}'])
def test_bad_record_refused(data):
    with pytest.raises(FormatError, match="record"):
        FileRecord.from_bytes(data, source="f")


@pytest.mark.parametrize(
    ("directory", "model", "suffix", "named"),
    [
        ("/out", "/models/tiny%dllama", "v1", "--model"),
        ("/out", "org/m", "v%03d", "--suffix"),
        ("s3://b/my%20models", "org/m", "v1", "--serialized-directory"),
    ],
)
def test_destination_with_a_percent_sign_refused(directory, model, suffix, named):
    """A ``%`` in the serialized directory would read as (or break) a rank template when the
    directory is loaded: ``tiny%dllama/v1/model.tensors`` loads ``tiny0llama/...``, and at
    several ranks ``my%20models/model-rank-%03d.tensors`` does not format. Refused before
    anything is written, naming the flag."""
    with pytest.raises(ConfigError, match=f"{named}.*%"):
        serialized_dir(directory, model, suffix)


@pytest.mark.parametrize(
    ("uri", "template"),
    [
        ("/m/model-rank-%03d.tensors", True),
        ("s3://b/m/model-rank-%d.tensors", True),
        ("https://h/my%20dogs/model.tensors", False),  # a space, then "dogs"
        ("https://h/a%2dz/model.tensors", False),  # "-", percent-encoded
        ("/m/model.tensors", False),
    ],
)
def test_percent_encoding_is_not_a_rank_template(uri, template):
    """``%d`` or ``%0Nd`` is a rank template (vLLM 0.32 recognises ``%0\\dd``); a URL's
    percent-encoding followed by a ``d`` is not, and such a URI is read as given."""
    from tensorize_vllm_model.format.names import has_rank_template

    assert has_rank_template(uri) is template
    if not template:
        assert rank_uri(uri, ParallelLayout()) == uri
