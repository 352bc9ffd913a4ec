"""The disk cache: checked up front, entries written atomically, a damaged entry reported and recomputed, keys
from the content of the model's files."""

import os

import pytest

from adaptivedrag_core.cache import FILE_HASHES, CacheWarning, DiskCache
from adaptivedrag_core.errors import InputError
from adaptivedrag_core.models import model_files


def test_a_cache_folder_that_is_a_file_is_refused_up_front(tmp_path):
    (tmp_path / "cache").write_bytes(b"")
    with pytest.raises(InputError, match="is a file, not a folder"):
        DiskCache(tmp_path / "cache").check()
    with pytest.raises(InputError, match="is a file, not a folder"):
        DiskCache(tmp_path / "cache" / "inner").check()


def test_checking_a_new_cache_folder_writes_nothing(tmp_path):
    DiskCache(tmp_path / "a" / "b").check()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="cannot write"):
        DiskCache("/proc/adaptivedrag-cache").check()


def test_a_damaged_entry_is_reported_in_one_line_and_read_as_absent(tmp_path):
    cache = DiskCache(tmp_path)
    cache.save("entry.txt", lambda path: path.write_text("ok"))
    assert cache.load("entry.txt", lambda path: path.read_text()) == "ok"

    def broken(path):
        raise ValueError("truncated\nsecond line")

    with pytest.warns(CacheWarning, match="entry.txt cannot be read \\(truncated\\); computing it again") as seen:
        assert cache.load("entry.txt", broken) is None
    assert "\n" not in str(seen[0].message)
    assert cache.load("absent.txt", broken) is None


def _diffusers_like(folder):
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (folder / part).mkdir(parents=True)
        (folder / part / "weights.bin").write_bytes(part.encode() * 10)
    return folder


def test_fingerprint_follows_the_weights_content_not_the_folder(tmp_path):
    model = _diffusers_like(tmp_path / "model")
    cache = DiskCache(tmp_path / "cache")
    first = cache.fingerprint(model_files(model))
    assert cache.fingerprint(model_files(model)) == first
    folder_times = model.stat()
    weights = model / "unet" / "weights.bin"
    weights.write_bytes(b"other unet" + b"!" * (weights.stat().st_size - 10))  # same size, new content
    os.utime(model, ns=(folder_times.st_atime_ns, folder_times.st_mtime_ns))
    assert cache.fingerprint(model_files(model)) != first


def test_fingerprint_includes_the_tokenizer_and_keeps_a_moved_model(tmp_path):
    model = _diffusers_like(tmp_path / "model")
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "vocab.json").write_text("{}")
    cache = DiskCache(tmp_path / "cache")
    plain = cache.fingerprint(model_files(model))
    assert cache.fingerprint(model_files(model, tokenizer)) != plain
    model.rename(tmp_path / "moved")
    assert cache.fingerprint(model_files(tmp_path / "moved")) == plain


def test_file_hashes_are_remembered_by_size_and_time(tmp_path, monkeypatch):
    from adaptivedrag_core import cache as cache_module

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    cache = DiskCache(tmp_path / "cache")
    first = cache.fingerprint(model_files(weights))
    assert (tmp_path / "cache" / FILE_HASHES).is_file()
    monkeypatch.setattr(cache_module, "file_sha256", lambda path: pytest.fail("hashed again"))
    assert DiskCache(tmp_path / "cache").fingerprint(model_files(weights)) == first


def test_a_damaged_hash_table_is_rebuilt(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    cache = DiskCache(tmp_path / "cache")
    first = cache.fingerprint(model_files(weights))
    (tmp_path / "cache" / FILE_HASHES).write_text('{"broken": ')
    with pytest.warns(CacheWarning):
        assert cache.fingerprint(model_files(weights)) == first
    assert cache.fingerprint(model_files(weights)) == first  # rewritten whole
