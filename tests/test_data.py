"""TextDataModule end to end, offline: synthetic and local-file sources, tokenizer cache, split, batching."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mhaplug import data as data_module
from mhaplug.collate import PackCollator, PadCollator
from mhaplug.data import TextDataModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def synthetic(tmp_path: Path, **kwargs: object) -> TextDataModule:
    settings = {"source": "synthetic", "cache_dir": str(tmp_path), "vocab_size": 300, "max_length": 32, "batch_size": 8,
                "synthetic_documents": 200}
    module = TextDataModule(**{**settings, **kwargs})  # type: ignore[arg-type]
    module.prepare_data()
    module.setup("fit")
    return module


def one_epoch(loader: torch.utils.data.DataLoader) -> list[dict]:
    return list(loader)


def test_synthetic_end_to_end(tmp_path: Path) -> None:
    module = synthetic(tmp_path)
    assert module.stats["documents"] == 200 and module.stats["empty_documents_dropped"] == 0
    assert len(module.splits["train"]) + len(module.splits["val"]) >= 200  # long documents may become 2 chunks
    batches = one_epoch(module.train_dataloader())
    ids = [i for b in batches for row, real in zip(b["input_ids"], ~b["key_padding_mask"]) for i in row[real].tolist()]
    assert sum(b["lengths"].sum().item() for b in batches) == module.stats["train_tokens"] == len(ids)
    assert max(ids) < module.vocab_size and min(ids) >= 0
    assert all(b["input_ids"].shape[1] <= 32 for b in batches)
    # Every document ends with EOS (id 1) and the tokenizer round-trips the text.
    first = module.splits["train"][0]["input_ids"]
    assert module.tokenizer is not None and module.tokenizer.id_to_token(1) == "<|endoftext|>"
    assert module.tokenizer.id_to_token(0) == "<|pad|>"
    text = module.tokenizer.decode(first[:-1]) if first[-1] == 1 else None
    assert text is None or text in data_module.synthetic_texts(200, seed=0)


def test_tokenizer_and_tokens_are_cached_and_the_split_is_deterministic(tmp_path: Path) -> None:
    first = synthetic(tmp_path)
    tokenizers = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(tokenizers) == 1
    stamp = tokenizers[0].stat().st_mtime_ns
    second = synthetic(tmp_path)
    assert tokenizers[0].stat().st_mtime_ns == stamp  # loaded, not retrained
    assert second.splits["val"]["input_ids"] == first.splits["val"]["input_ids"]
    assert len(list((tmp_path / "tokenised").glob("*.arrow"))) == 2  # train and val, reused
    other_seed = synthetic(tmp_path, seed=1)
    assert other_seed.splits["val"]["input_ids"] != first.splits["val"]["input_ids"]


@pytest.mark.parametrize(("layout", "batching", "limit"), [("padded", "length_grouped", 0.10), ("padded", "token_budget", 0.10), ("packed", "random", 0.02)])
def test_batching_cuts_padding(tmp_path: Path, layout: str, batching: str, limit: float) -> None:
    baseline = one_epoch(synthetic(tmp_path).train_dataloader())
    module = synthetic(tmp_path, layout=layout, batching=batching, max_tokens=8 * 32)
    batches = one_epoch(module.train_dataloader())

    def pad(bs: list[dict]) -> float:
        return 1 - sum(b["lengths"].sum().item() for b in bs) / sum(b["input_ids"].numel() for b in bs)

    assert pad(baseline) > 0.2
    assert pad(batches) < limit
    assert sum(b["lengths"].sum().item() for b in batches) == module.stats["train_tokens"]  # no token lost
    assert isinstance(module.collator(), PackCollator if layout == "packed" else PadCollator)
    if batching == "token_budget":
        assert all(b["input_ids"].numel() <= 8 * 32 for b in batches)
    if layout == "packed":
        assert all((b["document_ids"] >= 0).sum() == b["lengths"].sum() for b in batches)


def test_text_files_txt_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "corpus.txt"
    txt.write_text("the first line of text\n\n   \nthe second line\n" * 10)
    module = TextDataModule(source="text_files", path=str(txt), cache_dir=str(tmp_path / "c"), vocab_size=300, max_length=16, val_fraction=0.1)
    module.setup("fit")
    assert module.stats == {"documents": 20, "empty_documents_dropped": 20, "train_tokens": module.stats["train_tokens"], "val_tokens": module.stats["val_tokens"]}
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"content": f"document number {i} says hello", "id": i}) for i in range(30)))
    module = TextDataModule(source="text_files", path=str(jsonl), text_column="content", cache_dir=str(tmp_path / "c"), vocab_size=300)
    module.setup("fit")
    assert module.stats["documents"] == 30
    with pytest.raises(ValueError, match=r"text_column='body' is not in the data; its columns are \['content', 'id'\]"):
        TextDataModule(source="text_files", path=str(jsonl), text_column="body", cache_dir=str(tmp_path / "c")).setup("fit")


def test_hf_source_loads_a_local_directory_and_explains_a_missing_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "local_dataset"
    directory.mkdir()
    (directory / "train.jsonl").write_text("\n".join(json.dumps({"text": f"row {i} of a local dataset"}) for i in range(20)))
    module = TextDataModule(source="hf", path=str(directory), cache_dir=str(tmp_path / "c"), vocab_size=300)
    module.setup("fit")
    assert module.stats["documents"] == 20
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"could not load the Hugging Face dataset path='no-such-user/no-such-dataset'.*offline mode is on"):
        TextDataModule(source="hf", path="no-such-user/no-such-dataset", cache_dir=str(tmp_path / "c")).setup("fit")


def test_bad_settings_name_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout must be one of padded, packed; got 'ragged'"):
        TextDataModule(layout="ragged")
    with pytest.raises(ValueError, match="batching='token_budget' needs max_tokens"):
        TextDataModule(batching="token_budget")
    with pytest.raises(ValueError, match="source='text_files' needs path="):
        TextDataModule(source="text_files")
    with pytest.raises(ValueError, match=r"data path '.*corpus.csv': unsupported extension '.csv'"):
        TextDataModule(source="text_files", path=str(tmp_path / "corpus.csv"), cache_dir=str(tmp_path)).setup("fit")


def test_sampler_state_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    module = synthetic(tmp_path)
    iterator = iter(module.train_dataloader())
    seen = [next(iterator)["input_ids"] for _ in range(3)]
    state = module.state_dict()
    rest = [b["input_ids"] for b in iterator]
    resumed = synthetic(tmp_path)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    again = [b["input_ids"] for b in resumed.train_dataloader()]
    assert len(seen) == 3 and len(again) == len(rest)
    assert all(torch.equal(a, b) for a, b in zip(again, rest))


@pytest.mark.parametrize("name", ["stdlib_docs", "synthetic", "text_files", "hf"])
def test_data_configs_instantiate_the_datamodule(name: str) -> None:
    with initialize_config_dir(config_dir=str(CONFIGS / "data"), version_base="1.3"):
        cfg = compose(config_name=name, overrides=["+path=x.txt"] if name in ("text_files", "hf") else [])
    if name in ("text_files", "hf"):
        cfg.path = "x.txt"
    module = instantiate(cfg)
    assert isinstance(module, TextDataModule)
    assert module.hparams.source == name and module.hparams.layout == "packed" and module.hparams.batch_size == cfg.batch_size


@pytest.mark.slow
def test_stdlib_docs_source(tmp_path: Path) -> None:
    docs = data_module.stdlib_docstrings(cache_dir=tmp_path)
    assert len(docs) > 5000
    assert any(d.startswith("Remove any common leading whitespace from every line in `text`.") for d in docs)  # textwrap.dedent
    assert data_module.stdlib_docstrings(cache_dir=tmp_path) == docs  # from the cache, same order


def test_public_names_are_importable_from_mhaplug() -> None:
    import mhaplug

    assert mhaplug.TextDataModule is TextDataModule
    from mhaplug.lit import LitDecoderLM
    from mhaplug.model import DecoderLM

    assert mhaplug.LitDecoderLM is LitDecoderLM and mhaplug.DecoderLM is DecoderLM
    assert mhaplug.PadCollator is PadCollator and mhaplug.PackCollator is PackCollator
