"""All Triton code of the boundary metrics (HD, HD95, ASSD): a batch of masks on the GPU (SPEC
sections 7 and 8; `boundary.py` has the definitions, the API and the CPU path).

One call, one wait for the device: every size below is known on the host before the launch,
so the host reads nothing back until the final (4, B) result.
1. `_count_kernel`: boundary pixels (`M XOR erode(M)`, 4-neighbour cross, outside = background)
   of all 2B masks, counted per block of pixels;
2. exclusive cumsum of the block counts (torch), then `_compact_kernel` writes each mask's
   boundary pixels, row-major, into its own row of a (2B, CAPACITY) table;
3. `_nearest_kernel`: for each point, the squared spaced distance to the nearest boundary point
   of the other mask of its case, by tiled brute force (a program owns a block of query points
   and sweeps the partner's points tile by tile, keeping a running minimum);
4. HD, HD95 and ASSD per case from the padded rows (`summarize`, torch, so that it stays on the
   device);
5. one copy to the host of HD, HD95, ASSD and a per-case "on the CPU" flag.

Brute force costs n_P * n_G per case; the CPU path (`boundary.py`) costs about
CPU_SECONDS_PER_POINT per boundary point at best. A case goes to the CPU path instead when the
model says the CPU is faster, n_P * n_G / GPU_PAIRS_PER_SECOND > CPU_SECONDS_PER_POINT * (n_P + n_G),
or when a mask has more boundary points than its row holds (CAPACITY). Those cases are
computed after the one wait, from host copies of their two masks. The coordinates are exact
integers and the distances float32, so they match the float64 CPU path to a relative 1e-6.
"""
import torch
import triton
import triton.language as tl

from .boundary import METRICS, case_boundary_metrics, case_distances
from .dispatch import Launch

# Model of the fallback threshold (kernels/README.md, "Boundary metrics"): the brute-force inner
# loop is 9.2 instructions a pair in the sm_90 SASS (294 for a thread's 32 pairs of a 64 x 64
# tile), an H200 issues 132 SMs x 128 lanes x 1.98 GHz = 3.3e13 a second, taken at half that (an
# estimate); the CPU path was measured at 0.89 us a boundary point (3.14 ms for a sinus case of
# ~3 526 boundary points, one thread, bench/boundary_cpu.json).
GPU_PAIRS_PER_SECOND = 0.5 * 132 * 128 * 1.98e9 / 9.2
CPU_SECONDS_PER_POINT = 0.89e-6
GPU_PAIRS_PER_CPU_POINT = GPU_PAIRS_PER_SECOND * CPU_SECONDS_PER_POINT
MAX_POINTS_PER_MASK = 2 ** 17
BLOCK_PIXELS = 1024
BLOCK_QUERIES = 64
BLOCK_TARGETS = 64
WARPS = 4


@triton.jit
def _boundary_flags(mask_ptr, k, p, H, W):
    """Boundary flags of pixels p (flat, row-major) of mask k: foreground with a background
    4-neighbour, pixels outside the image counting as background."""
    y = p // W
    x = p % W
    inside = p < H * W
    base = mask_ptr + k.to(tl.int64) * H * W
    foreground = tl.load(base + p, mask=inside, other=0) != 0
    up = tl.load(base + p - W, mask=inside & (y > 0), other=0) != 0
    down = tl.load(base + p + W, mask=inside & (y < H - 1), other=0) != 0
    left = tl.load(base + p - 1, mask=inside & (x > 0), other=0) != 0
    right = tl.load(base + p + 1, mask=inside & (x < W - 1), other=0) != 0
    return foreground & ~(up & down & left & right)


@triton.jit
def _count_kernel(mask_ptr, block_counts_ptr, H, W, blocks_per_mask, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    p = pid % blocks_per_mask * BLOCK + tl.arange(0, BLOCK)
    flags = _boundary_flags(mask_ptr, pid // blocks_per_mask, p, H, W)
    tl.store(block_counts_ptr + pid, tl.sum(flags.to(tl.int32), axis=0))


@triton.jit
def _compact_kernel(mask_ptr, block_offsets_ptr, points_ptr, H, W, blocks_per_mask, capacity,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    k = pid // blocks_per_mask
    p = pid % blocks_per_mask * BLOCK + tl.arange(0, BLOCK)
    flags = _boundary_flags(mask_ptr, k, p, H, W)
    slot = tl.load(block_offsets_ptr + pid) + tl.cumsum(flags.to(tl.int32), axis=0) - 1
    tl.store(points_ptr + k.to(tl.int64) * capacity + slot, p, mask=flags & (slot < capacity))


@triton.jit
def _nearest_kernel(points_ptr, counts_ptr, on_cpu_ptr, out_ptr, W, batch, capacity, blocks_per_mask, sy, sx,
                    BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program: query block j of mask k against every boundary point of mask (k + B) mod 2B."""
    pid = tl.program_id(0)
    k = pid // blocks_per_mask
    partner = (k + batch) % (2 * batch)
    n_queries = tl.load(counts_ptr + k)
    n_targets = tl.load(counts_ptr + partner)
    q = pid % blocks_per_mask * BLOCK_Q + tl.arange(0, BLOCK_Q)
    if (tl.load(on_cpu_ptr + k % batch) == 0) & (pid % blocks_per_mask * BLOCK_Q < n_queries):
        q_in = q < n_queries
        qp = tl.load(points_ptr + k.to(tl.int64) * capacity + q, mask=q_in, other=0)
        qy = (qp // W).to(tl.float32)
        qx = (qp % W).to(tl.float32)
        targets = points_ptr + partner.to(tl.int64) * capacity
        # elementwise minima over the tiles, reduced across the tile once at the end: no
        # cross-thread reduction inside the loop
        nearest = tl.full([BLOCK_Q, BLOCK_T], float("inf"), tl.float32)
        start = n_targets * 0
        while start < n_targets:  # a loaded bound: a while loop, which every interpreter runs
            t = start + tl.arange(0, BLOCK_T)
            t_in = t < n_targets
            tp = tl.load(targets + t, mask=t_in, other=0)
            # integer coordinates: the differences are exact, only the spacing rounds
            dy = (qy[:, None] - (tp // W).to(tl.float32)[None, :]) * sy
            dx = (qx[:, None] - (tp % W).to(tl.float32)[None, :]) * sx
            nearest = tl.minimum(nearest, tl.where(t_in[None, :], dy * dy + dx * dx, float("inf")))
            start += BLOCK_T
        best = tl.min(nearest, axis=1)
        tl.store(out_ptr + k.to(tl.int64) * capacity + q, best, mask=q_in)


def count_launch(masks, block_counts, blocks_per_mask):
    _, h, w = masks.shape
    return Launch(_count_kernel, block_counts.numel(), (masks, block_counts, h, w, blocks_per_mask),
                  dict(BLOCK=BLOCK_PIXELS), dict(num_warps=WARPS))


def compact_launch(masks, block_offsets, points, blocks_per_mask):
    _, h, w = masks.shape
    return Launch(_compact_kernel, block_offsets.numel(),
                  (masks, block_offsets, points, h, w, blocks_per_mask, points.shape[1]),
                  dict(BLOCK=BLOCK_PIXELS), dict(num_warps=WARPS))


def nearest_launch(points, counts, on_cpu, squared, width, spacing):
    masks, capacity = points.shape
    query_blocks = triton.cdiv(capacity, BLOCK_QUERIES)
    return Launch(_nearest_kernel, masks * query_blocks,
                  (points, counts, on_cpu, squared, width, masks // 2, capacity, query_blocks,
                   float(spacing[0]), float(spacing[1])),
                  dict(BLOCK_Q=BLOCK_QUERIES, BLOCK_T=BLOCK_TARGETS), dict(num_warps=WARPS))


def _row_percentile(sorted_squared: torch.Tensor, counts: torch.Tensor, percentile: float) -> torch.Tensor:
    """Percentile (numpy's linear interpolation, of distances) of the first counts[k] squared
    distances of each sorted row; 0 for an empty row."""
    last = (counts - 1).clamp(min=0)
    position = last.double() * (percentile / 100.0)
    low = position.floor().long()
    high = torch.minimum(low + 1, last)
    below = sorted_squared.gather(1, low[:, None])[:, 0].double().sqrt()
    above = sorted_squared.gather(1, high[:, None])[:, 0].double().sqrt()
    value = below + (above - below) * (position - low)
    return torch.where(counts > 0, value, torch.zeros_like(value))


def summarize(squared: torch.Tensor, counts: torch.Tensor, percentile: float = 95.0) -> dict:
    """HD, HD95 (directed), HD95_pooled and ASSD per case from squared nearest-boundary distances, one padded row per mask.

    squared: (2B, L) rows; row b < B holds D_PG^2 of case b (its prediction's boundary pixels),
    row B + b holds D_GP^2, each in its first counts[k] entries, the rest ignored. Every step has
    a static size, so on a GPU nothing here waits for the device. Returns float64 tensors (B,) on
    the inputs' device, with the empty-mask policy of `boundary.py` applied.
    """
    batch = len(counts) // 2
    counts = counts.long()
    valid = torch.arange(squared.shape[1], device=squared.device) < counts[:, None]
    # +inf beyond the counts: sorting puts the padding last
    padded = torch.where(valid, squared, torch.full_like(squared, float("inf")))
    distances = torch.where(valid, padded.double().sqrt(), torch.zeros((), dtype=torch.float64, device=squared.device))
    n_pg, n_gp = counts[:batch], counts[batch:]
    hd = torch.maximum(distances[:batch].amax(1), distances[batch:].amax(1))  # distances are >= 0
    assd = (distances[:batch].sum(1) + distances[batch:].sum(1)) / (n_pg + n_gp).clamp(min=1)
    directed = _row_percentile(padded.sort(dim=1).values, counts, percentile)
    hd95 = torch.maximum(directed[:batch], directed[batch:])
    pooled = torch.cat([padded[:batch], padded[batch:]], dim=1).sort(dim=1).values
    hd95_pooled = _row_percentile(pooled, n_pg + n_gp, percentile)
    one_empty = (n_pg == 0) != (n_gp == 0)
    # both empty: every row is empty and the values above are already 0
    nan = torch.full_like(hd, float("nan"))
    return {name: torch.where(one_empty, nan, value) for name, value in zip(METRICS, (hd, hd95, hd95_pooled, assd))}


def boundary_metrics_triton(pred: torch.Tensor, target: torch.Tensor, spacing, percentile: float) -> dict:
    """Batched (B, H, W) bool masks (CUDA, or CPU under the interpreter) -> float64 (B,) CPU tensors."""
    batch, h, w = pred.shape
    if h * w >= 2 ** 31:
        raise ValueError(f"boundary_metrics: an image of {h} x {w} pixels exceeds the kernels' int32 "
                         "pixel indices")
    masks = torch.cat([pred, target]).contiguous()
    blocks_per_mask = triton.cdiv(h * w, BLOCK_PIXELS)
    block_counts = torch.empty((2 * batch, blocks_per_mask), dtype=torch.int32, device=pred.device)
    count_launch(masks, block_counts, blocks_per_mask)()
    counts = block_counts.sum(1, dtype=torch.int32)
    block_offsets = (block_counts.cumsum(1, dtype=torch.int32) - block_counts).contiguous()
    capacity = min(h * w, MAX_POINTS_PER_MASK)
    points = torch.empty((2 * batch, capacity), dtype=torch.int32, device=pred.device)
    compact_launch(masks, block_offsets, points, blocks_per_mask)()

    n_pg, n_gp = counts[:batch].long(), counts[batch:].long()
    on_cpu = ((n_pg * n_gp > GPU_PAIRS_PER_CPU_POINT * (n_pg + n_gp))
              | (torch.maximum(n_pg, n_gp) > capacity)).to(torch.int32)
    squared = torch.full((2 * batch, capacity), float("inf"), dtype=torch.float32, device=pred.device)
    nearest_launch(points, counts, on_cpu, squared, w, spacing)()
    # a mask over the row capacity is on the CPU list; its clamped count only keeps indices in range
    result = summarize(squared, counts.clamp(max=capacity), percentile)
    *values, flags = torch.stack([*(result[name] for name in METRICS), on_cpu.double()]).tolist()
    out = {name: torch.tensor(value, dtype=torch.float64) for name, value in zip(METRICS, values)}
    cpu_cases = [b for b, flag in enumerate(flags) if flag]
    if cpu_cases:
        for b in cpu_cases:
            metrics = case_boundary_metrics(*case_distances(pred[b].cpu().numpy(), target[b].cpu().numpy(), spacing),
                                            percentile)
            for name, value in zip(METRICS, metrics):
                out[name][b] = value
    return out
