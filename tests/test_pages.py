"""PageAllocator unit tests: free list, ref counts, prefix hashes, LRU eviction, integrity checks."""
import pytest

from jaxserve.pages import PageAllocator, hash_page

PS = 4


def fill(alloc: PageAllocator, pages: list[int], tokens: list[int]) -> list[int]:
    """Register `pages` as holding the full pages of `tokens`; returns the hash chain."""
    hashes, parent = [], None
    for i, page in enumerate(pages):
        parent = alloc.register_full_page(page, parent, tokens[i * PS:(i + 1) * PS])
        hashes.append(parent)
    return hashes


def test_allocate_free_ref_counts():
    alloc = PageAllocator(8, PS)
    pages = alloc.allocate(3)
    assert len(set(pages)) == 3 and all(alloc.ref_count(p) == 1 for p in pages)
    assert alloc.num_free_pages == 5 and alloc.usage == pytest.approx(3 / 8)
    alloc.check_integrity()
    alloc.free(pages)
    assert alloc.num_free_pages == 8 and alloc.usage == 0.0
    assert all(alloc.ref_count(p) == 0 for p in pages)
    alloc.check_integrity()


def test_page_zero_is_ordinary():
    alloc = PageAllocator(2, PS)
    assert sorted(alloc.allocate(2)) == [0, 1]


def test_over_allocation_raises_and_double_free_asserts():
    alloc = PageAllocator(2, PS)
    with pytest.raises(RuntimeError):
        alloc.allocate(3)
    pages = alloc.allocate(2)
    alloc.free(pages)
    with pytest.raises(AssertionError):
        alloc.free(pages[:1])


def test_match_prefix_leaves_one_token():
    alloc = PageAllocator(8, PS)
    tokens = list(range(12))  # exactly three full pages
    pages = alloc.allocate(3)
    fill(alloc, pages, tokens)
    assert alloc.match_prefix(tokens) == pages[:2]  # the last page must be recomputed
    assert alloc.match_prefix(tokens + [99]) == pages
    assert alloc.match_prefix(tokens[:5]) == pages[:1]
    assert alloc.match_prefix([1] + tokens[1:]) == []
    assert alloc.match_prefix([]) == []


def test_hash_is_chained_over_parent():
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    assert hash_page(None, b) != hash_page(hash_page(None, a), b)
    alloc = PageAllocator(8, PS)
    fill(alloc, alloc.allocate(2), a + b)
    # The second page's tokens alone (or after another first page) do not match.
    assert alloc.match_prefix(b + [0]) == []
    assert alloc.match_prefix([0, 0, 0, 0] + b + [0]) == []


def test_prefix_hit_acquire_and_evictable():
    alloc = PageAllocator(4, PS)
    tokens = list(range(9))
    pages = alloc.allocate(3)
    fill(alloc, pages[:2], tokens)
    alloc.free(pages)
    # Cached pages stay reusable: counted as free, still matchable.
    assert alloc.num_free_pages == 4 and alloc.num_cached_pages == 2
    hits = alloc.match_prefix(tokens)
    assert hits == pages[:2]
    alloc.acquire(hits)
    assert alloc.num_free_pages == 2 and all(alloc.ref_count(p) == 1 for p in hits)
    alloc.acquire(hits)  # a second sequence shares them
    assert all(alloc.ref_count(p) == 2 for p in hits)
    alloc.check_integrity()
    alloc.free(hits)
    alloc.free(hits)
    assert alloc.num_free_pages == 4
    alloc.check_integrity()


def test_lru_eviction_order():
    alloc = PageAllocator(4, PS)
    old, new = list(range(100, 108)), list(range(200, 208))
    old_pages = alloc.allocate(2)
    fill(alloc, old_pages, old)
    new_pages = alloc.allocate(2)
    fill(alloc, new_pages, new)
    alloc.free(old_pages)  # freed first -> evicted first; within a free, the tail goes first
    alloc.free(new_pages)
    assert alloc.allocate(1) == [old_pages[1]]
    assert alloc.match_prefix(old + [0]) == old_pages[:1]
    assert alloc.allocate(1) == [old_pages[0]]
    assert alloc.match_prefix(old + [0]) == []
    assert alloc.match_prefix(new + [0]) == new_pages
    alloc.check_integrity()


def test_free_pages_preferred_over_eviction():
    alloc = PageAllocator(3, PS)
    page = alloc.allocate(1)
    fill(alloc, page, [1, 2, 3, 4])
    alloc.free(page)
    assert page[0] not in alloc.allocate(2)
    assert alloc.match_prefix([1, 2, 3, 4, 5]) == page


def test_acquire_protects_from_eviction():
    alloc = PageAllocator(2, PS)
    page = alloc.allocate(1)
    fill(alloc, page, [1, 2, 3, 4])
    alloc.free(page)
    alloc.acquire(alloc.match_prefix([1, 2, 3, 4, 5]))
    assert alloc.num_free_pages == 1
    assert alloc.allocate(1) != page
    with pytest.raises(RuntimeError):
        alloc.allocate(1)


def test_duplicate_content_stays_unregistered():
    alloc = PageAllocator(4, PS)
    a, b = alloc.allocate(1), alloc.allocate(1)
    ha = fill(alloc, a, [1, 2, 3, 4])
    hb = fill(alloc, b, [1, 2, 3, 4])
    assert ha == hb and alloc.page_hash(a[0]) == ha[0] and alloc.page_hash(b[0]) is None
    alloc.free(b)  # unregistered: straight back to the free list
    assert alloc.num_cached_pages == 1
    alloc.check_integrity()


def test_disabled_prefix_caching():
    alloc = PageAllocator(4, PS, enable_prefix_caching=False)
    pages = alloc.allocate(2)
    fill(alloc, pages, list(range(8)))
    alloc.free(pages)
    assert alloc.match_prefix(list(range(9))) == [] and alloc.num_cached_pages == 0
    alloc.check_integrity()


def test_reset_prefix_cache():
    alloc = PageAllocator(4, PS)
    pages = alloc.allocate(2)
    fill(alloc, pages, list(range(8)))
    alloc.free(pages[1:])
    alloc.reset_prefix_cache()  # only the unreferenced page is forgotten
    assert alloc.num_cached_pages == 1 and alloc.match_prefix(list(range(9))) == pages[:1]
    alloc.check_integrity()


@pytest.mark.parametrize("corrupt", ["negative_ref", "leak", "double_listed", "stale_hash"])
def test_check_integrity_detects_corruption(corrupt):
    alloc = PageAllocator(4, PS)
    pages = alloc.allocate(2)
    fill(alloc, pages[:1], [1, 2, 3, 4])
    if corrupt == "negative_ref":
        alloc._ref[3] = -1
    elif corrupt == "leak":
        alloc._ref[pages[1]] = 0  # neither used nor on a free list
    elif corrupt == "double_listed":
        alloc._free.append(pages[1])
    else:
        alloc._hash[pages[0]] = 123
    with pytest.raises(AssertionError):
        alloc.check_integrity()
