"""Exact nearest-neighbour search behind one small interface.

Two back-ends give the same answers (up to float rounding):

- ``"torch"``: squared distances ``||q||² - 2 q·b + ||b||²`` by chunked matmul
  and ``topk`` on the device where the tensors already live, so a search on the
  GPU never goes through the host.
- ``"faiss"``: ``faiss.IndexFlatL2``; a GPU index through
  ``faiss.StandardGpuResources`` when the bank is on a CUDA device and faiss was
  built with GPU support, else the CPU index (its inputs go through the host).

``"auto"`` picks per device kind, from ``benchmarks/bench_nn.py``:

- CPU -> it depends on the CPU's maker, because torch's CPU matmul is Intel's
  MKL, which takes its fast paths on Intel CPUs only, while the faiss wheels
  bring their own BLAS:

  - Intel -> torch. On this project's 2-core Xeon with AVX-512 and AMX,
    idle, faiss was 3.0-4.3x slower than torch in all 6 cases of
    ``bench_nn.py`` (e.g. M = 40k, D = 768: torch 1.69 s, faiss 5.88 s), and
    the faithful iteration's search took 105 s with faiss
    (``bench_fit.py --backend faiss``; ``benchmarks/results/fit.md``).
  - other makers -> faiss (torch when faiss is missing). On an earlier 2-core
    AMD EPYC (AVX2), faiss was faster in all 6 cases measured (M = 10k/40k/70k
    bank vectors, D = 768/1536): faiss/torch time 0.47-0.95.

  The choice depends only on the machine, never on a timing taken at run
  time, so the same fit on the same machine gives the same numbers.
- CUDA -> torch. No GPU was available to measure; the torch path keeps bank,
  queries and results on the device (no host round trips), which a faiss CPU
  index cannot, and a faiss GPU flat index is itself a matmul plus k-selection.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Optional, Union

import torch

from .errors import DataError
from .ops import cpu_field

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "faiss")

# Largest number of distance entries materialised at once (query chunk x bank).
# 2**25 float32 = 128 MiB on the CPU, 2**28 = 1 GiB on an accelerator.
_CHUNK_ELEMS = {"cpu": 2**25, "other": 2**28}


def _chunk_rows(n_cols: int, device: torch.device, chunk_elems: Optional[int]) -> int:
    budget = chunk_elems or _CHUNK_ELEMS["cpu" if device.type == "cpu" else "other"]
    return max(1, budget // max(1, n_cols))


def _check_2d(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{what} must be a torch.Tensor of shape (n, dim), got {type(x).__name__}")
    if x.ndim != 2:
        raise DataError(f"{what} must have shape (n, dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")


def faiss_available() -> bool:
    """True when the ``faiss`` package can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: Union[str, torch.device, None]) -> str:
    """Map ``"auto"`` to the measured-faster back-end for ``device``.

    On the CPU: torch on Intel CPUs, faiss on others when it is installed;
    torch on accelerators (see the module docstring for the measurements).
    """
    if backend not in BACKENDS:
        raise DataError(f"unknown nearest-neighbour backend {backend!r}; choose one of {BACKENDS}")
    if backend == "faiss" and not faiss_available():
        raise DataError("backend='faiss' needs the faiss package (pip install faiss-cpu or faiss-gpu); "
                        "use backend='torch' instead")
    if backend != "auto":
        return backend
    on_cpu = torch.device(device if device is not None else "cpu").type == "cpu"
    return "faiss" if on_cpu and cpu_vendor() != "GenuineIntel" and faiss_available() else "torch"


@functools.lru_cache(maxsize=1)
def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...), "" when unknown."""
    return cpu_field("vendor_id", cpuinfo)


class NNIndex:
    """Exact k-nearest-neighbour index over a bank of vectors (squared L2).

    Args:
        backend: "auto", "torch" or "faiss" (see the module docstring).
        device: where the bank lives for the torch back-end; default: the bank's
            own device. Queries are moved there for the search and the results
            come back on the queries' device.
        chunk_elems: most distance entries held at once (torch back-end).
    """

    def __init__(self, backend: str = "auto", device: Union[str, torch.device, None] = None,
                 chunk_elems: Optional[int] = None) -> None:
        self.backend = backend
        self.device = device
        self.chunk_elems = chunk_elems

    def fit(self, bank: torch.Tensor) -> "NNIndex":
        """Index ``bank`` of shape (n_bank, dim)."""
        _check_2d(bank, "bank")
        if bank.shape[0] == 0:
            raise DataError("the bank is empty (0 vectors); it needs at least one vector to search")
        device = torch.device(self.device) if self.device is not None else bank.device
        self.backend_ = resolve_backend(self.backend, device)
        self.n_bank_, self.dim_ = int(bank.shape[0]), int(bank.shape[1])
        if self.backend_ == "torch":
            self.bank_ = bank.detach().to(device=device, dtype=torch.float32)
            self.bank_sqnorm_ = (self.bank_ * self.bank_).sum(dim=1)
        else:
            self.index_ = _faiss_index(bank.detach(), device)
        return self

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Find the ``k`` nearest bank vectors of every query.

        Args:
            queries: (n_queries, dim).
            k: neighbours per query, 1 <= k <= n_bank.

        Returns:
            ``(sqdist, idx)``, both (n_queries, k) on the queries' device,
            ascending by distance; ``sqdist`` float32 (clamped at 0), ``idx``
            int64 indices into the bank.
        """
        if not hasattr(self, "backend_"):
            raise DataError("NNIndex.search was called before fit(bank)")
        _check_2d(queries, "queries")
        if queries.shape[1] != self.dim_:
            raise DataError(f"the index holds D={self.dim_} vectors, queries have D={queries.shape[1]}")
        if not 1 <= k <= self.n_bank_:
            raise DataError(f"k={k} neighbours requested from a bank of {self.n_bank_} vectors; "
                            f"need 1 <= k <= {self.n_bank_}")
        if self.backend_ == "torch":
            return self._search_torch(queries.detach(), k)
        return self._search_faiss(queries.detach(), k)

    def _search_torch(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        out_device = queries.device
        q = queries.to(device=self.bank_.device, dtype=torch.float32)
        rows = _chunk_rows(self.n_bank_, q.device, self.chunk_elems)
        bank_t = self.bank_.t()
        dists, idxs = [], []
        for start in range(0, q.shape[0], rows):
            qc = q[start:start + rows]
            # ||b||² - 2 q·b; ||q||² is constant per row so it is added after top-k.
            partial = torch.addmm(self.bank_sqnorm_, qc, bank_t, beta=1.0, alpha=-2.0)
            d, i = torch.topk(partial, k, dim=1, largest=False, sorted=True)
            dists.append((d + (qc * qc).sum(dim=1, keepdim=True)).clamp_(min=0.0))
            idxs.append(i)
        return torch.cat(dists).to(out_device), torch.cat(idxs).to(out_device)

    def _search_faiss(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries.to(device="cpu", dtype=torch.float32).contiguous().numpy()
        d, i = self.index_.search(q, k)
        sqdist = torch.from_numpy(d).clamp_(min=0.0).to(queries.device)
        return sqdist, torch.from_numpy(i).to(device=queries.device, dtype=torch.int64)


def _faiss_index(bank: torch.Tensor, device: torch.device):
    import faiss

    data = bank.to(device="cpu", dtype=torch.float32).contiguous().numpy()
    index = faiss.IndexFlatL2(data.shape[1])
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, device.index or 0, index)
        index.referenced_resources = resources  # keep the resources alive with the index
    elif device.type == "cuda":
        logger.info("faiss has no GPU support here; using the CPU flat index")
    index.add(data)
    return index


def nearest_other(x: torch.Tensor, chunk_elems: Optional[int] = None) -> torch.Tensor:
    """Index of the nearest *other* row of ``x`` (squared L2), for every row.

    Self is excluded by index, not by distance, so exact duplicates are each
    other's nearest neighbours. Ties go to the lowest index (up to float
    rounding). The distance matrix is symmetric, so it is computed in square
    blocks on and above the diagonal only, each block giving the nearest
    neighbours of its rows and of its columns: about half the matmul work of
    the full matrix. At most ``chunk_elems`` distances exist at once.

    Args:
        x: (n, dim), n >= 2.

    Returns:
        int64 (n,) on ``x``'s device.
    """
    _check_2d(x, "features")
    n = x.shape[0]
    if n < 2:
        raise DataError(f"nearest-other search needs at least 2 features, got {n}")
    x = x.detach().float()
    sqnorm = (x * x).sum(dim=1)
    budget = chunk_elems or _CHUNK_ELEMS["cpu" if x.device.type == "cpu" else "other"]
    # 2048 x 2048 blocks on the CPU (16 MiB, cache-friendly); larger where the budget allows elsewhere.
    side = max(1, min(n, math.isqrt(budget), 2048 if x.device.type == "cpu" else 8192))
    best = torch.full((n,), float("inf"), device=x.device)
    out = torch.zeros(n, dtype=torch.int64, device=x.device)

    def update(rows: slice, dist: torch.Tensor, idx: torch.Tensor) -> None:
        better = dist < best[rows]  # strict: an earlier (lower) index keeps a tie
        best[rows] = torch.where(better, dist, best[rows])
        out[rows] = torch.where(better, idx, out[rows])

    for i0 in range(0, n, side):
        rows_i = slice(i0, min(n, i0 + side))
        xi = x[rows_i]
        for j0 in range(i0, n, side):
            rows_j = slice(j0, min(n, j0 + side))
            block = torch.addmm(sqnorm[rows_j], xi, x[rows_j].t(), beta=1.0, alpha=-2.0)
            block += sqnorm[rows_i, None]
            if j0 == i0:
                block.fill_diagonal_(float("inf"))
            else:  # the block's columns are rows j0..: their nearest among rows i0..
                d, i = block.min(dim=0)
                update(rows_j, d, i + i0)
            d, i = block.min(dim=1)
            update(rows_i, d, i + j0)
    return out


def mutual_nearest_pairs(x: torch.Tensor, chunk_elems: Optional[int] = None) -> torch.Tensor:
    """Mutual nearest-neighbour pairs among the rows of ``x``.

    A pair (u, v) is kept when v is u's nearest other row and u is v's; each
    unordered pair appears once, with u < v, sorted by u.

    Args:
        x: (n, dim) features, n >= 2.

    Returns:
        int64 (n_pairs, 2) on ``x``'s device (n_pairs may be 0).
    """
    nn = nearest_other(x, chunk_elems)
    u = torch.arange(nn.shape[0], device=nn.device)
    keep = (nn[nn] == u) & (u < nn)
    return torch.stack([u[keep], nn[keep]], dim=1)
