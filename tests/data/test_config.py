import omegaconf
import pytest

from frontier_jax.data import DataConfig, MixturePhase, RecordFormat, SourceConfig

TWO = [SourceConfig("code", "embedded_code"), SourceConfig("math", "embedded_math")]


def test_default_config_is_the_embedded_code_and_math_mixture_and_valid():
    cfg = DataConfig()
    cfg.validate()
    assert [(s.kind, s.weight) for s in cfg.sources] == [("embedded_code", 0.7), ("embedded_math", 0.3)]
    assert cfg.tokenizer == "byte" and not cfg.mask_documents


def test_config_works_as_omegaconf_structured_config():
    merged = omegaconf.OmegaConf.merge(
        omegaconf.OmegaConf.structured(DataConfig),
        {"mask_documents": True, "sources": [{"name": "web", "kind": "jsonl", "path": "/d/*.jsonl"}]},
    )
    cfg = omegaconf.OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and isinstance(cfg.sources[0], SourceConfig)
    assert cfg.sources[0].weight == 1.0 and cfg.mask_documents
    cfg.validate()


@pytest.mark.parametrize(
    "cfg, fragments",
    [
        (DataConfig(sources=[]), ["data.sources"]),
        (DataConfig(sources=[SourceConfig("a", "csv", "x.csv")]), ["data.sources[0].kind", "'csv'", "jsonl"]),
        (DataConfig(sources=[SourceConfig("a", "jsonl")]), ["data.sources[0].path", "glob"]),
        (
            DataConfig(sources=[SourceConfig("a", "embedded_math", weight=0.0)]),
            ["data.sources[*].weight=[0.0]", "positive total", "weight > 0"],
        ),
        (
            DataConfig(sources=[SourceConfig("a", "embedded_math", weight=-1.0)]),
            ["data.sources[0].weight=-1.0", ">= 0"],
        ),
        (
            DataConfig(sources=TWO, stages=[MixturePhase(10, {"code": 1}), MixturePhase(10, {"math": 1})]),
            ["data.stages[1].start_step=10", "data.stages[0].start_step=10", "strictly increasing"],
        ),
        (
            DataConfig(sources=TWO, stages=[MixturePhase(-1, {"code": 1})]),
            ["data.stages[0].start_step=-1", "from 0"],
        ),
        (
            DataConfig(sources=TWO, stages=[MixturePhase(5, {"code": 1, "web": 2})]),
            ["data.stages[0].weights", "'web'", "not in data.sources", "['code', 'math']"],
        ),
        (
            DataConfig(sources=TWO, stages=[MixturePhase(5, {"code": 0, "math": 0})]),
            ["data.stages[0].weights", "positive total"],
        ),
        (
            DataConfig(sources=TWO, stages=[MixturePhase(5, {"code": -0.5, "math": 1})]),
            ["data.stages[0].weights.code=-0.5", ">= 0"],
        ),
        (DataConfig(shuffle_window=-1), ["data.shuffle_window=-1"]),
        (
            DataConfig(sources=[SourceConfig("a", "embedded_math"), SourceConfig("a", "embedded_code")]),
            ["data.sources[1].name", "unique"],
        ),
        (DataConfig(min_document_chars=0), ["data.min_document_chars"]),
        (DataConfig(max_document_chars=5, min_document_chars=10), ["data.max_document_chars=5"]),
        (DataConfig(worker_count=-1), ["data.worker_count=-1"]),
    ],
)
def test_invalid_config_error_names_field_and_value(cfg, fragments):
    with pytest.raises(ValueError) as err:
        cfg.validate()
    for fragment in fragments:
        assert fragment in str(err.value)


def test_record_format_and_special_tokens_load_from_omegaconf_and_bad_formats_name_the_choices():
    merged = omegaconf.OmegaConf.merge(
        omegaconf.OmegaConf.structured(DataConfig),
        {
            "special_tokens": {"fim_begin": "<PRE>"},
            "sources": [{"name": "sft", "kind": "jsonl", "path": "/d/*.jsonl", "format": "chat"}],
        },
    )
    cfg = omegaconf.OmegaConf.to_object(merged)
    assert cfg.sources[0].format == RecordFormat.chat and cfg.special_tokens == {"fim_begin": "<PRE>"}
    assert cfg.sources[0].fields() == ("messages",)
    with pytest.raises(omegaconf.ValidationError, match="prompt_response"):
        omegaconf.OmegaConf.merge(
            omegaconf.OmegaConf.structured(SourceConfig), {"name": "a", "kind": "jsonl", "format": "dialogue"}
        )


def test_mixture_stages_load_from_omegaconf():
    merged = omegaconf.OmegaConf.merge(
        omegaconf.OmegaConf.structured(DataConfig),
        {
            "stages": [
                {"start_step": 0, "weights": {"code": 1}},
                {"start_step": 200, "weights": {"math": 2.5}},
            ]
        },
    )
    cfg = omegaconf.OmegaConf.to_object(merged)
    assert cfg.stages == [MixturePhase(0, {"code": 1.0}), MixturePhase(200, {"math": 2.5})]
    cfg.validate()
