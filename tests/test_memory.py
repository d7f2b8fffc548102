"""Aligned buffers (shardset.memory) and O_DIRECT block reads (BlockStore.read_block(direct=True))."""

import os
import re

import numpy as np
import pytest

from benchmarks.common import evict_verified
from shardset import BlockStore, CorruptBlockError, FieldSpec, Layout
from shardset.memory import DIRECT_ALIGN, HUGE_PAGE_BYTES, aligned_buffer, direct_nbytes, is_aligned
from shardset import page_cache
from shardset.page_cache import resident_bytes
from shardset.store import _page_cached


def _huge_pages_enabled() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def _anon_huge_kib(buf: np.ndarray) -> int:
    """AnonHugePages of the mapping that holds ``buf`` (from /proc/self/smaps)."""
    addr = buf.ctypes.data
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if head:
                inside = int(head[1], 16) <= addr < int(head[2], 16)
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


@pytest.mark.parametrize("hugepages, align", [(True, HUGE_PAGE_BYTES), (False, DIRECT_ALIGN)])
@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 3 * HUGE_PAGE_BYTES + 5])
def test_aligned_buffer_shape_alignment_and_use(nbytes, hugepages, align):
    buf = aligned_buffer(nbytes, hugepages=hugepages)
    assert buf.dtype == np.uint8 and buf.shape == (nbytes,) and buf.flags.writeable
    assert is_aligned(buf, align)
    buf[:] = 7  # every byte is usable memory
    assert int(buf.sum()) == 7 * nbytes


def test_aligned_buffer_outlives_its_creator():
    view = aligned_buffer(1 << 20)[4096:8192]  # only a view is kept: the mapping must stay alive
    view[:] = np.arange(4096) % 251
    assert np.array_equal(view, np.arange(4096) % 251)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_aligned_buffer_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="nbytes"):
        aligned_buffer(bad)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps") or not _huge_pages_enabled(),
                    reason="needs Linux with transparent huge pages enabled or in madvise mode")
def test_huge_pages_back_the_buffer_when_asked():
    with_huge = aligned_buffer(4 * HUGE_PAGE_BYTES)
    without = aligned_buffer(4 * HUGE_PAGE_BYTES, hugepages=False)
    with_huge[:] = 1
    without[:] = 1
    assert _anon_huge_kib(without) == 0
    # The kernel may lack free 2 MiB pages at the moment; at least one is the norm.
    assert _anon_huge_kib(with_huge) >= HUGE_PAGE_BYTES // 1024


def test_direct_nbytes_rounds_up_to_the_alignment():
    assert [direct_nbytes(n) for n in (0, 1, 4096, 4097)] == [0, 4096, 4096, 8192]


# -- O_DIRECT reads through BlockStore ------------------------------------------------------------


def _store(root, block_rows=1023, rows=2500):
    """Blocks of ``block_rows * 4`` bytes; 1023 rows make the chunk file (with its
    4-byte checksum) exactly 4096 bytes, so a longer file is not caught by a short read."""
    lay = Layout(rows=rows, block_rows=block_rows, fields={"v": FieldSpec("float32", ())})
    bs = BlockStore.create(os.path.join(root, "s.zarr"), lay)
    data = np.arange(rows, dtype=np.float32)
    for b in range(lay.num_blocks):
        lo, hi = lay.block_range(b)
        bs.write_block(b, {"v": data[lo:hi]})
    bs.mark_complete(range(lay.num_blocks))
    return BlockStore.open(bs.where), data


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _direct_buffer(bs, name="v"):
    buf = bs.new_buffer(name)
    assert is_aligned(buf) and buf.nbytes >= direct_nbytes(bs.block_nbytes(name) + 4)
    return buf


def _supports_direct(path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("rows_per_block", [1023, 20000])
def test_direct_reads_give_the_same_blocks(tmp_path, rows_per_block):
    bs, data = _store(tmp_path, rows_per_block, rows=2 * rows_per_block + 77)
    buf = _direct_buffer(bs)
    for b in range(bs.layout.num_blocks):
        _evict(bs.chunk_path("v", b))
        lo, hi = bs.layout.block_range(b)
        assert np.array_equal(bs.read_block("v", b, buf, direct=True), data[lo:hi])  # cold
        assert np.array_equal(bs.read_block("v", b, buf, direct=True), data[lo:hi])  # now maybe cached


def test_a_cold_direct_read_bypasses_the_page_cache(tmp_path):
    bs, data = _store(tmp_path, block_rows=1 << 21, rows=(1 << 21) + 5)  # an 8 MiB chunk
    path = bs.chunk_path("v", 0)
    if not _supports_direct(path) or not hasattr(os, "posix_fadvise"):
        pytest.skip("this file system has no O_DIRECT")
    if evict_verified([path])["resident_bytes_after"]:
        pytest.skip("the kernel kept the file cached")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not _page_cached(fd, os.path.getsize(path))
    finally:
        os.close(fd)
    assert np.array_equal(bs.read_block("v", 0, _direct_buffer(bs), direct=True), data[: 1 << 21])
    assert resident_bytes(path)[0] == 0
    bs.read_block("v", 0, _direct_buffer(bs))
    assert resident_bytes(path)[0] == os.path.getsize(path)  # the ordinary read fills the cache


def test_cold_direct_reads_stay_direct_epoch_after_epoch(tmp_path):
    """Asking whether a chunk is cached caches none of it: a missed ``RWF_NOWAIT`` probe
    starts readahead, and three such probes found a cold chunk "cached" by the fourth
    read, which then went through the page cache."""
    bs, data = _store(tmp_path, block_rows=1 << 21, rows=(1 << 21) + 5)
    path = bs.chunk_path("v", 0)
    if not _supports_direct(path) or not hasattr(os, "posix_fadvise"):
        pytest.skip("this file system has no O_DIRECT")
    if evict_verified([path])["resident_bytes_after"]:
        pytest.skip("the kernel kept the file cached")
    for _ in range(6):
        assert np.array_equal(bs.read_block("v", 0, _direct_buffer(bs), direct=True), data[: 1 << 21])
        assert bs.read_rows("v", 5, 1 << 20, direct=True)[0] == data[5]
    assert resident_bytes(path)[0] == 0


def test_cachestat_and_mincore_count_the_same_pages(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    if evict_verified([path])["resident_bytes_after"]:
        pytest.skip("the kernel kept the file cached")
    fd = os.open(path, os.O_RDONLY)
    try:
        if page_cache._cachestat(fd, 0, 4096) is None:
            pytest.skip("no cachestat(2) here (Linux < 6.5)")
        os.pread(fd, 100_000, 1 << 20)  # some pages in the middle (and what the kernel reads ahead)
        ranges = [(0, 3 << 20), (0, 1 << 20), ((1 << 20) + 5, 200_000), ((3 << 20) - 10, 1 << 20), (7, 1)]
        fast = [page_cache.cached_pages(fd, a, n) for a, n in ranges]
        monkeypatch.setattr(page_cache, "_has_cachestat", False)
        assert fast == [page_cache.cached_pages(fd, a, n) for a, n in ranges]
        assert fast[0][0] > 0 and fast[1][0] == 0
    finally:
        os.close(fd)


def test_unaligned_or_small_buffers_fall_back_to_the_ordinary_read(tmp_path):
    bs, data = _store(tmp_path)
    n = bs.block_nbytes("v") + 4
    for buf in (aligned_buffer(n + DIRECT_ALIGN + 1)[1:], np.empty(n, np.uint8)):
        _evict(bs.chunk_path("v", 0))
        assert np.array_equal(bs.read_block("v", 0, buf, direct=True), data[:1023])


def test_tmpfs_falls_back_to_the_ordinary_read():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as root:
        bs, data = _store(root)
        assert np.array_equal(bs.read_block("v", 2, _direct_buffer(bs), direct=True), data[2046:])


def _expect_same_error(bs, block, match):
    for direct in (False, True):
        if os.path.isfile(bs.chunk_path("v", block)):
            _evict(bs.chunk_path("v", block))  # cold, so the direct path is taken
        with pytest.raises(CorruptBlockError, match=match):
            bs.read_block("v", block, _direct_buffer(bs), direct=direct)


def test_missing_chunk_is_corrupt_with_direct_too(tmp_path):
    bs, _ = _store(tmp_path)
    os.remove(bs.chunk_path("v", 1))
    _expect_same_error(bs, 1, "block 1 of field 'v' .* is missing")


@pytest.mark.parametrize("change", [-1, 1, 4096, -4096])
def test_wrong_size_is_corrupt_with_direct_too(tmp_path, change):
    bs, _ = _store(tmp_path)  # chunk files of exactly 4096 bytes
    path = bs.chunk_path("v", 0)
    with open(path, "r+b") as f:
        f.truncate(4096 + change)
    _expect_same_error(bs, 0, rf"has {4096 + change} bytes, expected 4096")


def test_bad_checksum_is_corrupt_with_direct_too(tmp_path):
    bs, _ = _store(tmp_path)
    path = bs.chunk_path("v", 0)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    _expect_same_error(bs, 0, "fails its crc32c checksum")


def test_a_directory_in_place_of_the_chunk_is_corrupt_with_direct_too(tmp_path):
    bs, _ = _store(tmp_path)
    path = bs.chunk_path("v", 0)
    os.remove(path)
    os.mkdir(path)
    for direct in (False, True):
        with pytest.raises(CorruptBlockError, match="cannot be read"):
            bs.read_block("v", 0, _direct_buffer(bs), direct=direct)
