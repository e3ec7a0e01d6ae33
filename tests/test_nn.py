"""funad.nn: exact search back-ends and mutual nearest pairs."""

import pytest
import torch

from funad.errors import DataError
from funad.nn import NNIndex, faiss_available, mutual_nearest_pairs, nearest_other, resolve_backend

BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_matches_brute_force(backend):
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 12, generator=g), torch.randn(40, 12, generator=g)
    sqdist, idx = NNIndex(backend).fit(bank).search(queries, 3)
    full = torch.cdist(queries.double(), bank.double()) ** 2
    ref_d, ref_i = full.topk(3, dim=1, largest=False)
    assert idx.dtype == torch.int64 and sqdist.shape == (40, 3)
    assert torch.equal(idx, ref_i)
    assert torch.allclose(sqdist.double(), ref_d, atol=1e-4)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_backends_agree_with_small_chunks():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(500, 32, generator=g), torch.randn(64, 32, generator=g)
    d_t, i_t = NNIndex("torch", chunk_elems=1000).fit(bank).search(queries, 2)
    d_f, i_f = NNIndex("faiss").fit(bank).search(queries, 2)
    assert torch.equal(i_t, i_f)
    assert torch.allclose(d_t, d_f, atol=1e-3)


def test_query_finds_itself_at_distance_near_zero():
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    sqdist, idx = NNIndex("torch").fit(bank).search(bank[1:2], 2)
    assert idx.tolist() == [[1, 0]]
    assert sqdist[0, 0] == pytest.approx(0.0, abs=1e-5) and sqdist[0, 1] == pytest.approx(25.0)


def test_search_errors_name_the_numbers():
    index = NNIndex("torch").fit(torch.zeros(3, 4))
    with pytest.raises(DataError, match="D=4.*D=5"):
        index.search(torch.zeros(1, 5), 1)
    with pytest.raises(DataError, match="k=4.*3 vectors"):
        index.search(torch.zeros(1, 4), 4)
    with pytest.raises(DataError, match="unknown nearest-neighbour backend"):
        resolve_backend("annoy", "cpu")


def test_auto_picks_torch_on_accelerators_and_intel_cpus(monkeypatch):
    import funad.nn as nn
    assert resolve_backend("auto", "cuda") == "torch"
    monkeypatch.setattr(nn, "cpu_vendor", lambda: "GenuineIntel")
    assert resolve_backend("auto", "cpu") == "torch"
    monkeypatch.setattr(nn, "cpu_vendor", lambda: "AuthenticAMD")
    assert resolve_backend("auto", "cpu") == ("faiss" if faiss_available() else "torch")


def test_cpu_vendor_reads_cpuinfo(tmp_path):
    from funad.nn import cpu_vendor
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\n")
    assert cpu_vendor.__wrapped__(str(info)) == "AuthenticAMD"
    assert cpu_vendor.__wrapped__(str(tmp_path / "absent")) == ""


def test_mutual_pairs_by_hand():
    # 1-D points: 0 and 1 are mutual; 10 and 11.5 are mutual; 30's nearest is
    # 11.5 but 11.5's nearest is 10, so 30 pairs with nobody.
    x = torch.tensor([[10.0], [0.0], [30.0], [1.0], [11.5]])
    assert mutual_nearest_pairs(x).tolist() == [[0, 4], [1, 3]]


def test_nearest_other_excludes_self_by_index_not_distance():
    # duplicates are each other's nearest neighbour (distance 0 to another row)
    x = torch.tensor([[0.0], [0.0], [5.0], [7.0]])
    assert nearest_other(x).tolist() == [1, 0, 3, 2]
    assert mutual_nearest_pairs(x).tolist() == [[0, 1], [2, 3]]


def test_mutual_pairs_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(257, 6, generator=g)
    full = mutual_nearest_pairs(x)
    chunked = mutual_nearest_pairs(x, chunk_elems=300)  # one row per chunk
    assert torch.equal(full, chunked)
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    nn = d.argmin(dim=1)
    expected = [[u, int(nn[u])] for u in range(257) if int(nn[nn[u]]) == u and u < int(nn[u])]
    assert full.tolist() == expected


@pytest.mark.parametrize("chunk_elems", [None, 300, 64 * 64])
def test_symmetric_nearest_other_equals_brute_force(chunk_elems):
    """Blocks on and above the diagonal only, with ragged last blocks."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(203, 16, generator=g)
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(float("inf"))
    assert nearest_other(x, chunk_elems=chunk_elems).tolist() == d.argmin(dim=1).tolist()
