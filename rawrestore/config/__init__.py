"""Typed experiment configs: dataclasses in `schema`, YAML composition and overrides in `loader`."""
from rawrestore.config.loader import (
    apply_overrides,
    deep_merge,
    from_dict,
    load_config,
    load_tree,
    parse_override,
    save_resolved,
    to_dict,
)
from rawrestore.config.schema import (
    CFA_PERIOD,
    CharbonnierTermConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LossConfig,
    LossTermConfig,
    LpipsTermConfig,
    ModelConfig,
    PerceptualTermConfig,
    RobustTermConfig,
    SourceConfig,
    TrainConfig,
)

__all__ = [
    "load_config", "load_tree", "apply_overrides", "parse_override", "deep_merge", "from_dict", "to_dict",
    "save_resolved", "CFA_PERIOD", "DataConfig", "SourceConfig", "ModelConfig", "LossTermConfig", "CharbonnierTermConfig",
    "RobustTermConfig", "PerceptualTermConfig", "LpipsTermConfig", "LossConfig", "TrainConfig",
    "EvalConfig", "ExperimentConfig",
]
