"""DLRM and the servable CTRModel: preset shapes, interaction, outputs, fallback counts, TorchScript."""

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export.graphs import ONNX_OPSET, export_onnx
from export.onnx_runtime import cpu_session
from models.dlrm import DLRM, PRESETS, CTRModel, DLRMConfig, DotInteraction, build_embedding
from models.embeddings import EmbeddingConfig, FullEmbedding, SharedMemoryEmbedding
from models.hashtable import build_table
from models.linear import LinearConfig, LogisticRegression, reference_embedding
from models.schema import CRITEO_CATEGORICAL, CRITEO_DENSE, FeatureSchema


def linear_shapes(seq: nn.Sequential) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in seq if isinstance(m, nn.Linear)]


def layer_kinds(seq: nn.Sequential) -> list[str]:
    return [type(m).__name__ for m in seq]


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def hash_model(preset: str, num_dense: int, num_fields: int, kind: str = "hash") -> CTRModel:
    cfg = DLRMConfig.from_preset(preset, num_dense, num_fields)
    emb_cfg = EmbeddingConfig(kind=kind, embedding_dim=cfg.embedding_dim, compression=2, seed=0)
    return CTRModel(DLRM(cfg, build_embedding(emb_cfg, num_fields, 100 * num_fields * cfg.embedding_dim * 4)))


def batch(num_dense: int, num_fields: int, rows: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    dense = torch.from_numpy(np.log1p(rng.exponential(10.0, size=(rows, num_dense))).astype(np.float32))
    keys = torch.from_numpy(rng.integers(0, 2**62, size=(rows, num_fields), dtype=np.int64))
    return dense, keys


class TestPresets:
    def test_preset_table(self) -> None:
        assert PRESETS == {
            "tiny": {"embedding_dim": 4, "bottom": [8], "top": [8]},
            "small": {"embedding_dim": 16, "bottom": [64, 32], "top": [64, 32]},
            "criteo-kaggle": {"embedding_dim": 16, "bottom": [512, 256, 64], "top": [512, 256]},
        }

    def test_criteo_kaggle(self) -> None:
        dlrm = hash_model("criteo-kaggle", 13, 26).dlrm
        # 13-512-256-64-16 bottom, (27 * 26 / 2 = 351 pairs + 16) -> 512-256-1 top, as the authors used.
        assert linear_shapes(dlrm.bottom) == [(13, 512), (512, 256), (256, 64), (64, 16)]
        assert layer_kinds(dlrm.bottom) == ["Linear", "ReLU"] * 4
        assert linear_shapes(dlrm.top) == [(367, 512), (512, 256), (256, 1)]
        assert layer_kinds(dlrm.top) == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]  # logit: no activation
        assert num_params(dlrm.bottom) + num_params(dlrm.top) == 475_985

    def test_small(self) -> None:
        dlrm = hash_model("small", 13, 26).dlrm
        assert linear_shapes(dlrm.bottom) == [(13, 64), (64, 32), (32, 16)]
        assert linear_shapes(dlrm.top) == [(351 + 16, 64), (64, 32), (32, 1)]

    def test_tiny(self) -> None:
        dlrm = hash_model("tiny", 2, 3).dlrm
        assert linear_shapes(dlrm.bottom) == [(2, 8), (8, 4)]
        assert linear_shapes(dlrm.top) == [(6 + 4, 8), (8, 1)]  # 4 vectors -> 6 pairs, plus the bottom output
        assert num_params(dlrm.bottom) + num_params(dlrm.top) == (2 * 8 + 8) + (8 * 4 + 4) + (10 * 8 + 8) + (8 + 1)

    def test_no_dense_avazu(self) -> None:
        model = hash_model("small", 0, 22)
        dlrm = model.dlrm
        assert not dlrm.has_dense
        assert len(dlrm.bottom) == 0
        assert linear_shapes(dlrm.top) == [(22 * 21 // 2, 64), (64, 32), (32, 1)]  # pairs of the 22 fields only
        dense, keys = batch(0, 22, rows=4)
        assert dense.shape == (4, 0)
        probability, fallback = model(dense, keys)
        assert probability.shape == (4, 1)
        assert fallback.tolist() == [22] * 4

    def test_embedding_dim_override(self) -> None:
        assert DLRMConfig.from_preset("small", 13, 26, embedding_dim=8).embedding_dim == 8


class TestConfig:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"num_fields": 0}, "num_fields must be >= 1, got 0"),
            ({"num_dense": -1}, "num_dense must be >= 0, got -1"),
            ({"bottom": [8, 0]}, r"layer sizes must be >= 1, got bottom=\[8, 0\] top=\[8\]"),
        ],
    )
    def test_errors(self, kwargs: dict[str, object], message: str) -> None:
        args: dict[str, object] = {"num_dense": 2, "num_fields": 3, "embedding_dim": 4, "bottom": [8], "top": [8]}
        with pytest.raises(ValueError, match=message):
            DLRMConfig(**(args | kwargs))  # type: ignore[arg-type]

    def test_unknown_preset(self) -> None:
        with pytest.raises(
            ValueError, match=r"unknown preset 'huge'; choose from \['criteo-kaggle', 'small', 'tiny'\]"
        ):
            DLRMConfig.from_preset("huge", 13, 26)

    def test_dict_round_trip(self) -> None:
        cfg = DLRMConfig.from_preset("criteo-kaggle", 13, 26)
        assert DLRMConfig.from_dict(cfg.to_dict()) == cfg
        with pytest.raises(ValueError, match=r"unknown model config entries: \['depth'\]"):
            DLRMConfig.from_dict({**cfg.to_dict(), "depth": 3})

    def test_embedding_must_match_the_model(self) -> None:
        cfg = DLRMConfig.from_preset("tiny", 2, 3)  # embedding_dim 4
        wide = build_embedding(EmbeddingConfig(kind="hash", embedding_dim=16, compression=2), 3, 10**5)
        with pytest.raises(ValueError, match="16"):
            DLRM(cfg, wide)
        other_fields = build_embedding(EmbeddingConfig(kind="hash", embedding_dim=4, compression=2), 5, 10**5)
        with pytest.raises(ValueError, match="5"):
            DLRM(cfg, other_fields)


class TestInteraction:
    def test_upper_triangle_values(self) -> None:
        vectors = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [0.0, 3.0], [1.0, 1.0]]])  # (1, 4, 2)
        out = DotInteraction(4)(vectors)
        # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
        assert out.tolist() == [[2.0, 0.0, 1.0, 3.0, 3.0, 3.0]]

    @pytest.mark.parametrize("num_fields", [1, 3, 26])
    def test_output_size_with_dense(self, num_fields: int) -> None:
        # F embeddings + the bottom output: (F + 1) F / 2 pairs.
        out = DotInteraction(num_fields + 1)(torch.ones(2, num_fields + 1, 4))
        assert out.shape == (2, num_fields * (num_fields + 1) // 2)
        assert (out == 4.0).all()

    def test_onnx_gathers_rows_and_matches_eager_bit_for_bit(self, tmp_path: Path) -> None:
        # The exported graph gathers the pairs as rows of the transposed Gram matrix (ONNX Runtime copies
        # a row per pair instead of a float), eager and TorchScript as columns: the same floats either way.
        # Integer-valued vectors make every dot product exact, so the comparison does not hang on
        # ONNX Runtime's MatMul rounding like torch.bmm.
        inter = DotInteraction(27)
        path = tmp_path / "interaction.onnx"
        torch.onnx.export(
            inter,
            (torch.ones(2, 27, 16),),
            str(path),
            input_names=["v"],
            output_names=["pairs"],
            dynamic_axes={"v": {0: "batch"}, "pairs": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
        graph = onnx.load(str(path)).graph
        pair_gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[1] == "flat_index"]
        assert [[(a.name, a.i) for a in n.attribute] for n in pair_gathers] == [[("axis", 0)]]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        scripted = torch.jit.script(inter)
        for batch in (1, 7, 300):
            generator = torch.Generator().manual_seed(batch)
            vectors = torch.randint(-8, 8, (batch, 27, 16), generator=generator).float()
            eager = inter(vectors)
            assert torch.equal(scripted(vectors), eager)
            assert np.array_equal(session.run(None, {"v": vectors.numpy()})[0], eager.numpy())


class TestBatchInvariance:
    """Every exported architecture scores a row to the same float alone or in any batch (ONNX Runtime, the
    server's session options, 1 and 2 threads): the sums over fields are matrix products, not ReduceSum, whose
    vectorized paths (taken at batch 1, and by any row sum over the last axis) add in another order, one that
    follows the row's alignment in memory."""

    @staticmethod
    def model(architecture: str, fields: int, dim: int) -> CTRModel:
        def linear_part() -> LogisticRegression:
            return LogisticRegression(
                LinearConfig(13, fields), build_embedding(reference_embedding(0), fields, 64 * fields * 4)
            )

        if architecture == "lr":
            model = CTRModel(linear_part())
        else:
            cfg = DLRMConfig.from_preset("small", 13, fields, embedding_dim=dim)  # first-order terms
            if architecture == "dlrm-linear":  # what `lma train` builds by default
                cfg = dataclasses.replace(cfg, first_order=False, linear=True)
            emb_cfg = EmbeddingConfig(kind="hash", embedding_dim=dim, compression=2, seed=0)
            emb = build_embedding(emb_cfg, fields, 64 * fields * dim * 4)
            model = CTRModel(DLRM(cfg, emb, linear_part() if cfg.linear else None))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # the linear weights start at zero: give every term a value
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        return model.eval()

    @pytest.mark.parametrize(
        ("architecture", "fields", "dim"),
        [("dlrm-linear", 26, 16), ("dlrm-first-order", 26, 16), ("dlrm-first-order", 5, 3), ("lr", 26, 1)],
    )
    def test_a_row_scores_the_same_alone_and_in_any_batch(
        self, architecture: str, fields: int, dim: int, tmp_path: Path
    ) -> None:
        path = tmp_path / "model.onnx"
        schema = FeatureSchema(CRITEO_DENSE, CRITEO_CATEGORICAL[:fields], 0)
        export_onnx(self.model(architecture, fields, dim), schema, path)
        dense, keys = (t.numpy() for t in batch(13, fields, rows=300, seed=1))
        for threads in (1, 2):
            session = cpu_session(path, threads=threads)
            whole = session.run(None, {"dense": dense, "keys": keys})[0]
            for size in (1, 2, 3, 7, 64):
                for start in range(0, 300 - size, 23):
                    inputs = {"dense": dense[start : start + size], "keys": keys[start : start + size]}
                    np.testing.assert_array_equal(
                        session.run(None, inputs)[0],
                        whole[start : start + size],
                        err_msg=f"{threads} threads, rows {start}..+{size}",
                    )


class TestCTRModel:
    def test_outputs(self) -> None:
        model = hash_model("tiny", 2, 3).eval()
        dense, keys = batch(2, 3, rows=7)
        probability, fallback = model(dense, keys)
        assert probability.shape == (7, 1)
        assert probability.dtype == torch.float32
        assert ((probability > 0) & (probability < 1)).all()
        assert fallback.dtype == torch.int64
        assert fallback.tolist() == [3] * 7  # hash kind: no stored signatures
        logit, stored = model.dlrm(dense, keys)
        assert torch.equal(probability, torch.sigmoid(logit))
        assert stored.shape == (7, 3)

    def test_fallback_tokens_count_keys_without_a_signature(self) -> None:
        model = hash_model("tiny", 2, 3, kind="lma").eval()
        emb = model.dlrm.embedding
        assert isinstance(emb, SharedMemoryEmbedding)
        signed = np.random.default_rng(1).integers(0, 2**62, size=6, dtype=np.int64)
        tk, tv, params, report = build_table(signed, signed % 2**60, emb.signatures.num_buckets, 4, seed=0)
        assert report["dropped"] == 0
        emb.signatures.load(tk, tv, params)
        dense, keys = batch(2, 3, rows=4)
        keys[0] = torch.from_numpy(signed[:3])  # all three signed
        keys[1, 1] = int(signed[3])  # one signed
        keys[2, 0], keys[2, 2] = int(signed[4]), int(signed[5])  # two signed
        _, fallback = model(dense, keys)
        assert fallback.tolist() == [0, 2, 1, 3]

    def test_full_embedding_fallback_is_oov(self) -> None:
        cfg = DLRMConfig.from_preset("tiny", 2, 3)
        emb = FullEmbedding(EmbeddingConfig(kind="full", embedding_dim=4), 3, vocab_size=4, table_buckets=4)
        vocab = np.array([11, 22, 33, 44], dtype=np.int64)
        emb.vocabulary.load(*build_table(vocab, np.arange(4), 4, 4, seed=0)[:3])
        model = CTRModel(DLRM(cfg, emb)).eval()
        dense, _ = batch(2, 3, rows=2)
        _, fallback = model(dense, torch.tensor([[11, 22, 5], [6, 7, 44]]))
        assert fallback.tolist() == [1, 2]

    @pytest.mark.parametrize(("preset", "num_dense", "kind"), [("tiny", 2, "lma"), ("small", 0, "hash")])
    def test_torchscript_matches_eager(self, preset: str, num_dense: int, kind: str) -> None:
        model = hash_model(preset, num_dense, 3, kind=kind).eval()
        scripted = torch.jit.script(model)
        for rows in (1, 6):
            dense, keys = batch(num_dense, 3, rows=rows, seed=rows)
            for a, b in zip(model(dense, keys), scripted(dense, keys), strict=True):
                assert torch.equal(a, b)

    def test_backward_reaches_every_part(self) -> None:
        model = hash_model("tiny", 2, 3)
        dense, keys = batch(2, 3, rows=8)
        probability, _ = model(dense, keys)
        probability.sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, name
        assert model.dlrm.embedding.memory.grad.abs().sum() > 0


def test_cli_preset_names_are_the_presets() -> None:
    from models.dlrm import PRESETS
    from models.names import PRESET_NAMES

    assert sorted(PRESET_NAMES) == sorted(PRESETS)
