"""Bad inputs refused up front, in one line naming the field: config, tokenizer, prefix, memory, disk."""

from __future__ import annotations

import json
import re
import shutil
import time
from types import SimpleNamespace

import pytest

from engram_export.core.errors import EngramError
from engram_export.core.resources import require_disk, require_memory
from engram_export.models.config import PRESET_DIR, EngramConfig, load_config, preset_names
from engram_export.models.hashing import EngramHashing
from engram_export.models.weights import build_layer, layer_prefix

TINY = load_config("tiny").to_dict()


def tiny(**changes) -> dict:
    return {**TINY, **changes}


@pytest.mark.parametrize(
    "changes,field",
    [
        # a wrong type, a bool where an int belongs, zero, negative, absurd
        *[({"max_ngram_size": v}, "max_ngram_size") for v in (True, 1, 9, "3", 3.0, None)],
        ({"max_ngram_size": 4}, "engram_vocab_size"),  # 3 orders, 2 entries
        *[
            ({"engram_vocab_size": v}, "engram_vocab_size")
            for v in ([True, 1499], [997, 1], [997, 2**31], [997, "1499"], [997, 1499.0], [], 997, None)
        ],
        *[({"n_head_per_ngram": v}, "n_head_per_ngram") for v in (0, -1, 65, False)],
        *[({"n_embed_per_ngram": v}, "n_embed_per_ngram") for v in (0, 30, 2**17, True)],
        *[({"kernel_size": v}, "kernel_size") for v in (0, -4, 65, True)],
        *[({"hidden_size": v}, "hidden_size") for v in (0, -48, 2**17, 48.0)],
        *[({"hc_mult": v}, "hc_mult") for v in (0, 65, True)],
        *[({"vocab_size": v}, "vocab_size") for v in (0, -1, 2**24 + 1, 10**30, True)],
        *[({"pad_id": v}, "pad_id") for v in (-1, 5000, True, "2")],  # 5000 == vocab_size
        *[({"seed": v}, "seed") for v in (-1, 2**63, 10**100, True, 1.5)],
        *[({"layer_ids": v}, "layer_ids") for v in ([], [1, 1], [-1], [10000], [True, 3], [1, 3.0], "1")],
        ({"tokenizer": 5}, "tokenizer"),
        # more than 2**31 table rows (n_head_per_ngram x sum(engram_vocab_size))
        ({"engram_vocab_size": [2**30, 2**30]}, "engram_vocab_size"),
        # 100 layers x 7 orders x 64 heads: 44800 primes to find, tens of seconds
        (
            {
                "layer_ids": list(range(100)),
                "max_ngram_size": 8,
                "engram_vocab_size": [997] * 7,
                "n_head_per_ngram": 64,
                "n_embed_per_ngram": 64,
            },
            "layer_ids",
        ),
    ],
)
def test_bad_field_is_refused_naming_it(changes, field):
    with pytest.raises(EngramError, match=re.escape(field)) as info:
        EngramConfig.from_dict(tiny(**changes))
    assert str(info.value).startswith("config: ") and "\n" not in str(info.value)


def test_bad_field_in_a_file_and_through_replace(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny(hc_mult=True)))
    with pytest.raises(EngramError, match="hc_mult"):
        load_config(path)
    with pytest.raises(EngramError, match="seed"):
        load_config("tiny").replace(seed=-1)


@pytest.mark.parametrize("name", preset_names())
def test_presets_load(name):
    config = load_config(name)
    if name in ("deepseek-v41", "v41-tiny"):  # DeepSeek-V4.1: its own config class
        assert config.model_type == "deepseek_v41"
        assert config.num_heads == {"deepseek-v41": 24, "v41-tiny": 4}[name]
    else:
        assert config.num_heads == 2 * config.n_head_per_ngram


@pytest.mark.parametrize("name", preset_names())
def test_both_families_name_the_same_things_alike(name):
    """Code shared by the families reads one attribute (the demo's names), whichever family it holds."""
    config = load_config(name)
    assert config.num_heads == (config.max_ngram_size - 1) * config.n_head_per_ngram
    assert config.engram_hidden_size == config.num_heads * config.head_dim
    assert 0 <= config.pad_id < config.vocab_size  # raw ids: the backbone's vocabulary
    if name == "deepseek-v41":  # read from the checkpoint's own keys, written back as they were
        assert (config.pad_id, config.n_head_per_ngram, config.vocab_size, config.engram_vocab_size) == (
            2,
            8,
            129280,
            16_000_000,
        )
        assert {**json.loads((PRESET_DIR / f"{name}.json").read_text()), "tokenizer": None} == config.to_dict()


@pytest.mark.parametrize("key,name", [("pad_token_id", "pad_id"), ("engram_n_heads", "n_head_per_ngram")])
def test_a_checkpoint_name_in_a_demo_config_is_refused_naming_ours(key, name):
    with pytest.raises(EngramError, match=f"^config: {key} is called {name} ") as info:
        EngramConfig.from_dict({**TINY, key: TINY[name]})
    assert "\n" not in str(info.value)


def test_bounds_admit_real_models():
    """DeepSeek-V4.1's dimensions and every field at its bound are accepted."""
    EngramConfig.from_dict(
        tiny(
            max_ngram_size=4,
            engram_vocab_size=[16_000_000] * 3,
            n_head_per_ngram=8,
            n_embed_per_ngram=2048,
            hidden_size=5120,
            vocab_size=129280,
            layer_ids=[1, 14],
        )
    )
    EngramConfig.from_dict(
        tiny(
            max_ngram_size=8,
            engram_vocab_size=[2] * 7,
            n_head_per_ngram=64,
            n_embed_per_ngram=2**16,
            kernel_size=64,
            hidden_size=2**16,
            hc_mult=64,
            vocab_size=2**24,
            pad_id=2**24 - 1,
            seed=2**63 - 1,
            layer_ids=[0, 9999],
        )
    )


def test_exact_table_rows_are_checked_when_hashing():
    """2**31 - 1 is prime: layer 1's table fits exactly, layer 3's next prime does not."""
    config = EngramConfig.from_dict(
        tiny(max_ngram_size=2, engram_vocab_size=[2**31 - 1], n_head_per_ngram=1, n_embed_per_ngram=8)
    )
    with pytest.raises(EngramError, match="layer 3's table would have 2147483659 rows"):
        EngramHashing(config).primes(1)


# tokenizer: checked when the config is read, without building the compression table --------------
@pytest.fixture
def no_compression_table(monkeypatch):
    from engram_export.models import compression

    monkeypatch.setattr(compression, "build_compression_table", lambda path: pytest.fail("built"))


def _config_file(tmp_path, **changes):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny(vocab_size=30522, **changes)))
    return path


def test_tokenizer_is_read_with_the_config(tmp_path, tokenizer_json, no_compression_table):
    shutil.copy(tokenizer_json, tmp_path / "tokenizer.json")
    config = load_config(_config_file(tmp_path, tokenizer=".", pad_id=30521))  # relative to the file
    assert config.tokenizer == str(tmp_path / ".")
    with pytest.raises(EngramError, match=r"pad_id 30522 is outside the tokenizer's 30522 ids"):
        load_config(_config_file(tmp_path, tokenizer="tokenizer.json", pad_id=30522))


def test_missing_or_corrupt_tokenizer_is_refused_with_the_config(tmp_path):
    with pytest.raises(EngramError, match="tokenizer: .* does not exist"):
        load_config(_config_file(tmp_path, tokenizer="missing.json", pad_id=0))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EngramError, match="tokenizer: cannot read"):
        load_config(_config_file(tmp_path, tokenizer="bad.json", pad_id=0))


# --prefix ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prefix,expected",
    [
        ("", ""),
        ("engram.", "engram."),
        ("model.layers.{layer}.engram.", "model.layers.3.engram."),
        ("l{layer:02d}.", "l03."),
        ("a{{b}}.", "a{b}."),
    ],
)
def test_layer_prefix(prefix, expected):
    assert layer_prefix(prefix, 3) == expected


@pytest.mark.parametrize(
    "prefix", ["{lyr}.", "{", "}", "a{layer", "{}", "{0}", "{layer.x}", "{layer[0]}", "{layer:zz}", "{layer}{lyr}"]
)
def test_unknown_prefix_placeholder_is_refused(prefix, tmp_path):
    with pytest.raises(EngramError, match=r"--prefix .*only placeholder allowed is \{layer\}"):
        layer_prefix(prefix, 3)
    with pytest.raises(EngramError, match="--prefix"):  # before the checkpoint is even opened
        build_layer(load_config("tiny"), 3, weights=tmp_path / "missing.pt", prefix=prefix)


# random-init seed, memory, disk --------------------------------------------------------------------
@pytest.mark.parametrize("seed", [-1, 2**63, True, 1.5, "0"])
def test_bad_random_seed_is_refused(seed):
    with pytest.raises(EngramError, match="weights: the random-init seed"):
        build_layer(load_config("tiny"), 1, seed=seed)


def test_table_larger_than_memory_is_refused_at_once():
    """About 2e9 rows x 1280 f32: 9.5 TiB, refused before a byte is allocated."""
    config = load_config("tiny").replace(
        engram_vocab_size=(500_000_000, 500_000_000), n_head_per_ngram=2, n_embed_per_ngram=2560
    )
    start = time.perf_counter()
    with pytest.raises(EngramError) as info:
        build_layer(config, 1, seed=0)
    assert time.perf_counter() - start < 5
    match = re.fullmatch(
        r"weights: random f32 weights of layer 1 \(table (\d+) rows x 1280\) would need "
        r"([\d.]+) GiB of memory, [\d.]+ GiB available",
        str(info.value),
    )
    assert match, str(info.value)
    assert float(match[2]) + 0.1 >= int(match[1]) * 1280 * 4 / 2**30 > 9000  # table alone


def test_require_memory_and_disk(tmp_path):
    require_memory(1, "x")
    require_disk(tmp_path / "not" / "yet", 1, "x")
    huge = r"would need 1073741824\.0 GiB of"
    with pytest.raises(EngramError, match=rf"^x {huge} memory, [\d.]+ GiB available$"):
        require_memory(2**60, "x")
    with pytest.raises(EngramError, match=rf"^y {huge} disk in {re.escape(str(tmp_path))}, [\d.]+ .iB free$"):
        require_disk(tmp_path / "not" / "yet", 2**60, "y")


def test_export_refuses_a_full_disk_before_tracing(tiny_layer, tmp_path, monkeypatch):
    from engram_export.core import resources
    from engram_export.onnx import export

    monkeypatch.setattr(resources.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    monkeypatch.setattr(export, "trace", lambda layer: pytest.fail("traced"))
    with pytest.raises(EngramError, match=r"^export: the ONNX file of layer 3 would need [\d.]+ MiB of disk"):
        export.export_layer(tiny_layer, tmp_path / "layer.onnx")
