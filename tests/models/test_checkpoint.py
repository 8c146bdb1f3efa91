"""Run folders (save_run / load_run) and the honest memory accounting of DESIGN section 4."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import (
    CONFIG_FILE,
    RUN_FORMAT,
    WEIGHTS_FILE,
    RunConfig,
    build_model,
    load_run,
    memory_accounting,
    save_run,
)
from models.dlrm import DLRMConfig
from models.embeddings import EmbeddingConfig, SharedMemoryEmbedding
from models.hashtable import build_table
from models.schema import FeatureSchema, criteo_schema

SCHEMA = FeatureSchema(("I1", "I2"), ("C1", "C2", "C3"), hash_seed=7)
FULL_BYTES = 1000 * 4 * 4  # 1000 distinct tokens x D=4 x 4 bytes
# The tiny preset with 2 dense and 3 fields: bottom 2-8-4, top (6 pairs + 4)-8-1, first-order weights
# (3 fields x D=4) and the dense linear term (2).
DENSE_PARAMS = (2 * 8 + 8) + (8 * 4 + 4) + (10 * 8 + 8) + (8 * 1 + 1) + 3 * 4 + 2


def run_config(kind: str = "lma", **sizes: int) -> RunConfig:
    return RunConfig(
        schema=SCHEMA,
        model=DLRMConfig.from_preset("tiny", 2, 3),
        embedding=EmbeddingConfig(kind=kind, embedding_dim=4, block_size=2, compression=4.0, seed=5),
        full_embedding_bytes=FULL_BYTES,
        distinct_tokens=1000,
        **sizes,  # type: ignore[arg-type]
    )


def trained_lma() -> tuple[torch.nn.Module, RunConfig, np.ndarray]:
    """A tiny LMA model with a filled signature table and weights moved away from their seeded init."""
    cfg = run_config(extra={"seed": 3, "signatures": {"signed_tokens": 6}})
    model = build_model(cfg)
    emb = model.dlrm.embedding
    assert isinstance(emb, SharedMemoryEmbedding)
    signed = np.random.default_rng(0).integers(0, 2**62, size=6, dtype=np.int64)
    tk, tv, params, _ = build_table(signed, signed % 2**60, emb.signatures.num_buckets, 4, seed=9)
    emb.signatures.load(tk, tv, params)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape))
    return model, cfg, signed


def inputs(signed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(1)
    dense = torch.from_numpy(rng.random((5, 2), dtype=np.float32))
    keys = rng.integers(0, 2**62, size=(5, 3), dtype=np.int64)
    keys[0] = signed[:3]
    keys[1, 2] = signed[4]
    return dense, torch.from_numpy(keys)


class TestRunFolder:
    def test_round_trip_exact(self, tmp_path: Path) -> None:
        model, cfg, signed = trained_lma()
        model.eval()
        save_run(tmp_path / "run", model, cfg)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]

        loaded, loaded_cfg = load_run(tmp_path / "run")
        assert not loaded.training
        assert loaded_cfg == cfg
        assert loaded_cfg.extra == {"seed": 3, "signatures": {"signed_tokens": 6}}
        dense, keys = inputs(signed)
        want_p, want_fallback = model(dense, keys)
        got_p, got_fallback = loaded(dense, keys)
        assert torch.equal(got_p, want_p)
        assert got_fallback.tolist() == want_fallback.tolist() == [0, 2, 3, 3, 3]
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
        assert loaded.dlrm.embedding.signatures.params == model.dlrm.embedding.signatures.params

    def test_config_json(self, tmp_path: Path) -> None:
        model, cfg, _ = trained_lma()
        save_run(tmp_path, model, cfg)
        written = json.loads((tmp_path / CONFIG_FILE).read_text())
        assert written["format"] == RUN_FORMAT == "lma-run/1"
        assert written["sizes"] == {"full_embedding_bytes": 16000, "distinct_tokens": 1000, "vocab_size": 0,
                                    "table_buckets": 0}  # fmt: skip
        assert written["schema"] == SCHEMA.to_dict()
        assert written["embedding"]["kind"] == "lma"
        assert written["seed"] == 3  # extra entries at the top level
        assert RunConfig.from_dict(written) == cfg

    def test_full_kind_round_trip(self, tmp_path: Path) -> None:
        cfg = run_config("full", vocab_size=10, table_buckets=8)
        model = build_model(cfg).eval()
        vocab = np.arange(100, 110, dtype=np.int64)
        model.dlrm.embedding.vocabulary.load(*build_table(vocab, np.arange(10), 8, 4, seed=0, max_load=1.0)[:3])
        save_run(tmp_path, model, cfg)
        loaded, _ = load_run(tmp_path)
        dense = torch.ones(2, 2)
        keys = torch.tensor([[100, 101, 5], [6, 7, 8]])
        assert torch.equal(loaded(dense, keys)[0], model(dense, keys)[0])
        assert loaded(dense, keys)[1].tolist() == [1, 3]

    @pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
    def test_missing_file(self, tmp_path: Path, missing: str) -> None:
        model, cfg, _ = trained_lma()
        save_run(tmp_path, model, cfg)
        (tmp_path / missing).unlink()
        with pytest.raises(FileNotFoundError, match=f"is not a run folder: {missing} is missing"):
            load_run(tmp_path)

    @pytest.mark.parametrize(
        ("edit", "message"),
        [
            (lambda d: {**d, "format": "lma-run/0"}, "config format 'lma-run/0' is not 'lma-run/1'"),
            (lambda d: {k: v for k, v in d.items() if k != "format"}, "config format None is not 'lma-run/1'"),
            (lambda d: {k: v for k, v in d.items() if k != "sizes"}, "sizes"),
            (lambda d: {**d, "embedding": {**d["embedding"], "kind": "dense"}}, "kind must be one of"),
            (lambda d: {**d, "model": {**d["model"], "depth": 2}}, "unknown model config entries"),
            (lambda d: [d], "JSON object"),
            # each entry named (they once read as bare Python errors: "'NoneType' object is not iterable")
            (lambda d: {**d, "embedding": None}, "'embedding' must be an object, got NoneType"),
            (lambda d: {**d, "model": {**d["model"], "bottom": "abc"}}, "'model': "),
            (lambda d: {**d, "embedding": {**d["embedding"], "compression": "x"}}, "'embedding': "),
            (lambda d: {**d, "sizes": {"distinct_tokens": 5}}, "'sizes': 'full_embedding_bytes'"),
        ],
    )
    def test_bad_config(self, tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
        model, cfg, _ = trained_lma()
        save_run(tmp_path, model, cfg)
        config = tmp_path / CONFIG_FILE
        config.write_text(json.dumps(edit(json.loads(config.read_text()))))
        with pytest.raises(ValueError, match=message) as err:
            load_run(tmp_path)
        assert str(tmp_path / CONFIG_FILE) in str(err.value)

    def test_config_not_json(self, tmp_path: Path) -> None:
        model, cfg, _ = trained_lma()
        save_run(tmp_path, model, cfg)
        (tmp_path / CONFIG_FILE).write_text("{not json")
        with pytest.raises(ValueError, match=r"config\.json: Expecting property name"):
            load_run(tmp_path)

    def test_corrupt_weights(self, tmp_path: Path) -> None:
        model, cfg, _ = trained_lma()
        save_run(tmp_path, model, cfg)
        weights = tmp_path / WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[:100])
        with pytest.raises(ValueError, match=WEIGHTS_FILE):
            load_run(tmp_path)

    def test_weights_of_another_config(self, tmp_path: Path) -> None:
        model, cfg, _ = trained_lma()
        save_run(tmp_path, model, cfg)
        config = tmp_path / CONFIG_FILE
        edited = json.loads(config.read_text())
        edited["embedding"]["compression"] = 2.0  # a larger shared memory than the weights hold
        config.write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=WEIGHTS_FILE):
            load_run(tmp_path)


class TestMemoryAccounting:
    def test_lma(self) -> None:
        acc = memory_accounting(build_model(run_config()), FULL_BYTES)
        # Budget 16000 / 4 = 4000 bytes: 828 floats of M, 8 buckets x 4 slots x 16 B + 48 B of table seeds,
        # 8 * (2 * 3 + T=2 * (2 + 3)) = 128 B of graph seeds (fallback signature hashes, block masks and hashes).
        assert acc == {
            "kind": "lma",
            "full_embedding_bytes": 16000,
            "embedding_bytes": 4000,
            "embedding_parts": {"shared_memory": 3312, "signature_table": 560, "seeds": 128},
            "dense_bytes": DENSE_PARAMS * 4,
            "total_bytes": 4000 + 684,
            "embedding_compression": 4.0,
            "model_compression": (16000 + 684) / (4000 + 684),
        }
        assert DENSE_PARAMS == 171

    def test_hash(self) -> None:
        acc = memory_accounting(build_model(run_config("hash")), FULL_BYTES)
        assert acc["embedding_parts"] == {"shared_memory": 968 * 4, "signature_table": 0, "seeds": 128}
        assert acc["embedding_bytes"] == 4000
        assert acc["dense_bytes"] == 684

    def test_full(self) -> None:
        acc = memory_accounting(build_model(run_config("full", vocab_size=10, table_buckets=8)), FULL_BYTES)
        assert acc == {
            "kind": "full",
            "full_embedding_bytes": 16000,
            "embedding_bytes": 208 + 560,
            "embedding_parts": {"table": (10 + 3) * 4 * 4, "vocabulary_index": 8 * 4 * 16 + 48},
            "dense_bytes": 684,
            "total_bytes": 768 + 684,
            "embedding_compression": 16000 / 768,
            "model_compression": (16000 + 684) / (768 + 684),
        }

    def test_sixteen_x_is_sixteen_x(self) -> None:
        # Criteo-Kaggle shapes at 1/100 of its 33.8M tokens: the 16x config is 16x, signature table included.
        full = 337_626 * 16 * 4
        cfg = RunConfig(
            schema=criteo_schema(),
            model=DLRMConfig.from_preset("criteo-kaggle", 13, 26),
            embedding=EmbeddingConfig(kind="lma", embedding_dim=16, compression=16),
            full_embedding_bytes=full,
            distinct_tokens=337_626,
        )
        acc = memory_accounting(build_model(cfg), full)
        parts = acc["embedding_parts"]
        assert parts["signature_table"] == 2**12 * 4 * 16 + 48  # the largest table within a quarter
        assert parts["signature_table"] <= full / 16 / 4
        assert 0 <= full / 16 - acc["embedding_bytes"] < 4
        assert 16.0 <= acc["embedding_compression"] < 16.0001
        assert acc["dense_bytes"] == (475_985 + 26 * 16 + 13) * 4  # MLPs + first-order weights + dense linear


def test_criteo_kaggle_on_paper() -> None:
    """The 16x config of docs/SCALE.md: sizes from the formulas, without allocating the 101 MB memory."""
    from models.embeddings import SharedMemoryLayout
    from models.scale import CRITEO_CARDINALITIES, criteo_kaggle_config, paper_numbers

    assert sum(CRITEO_CARDINALITIES) == 33_762_577
    assert len(CRITEO_CARDINALITIES) == 26
    cfg = criteo_kaggle_config()
    assert cfg.full_embedding_bytes == 2_160_804_928
    paper = paper_numbers(cfg)
    assert paper == {
        "full_embedding_bytes": 2_160_804_928,
        "budget_bytes": 135_050_308.0,
        "signature_share_bytes": 33_762_577.0,
        "table_buckets": 2**19,
        "table_capacity": 1_887_436,
        "table_bytes": 2**19 * 4 * 16 + 48,
        "seed_bytes": 128,
        "memory_floats": 25_373_925,
    }
    layout = SharedMemoryLayout.plan(cfg.embedding, cfg.full_embedding_bytes)
    assert (layout.memory_size, layout.table_buckets) == (paper["memory_floats"], paper["table_buckets"])
    assert 25_373_925 * 4 + 33_554_480 + 128 == 135_050_308  # exactly 16x, signature table included


def test_run_folders_from_before_the_first_order_terms_still_load(tmp_path: Path) -> None:
    """A config.json without ``architecture``, ``first_order`` or ``embedding_init`` is the plain DLRM it was."""
    cfg = run_config()
    cfg.model = DLRMConfig(num_dense=2, num_fields=3, embedding_dim=4, bottom=[8], top=[8])  # the old defaults
    save_run(tmp_path, build_model(cfg), cfg)
    raw = json.loads((tmp_path / CONFIG_FILE).read_text())
    for key in ("architecture", "first_order", "embedding_init"):
        raw["model"].pop(key)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))
    model, loaded = load_run(tmp_path)
    assert loaded.model == cfg.model and not loaded.model.first_order
    assert not any("first_order" in k or "dense_linear" in k for k in model.state_dict())


def test_linear_reference_round_trips(tmp_path: Path) -> None:
    from models.linear import LinearConfig

    cfg = RunConfig(
        schema=SCHEMA,
        model=LinearConfig(2, 3),
        embedding=EmbeddingConfig(kind="hash", embedding_dim=1, compression=1.0, seed=5),
        full_embedding_bytes=1000 * 4,
        distinct_tokens=1000,
    )
    model = build_model(cfg)
    assert all(not p.detach().any() for p in model.parameters())  # a logistic regression starts at zero
    with torch.no_grad():
        model.dlrm.embedding.memory.add_(torch.linspace(-1, 1, model.dlrm.embedding.memory.numel()))
    save_run(tmp_path, model, cfg)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["model"] == {
        "architecture": "lr", "num_dense": 2, "num_fields": 3,
    }  # fmt: skip
    loaded, lcfg = load_run(tmp_path)
    assert lcfg.model == cfg.model
    dense, keys = torch.rand(4, 2), torch.arange(12).reshape(4, 3)
    assert torch.equal(loaded(dense, keys)[0], model.eval()(dense, keys)[0])
    acc = memory_accounting(loaded, 4000)
    assert acc["dense_bytes"] == (2 + 1) * 4  # the dense weights and the bias
    raw = json.loads((tmp_path / CONFIG_FILE).read_text())
    raw["model"]["architecture"] = "fm"
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unknown model architecture 'fm'"):
        load_run(tmp_path)
