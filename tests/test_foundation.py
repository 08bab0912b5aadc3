"""The shared foundation: typed configs, launcher environment, feature-shard format."""

from dataclasses import dataclass, field

import numpy as np
import pytest

from preprocess.config import ConfigError, dump_yaml, load_config, parse_overrides
from preprocess.feature_format import FeatureSpec, decode_feature_sample, encode_feature_sample, region_geometry
from preprocess.launch_env import first_host, read_launch_env, read_work_share


@dataclass
class Inner:
    rate: float = 0.15
    names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not 0 <= self.rate <= 1:
            raise ValueError(f"inner.rate must be in [0, 1], got {self.rate}")


@dataclass
class Outer:
    steps: int = 10
    path: str | None = None
    inner: Inner = field(default_factory=Inner)
    stages: list[Inner] = field(default_factory=list)


def test_config_file_and_overrides(tmp_path):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("steps: 5\ninner:\n  rate: 0.5\nstages:\n  - {rate: 0.1}\n")
    cfg = load_config(Outer, cfg_file, ["inner.names=[a, b]", "steps=7", "path=/x"])
    assert cfg.steps == 7 and cfg.path == "/x"
    assert cfg.inner.rate == 0.5 and cfg.inner.names == ["a", "b"]
    assert cfg.stages[0].rate == pytest.approx(0.1)
    assert isinstance(cfg.inner.rate, float)
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    assert load_config(Outer, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inner.rte=0.1"], "unknown key 'inner.rte'"),
        (["steps=ten"], "steps must be int"),
        (["steps=true"], "steps must be int"),
        (["inner.rate=2"], "inner.rate must be in [0, 1]"),
        (["noequals"], "expected key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(Outer, None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_exponent_without_dot_is_a_float():
    # YAML 1.1 reads 1e-4 as a string; a learning rate written that way must still work.
    assert load_config(Inner, None, ["rate=1e-1"]).rate == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="rate must be float"):
        load_config(Inner, None, ["rate=fast"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_launch_env_torchrun_and_slurm():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (
        3, 8, 1, "h1", 1234, "torchrun")
    env = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2",
                           "SLURM_JOB_NODELIST": "gpu[07-09,11]"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (5, 6, 2, "gpu07", "slurm")
    assert read_launch_env({}).world_size == 1


def test_first_host_forms():
    assert first_host("node1") == "node1"
    assert first_host("node[3-5]") == "node3"
    assert first_host("a[1,4],b2") == "a1"
    assert first_host("cpu1,cpu2") == "cpu1"


def test_work_share_precedence_and_errors():
    assert read_work_share({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}).take(list(range(10))) == [2, 6]
    share = read_work_share({"RANK": "1", "WORLD_SIZE": "2", "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert (share.index, share.count, share.source) == (1, 2, "RANK")
    assert read_work_share({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}).source == "SLURM_PROCID"
    with pytest.raises(ValueError, match="outside"):
        read_work_share({"RANK": "2", "WORLD_SIZE": "2"})


def test_geometry_of_non_square_image():
    geom = region_geometry(np.array([[10, 20, 30, 60]]), width=100, height=200)
    np.testing.assert_allclose(geom[0], [0.1, 0.1, 0.3, 0.3, (20 * 40) / (100 * 200)], rtol=1e-6)


@pytest.mark.parametrize("label_format", ["distribution", "topk"])
def test_feature_sample_round_trip(label_format):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(3, 8)).astype(np.float32)
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 15], [1, 2, 3, 4]], dtype=np.float32)
    if label_format == "distribution":
        prob = rng.dirichlet(np.ones(4), size=3).astype(np.float32)
        labels = {"cls_prob": prob}
    else:
        labels = {"labels": np.array([[2, 0], [1, 3], [3, 2]]), "label_scores": np.array([[0.6, 0.2], [0.9, 0.1], [0.5, 0.5]])}
    sample = encode_feature_sample("k1", "a red circle", b'{"url": "x"}', 40, 20, feats, boxes, labels)
    decoded = decode_feature_sample(sample, num_classes=4)
    assert decoded.caption == "a red circle" and decoded.metadata == {"url": "x"}
    assert (decoded.image_width, decoded.image_height) == (40, 20)
    assert decoded.features.dtype == np.float16
    np.testing.assert_allclose(decoded.features, feats, atol=1e-2)
    np.testing.assert_array_equal(decoded.boxes, boxes)
    np.testing.assert_allclose(decoded.geometry[1], [5 / 40, 5 / 20, 20 / 40, 15 / 20, 150 / 800], rtol=1e-6)
    np.testing.assert_allclose(decoded.cls_prob.sum(1), 1.0, atol=2e-3)
    if label_format == "topk":
        assert decoded.cls_prob[0].argmax() == 2 and decoded.cls_prob[1].argmax() == 1


def test_feature_spec_compatibility(tmp_path):
    spec = FeatureSpec(detector="d", weights="random", feature_dim=8, num_classes=4, label_format="topk", topk=2,
                       min_boxes=1, max_boxes=10)
    spec.save(tmp_path)
    assert FeatureSpec.load(tmp_path) == spec
    other = FeatureSpec(detector="d", weights="random", feature_dim=16, num_classes=4, label_format="topk", topk=2,
                        min_boxes=1, max_boxes=10)
    with pytest.raises(ValueError, match="feature_dim: 8 vs 16"):
        spec.check_compatible(other, "release", "shards")
    with pytest.raises(ValueError, match="label_format"):
        FeatureSpec(detector="d", weights="r", feature_dim=1, num_classes=1, label_format="x", topk=0, min_boxes=1, max_boxes=1)
