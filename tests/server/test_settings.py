"""Settings come from LMA_* variables and refuse bad values with messages that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import Settings, load_settings


def test_environment_is_read_with_the_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMA_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("LMA_RUNTIME", "TorchScript")
    monkeypatch.setenv("LMA_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("LMA_ADMIN_TOKEN", "")
    s = load_settings(max_wait_ms=0.5)
    assert (s.model_dir, s.runtime, s.max_batch_size, s.max_wait_ms) == (tmp_path, "torchscript", 64, 0.5)
    assert s.admin_token is None and not s.admin_enabled and s.redis_url == ""


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LMA_MAX_BATCH_SIZE": "0"}, "LMA_MAX_BATCH_SIZE: Input should be greater than or equal to 1 (got '0')"),
        (  # it once ran out of memory 25 s into start-up, warming the runtime at that size
            {"LMA_MAX_BATCH_SIZE": "100000000"},
            "LMA_MAX_BATCH_SIZE: Input should be less than or equal to 65536 (got '100000000')",
        ),
        ({"LMA_RUNTIME": "tensorrt"}, "LMA_RUNTIME: Input should be 'onnx' or 'torchscript' (got 'tensorrt')"),
        ({"LMA_DEVICE": "tpu"}, "LMA_DEVICE: Input should be 'auto', 'cpu' or 'cuda' (got 'tpu')"),
        ({"LMA_MAX_WAIT_MS": "-1"}, "LMA_MAX_WAIT_MS: Input should be greater than or equal to 0 (got '-1')"),
        ({"LMA_REQUEST_TIMEOUT_MS": "0"}, "LMA_REQUEST_TIMEOUT_MS: Input should be greater than 0 (got '0')"),
        ({"LMA_MAX_QUEUE": "many"}, "LMA_MAX_QUEUE: Input should be a valid integer"),
        ({"LMA_REQUEST_TIMEOUT_MS": "inf"}, "LMA_REQUEST_TIMEOUT_MS: Input should be a finite number (got 'inf')"),
        ({"LMA_MAX_WAIT_MS": "nan"}, "LMA_MAX_WAIT_MS: Input should be a finite number (got 'nan')"),
        ({"LMA_GC_THRESHOLD": "-1"}, "LMA_GC_THRESHOLD: Input should be greater than or equal to 0 (got '-1')"),
        ({"LMA_REDIS_URL": "localhost:6379"}, "LMA_REDIS_URL: must start with redis://, rediss:// or unix://"),
        ({"LMA_REDIS_URL": "redis://:bad"}, "LMA_REDIS_URL: Port could not be cast to integer value as 'bad' (the URL"),
        ({"LMA_MODEL_DIR": "/no/such/dir"}, "LMA_MODEL_DIR: /no/such/dir is not a directory"),
        ({"LMA_FEATURE_STORE_PATH": "/no/features.json"}, "LMA_FEATURE_STORE_PATH: /no/features.json is not a file"),
    ],
)
def test_bad_values_name_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    monkeypatch.setenv("LMA_MODEL_DIR", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="invalid server settings") as e:
        load_settings()
    assert message in str(e.value)


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as e:
        load_settings(model_dir=tmp_path, max_queue=0, log_level="loud")
    assert "LMA_MAX_QUEUE" in str(e.value) and "LMA_LOG_LEVEL" in str(e.value)


def test_feature_file_must_be_json_or_csv(tmp_path: Path) -> None:
    f = tmp_path / "features.parquet"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"reads \.json or \.csv files"):
        load_settings(model_dir=tmp_path, feature_store_path=f)


def test_secret_token_is_not_printed(tmp_path: Path) -> None:
    s = Settings(model_dir=tmp_path, admin_token="s3cret-token")
    assert "s3cret-token" not in repr(s) and s.admin_enabled
