"""Blockwise-scaled fp8 GEMM for Hopper in Pallas' Mosaic GPU backend (warp-specialised).

    out[m, n] = sum_c sa[c, m] sb[c, n] (sum_{k in c} a[m, k] b[n, k])      a [M, K], b [N, K]

with the contraction split into CHUNK = 128-wide chunks c (DeepSeek-V3's scale block): each
chunk's fp8 x fp8 product is accumulated by the tensor cores into a fresh fp32 register tile,
then scaled by its row and column scales and added into the fp32 result ("promotion every
128 products").  Both operands contract on their last dim (K-major), which Hopper's fp8
wgmma requires.

Why a second backend next to the Triton kernels of `fp8_gemm`: the promotion needs the
chunk's wgmma to have finished before its scaled add, and a Triton program waits with the
tensor cores idle.  Here each CTA runs three warpgroups: one issues the TMA loads of A, B and
both scale vectors `stages` chunks ahead, two compute warpgroups each own 64 rows of the
CTA's [128, tile_n] output tile.  While one compute warpgroup waits for its chunk product
and rescales it, the other's wgmma keeps the tensor cores busy.  The CTAs are persistent
(one per SM) and walk the output tiles in a snake order for L2 reuse.

Scales arrive expanded to one per chunk: sa [K / CHUNK, M] (a's row scales) and
sb [K / CHUNK, N] (b's row scales, i.e. the output's column scales) or, for b quantized in
128 x 128 blocks, sb [K / CHUNK, N / 128]: one scalar per chunk and tile, which halves the
scaling arithmetic; `chunk_scales` builds them from the quantization scales.  The grouped
variant (experts' forward and input gradient) multiplies each 128-row tile of the
tile-aligned expert layout by its expert's W[g].  The kernel runs on Hopper GPUs only
(Pallas' GPU interpreter of jax 0.10 cannot run a transposed wgmma operand); without a GPU,
lowering it for "cuda" runs the whole Mosaic GPU lowering (the tests do).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from frontier_jax.kernels.fp8_gemm import chunk_row_scales

CHUNK = 128  # contraction chunk (= one 128-byte swizzled row of fp8 in SMEM)
WG_ROWS = 64  # rows of one wgmma: each compute warpgroup owns 64 rows of the CTA tile
COMPUTE_WGS = 2
MEMORY_REGISTERS = 40  # registers left to the TMA warpgroup (the rest go to compute)
GRID_MINOR = {"m": 0, "n": 1}


@dataclasses.dataclass(frozen=True)
class MgpuTiling:
    """CTA output tile [2 * 64, tile_n]; `stages` chunks of A, B and scales in flight;
    output tiles visited in snakes `grid_width` tiles wide along `grid_minor`; the epilogue
    stores [64, epi_n] pieces through shared memory."""

    tile_n: int = 128
    stages: int = 4
    grid_minor: str = "n"
    grid_width: int = 8
    epi_n: int = 64

    @property
    def name(self) -> str:
        return f"mgpu128x{self.tile_n}s{self.stages}{self.grid_minor}{self.grid_width}"


DEFAULT_MGPU_TILING = MgpuTiling()


def is_hopper() -> bool:
    """Whether this process runs on a Hopper GPU (compute capability 9.x: wgmma, TMA)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def _num_sms() -> int:
    devices = jax.devices()
    return getattr(devices[0], "core_count", None) or 132


def _kernel(*refs, tiling: MgpuTiling, col_blocks: bool, grouped: bool):
    """refs: ([tile_group,] a, b, sa, sb, out); grouped: b [G, N, K], sb [G, chunks, .] and
    row tile i (128 rows) multiplies b[tile_group[i]] (zeros for tile_group[i] >= G)."""
    tile_group_gmem, (a_gmem, b_gmem, sa_gmem, sb_gmem, out_gmem) = (
        (refs[0], refs[1:]) if grouped else (None, refs)
    )
    first = lambda ref: ref.at[0] if grouped else ref  # one group's (or the only) operand
    m, k = a_gmem.shape
    n = first(b_gmem).shape[0]
    cta_m, tile_n, epi_n = COMPUTE_WGS * WG_ROWS, tiling.tile_n, tiling.epi_n
    m_tiles, n_tiles, chunks = m // cta_m, n // tile_n, k // CHUNK
    out_dtype = out_gmem.dtype
    swizzled = (plgpu.TilingTransform((8, CHUNK)), plgpu.SwizzleTransform(128))
    out_swizzle = plgpu.find_swizzle(epi_n * jnp.dtype(out_dtype).itemsize * 8)
    out_transforms = (
        plgpu.TilingTransform((8, out_swizzle // jnp.dtype(out_dtype).itemsize)),
        plgpu.SwizzleTransform(out_swizzle),
    )
    epi_tiles = tile_n // epi_n

    def pipeline(body, context):
        smem = functools.partial(plgpu.BlockSpec, memory_space=plgpu.SMEM)
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(chunks,),
            memory_registers=MEMORY_REGISTERS,
            in_specs=[
                smem((cta_m, CHUNK), lambda c: (0, c), transforms=swizzled),
                smem((tile_n, CHUNK), lambda c: (0, c), transforms=swizzled),
                smem((1, cta_m), lambda c: (c, 0)),
                smem((1, first(sb_gmem).shape[1]) if col_blocks else (1, tile_n), lambda c: (c, 0)),
            ],
            wg_axis="wg",
            num_compute_wgs=COMPUTE_WGS,
            max_concurrent_steps=tiling.stages,
            compute_context=context,
        )

    unused = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(unused, unused).get_allocations(a_gmem, first(b_gmem), sa_gmem, first(sb_gmem)),
        out_smem=plgpu.SMEM((COMPUTE_WGS, 2, WG_ROWS, epi_n), out_dtype, transforms=out_transforms),
        collective_axes="wg",
    )
    def _scope(allocations, out_smem):
        wg = lax.axis_index("wg")
        rows = pl.ds(wg * WG_ROWS, WG_ROWS)
        shape = (WG_ROWS, tile_n)

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _tile_loop(info):
            i, j = plgpu.planar_snake(
                info.index[0], (m_tiles, n_tiles), GRID_MINOR[tiling.grid_minor], tiling.grid_width
            )
            cta_rows, cols = pl.ds(i * cta_m, cta_m), pl.ds(j * tile_n, tile_n)

            def chunk_scale(sa_smem, sb_smem):
                """This chunk's [64, tile_n] scale sa_c[rows, None] * sb_c[None, cols]; with
                block column scales one scalar per tile: a row vector, broadcast."""
                row = sa_smem[0, rows]
                if col_blocks:
                    return lax.broadcast_in_dim(row * sb_smem[0, j], shape, [0])
                col = sb_smem[0, :]
                return lax.broadcast_in_dim(row, shape, [0]) * lax.broadcast_in_dim(col, shape, [1])

            def chunk_step(_, a_smem, b_smem, sa_smem, sb_smem, acc):
                """acc += (a_c b_c^T) * scale_c for this chunk c."""

                def product(part_ref):
                    plgpu.wgmma(part_ref, a_smem.at[rows], plgpu.transpose_ref(b_smem, (1, 0)))
                    return part_ref[...]

                part = pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))
                return acc + part * chunk_scale(sa_smem, sb_smem)

            def store(out):
                """This warpgroup's [64, tile_n] output rows, [64, epi_n] at a time."""
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last tile's stores read
                for e in range(epi_tiles):
                    slot = e % 2
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                    out_smem[wg, slot] = out[:, e * epi_n : (e + 1) * epi_n]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        out_smem.at[wg, slot], out_gmem.at[cta_rows, cols].at[rows, pl.ds(e * epi_n, epi_n)]
                    )

            def compute(run):
                store(run(jnp.zeros(shape, jnp.float32)).astype(out_dtype))

            def run_tile(b_ref, sb_ref):
                pipeline(chunk_step, compute)(
                    a_gmem.at[cta_rows],
                    b_ref.at[cols],
                    sa_gmem.at[:, cta_rows],
                    sb_ref if col_blocks else sb_ref.at[:, cols],
                    allocations=allocations,
                )

            if not grouped:
                run_tile(b_gmem, sb_gmem)
                return
            group = tile_group_gmem[i]
            num_groups = b_gmem.shape[0]
            safe = jnp.minimum(group, num_groups - 1)
            pl.when(group < num_groups)(lambda: run_tile(b_gmem.at[safe], sb_gmem.at[safe]))
            pl.when((group >= num_groups) & (wg < COMPUTE_WGS))(lambda: store(jnp.zeros(shape, out_dtype)))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def check_shapes(m: int, n: int, k: int, tiling: MgpuTiling) -> str | None:
    """Why this kernel cannot take an [M, K] x [N, K] problem, or None."""
    cta_m = COMPUTE_WGS * WG_ROWS
    if m % cta_m or n % tiling.tile_n or k % CHUNK:
        return f"M {m} must be a multiple of {cta_m}, N {n} of {tiling.tile_n}, K {k} of {CHUNK}"
    if tiling.tile_n % tiling.epi_n:
        return f"tile_n {tiling.tile_n} is not a multiple of epi_n {tiling.epi_n}"
    return None


def fp8_matmul_nt_mgpu(
    a: jax.Array,
    b: jax.Array,
    sa: jax.Array,
    sb: jax.Array,
    *,
    out_dtype=jnp.float32,
    tiling: MgpuTiling = DEFAULT_MGPU_TILING,
    num_sms: int | None = None,
) -> jax.Array:
    """a [M, K], b [N, K] (same fp8 dtype), sa [K / 128, M] and sb [K / 128, N] fp32 ->
    out [M, N] = sum_c sa[c, :, None] sb[c, None, :] (a_c b_c^T).  sb may instead hold one
    scale per 128 columns, [K / 128, N / 128] (b quantized in 128 x 128 blocks; tile_n 128):
    one scalar per chunk and tile instead of a column vector (half the scaling arithmetic)."""
    (m, k), (n, kb) = a.shape, b.shape
    problem = f"fp8 GEMM (Mosaic GPU): a {a.shape} {a.dtype}, b {b.shape} {b.dtype}"
    if k != kb or a.dtype != b.dtype:
        raise ValueError(f"{problem}: operands must share the contraction width and dtype")
    chunks = k // CHUNK
    col_blocks = sb.shape == (chunks, n // CHUNK) and n != n // CHUNK
    if sa.shape != (chunks, m) or not (sb.shape == (chunks, n) or col_blocks):
        raise ValueError(
            f"{problem}: scales {sa.shape}, {sb.shape} are not [{chunks}, {m}] "
            f"and [{chunks}, {n}] (or [{chunks}, {n // CHUNK}])"
        )
    if (why := check_shapes(m, n, k, tiling)) is not None:
        raise ValueError(f"{problem}: {why} ({tiling.name})")
    if col_blocks:
        if tiling.tile_n != CHUNK:
            raise ValueError(f"{problem}: block column scales need tile_n {CHUNK} ({tiling.name})")
        sb = _aligned_scale_rows(sb)
    launch = _launch(m, n, out_dtype, tiling, num_sms, col_blocks=col_blocks, grouped=False)
    return launch(a, b, sa.astype(jnp.float32), sb.astype(jnp.float32))


def chunk_scales(
    a_scale: jax.Array, b_scale: jax.Array, m: int, n: int, k: int
) -> tuple[jax.Array, jax.Array]:
    """Quantization scales a [M / ta, K / B], b [..., N / tb, K / B] (B a multiple of CHUNK;
    leading dims: the experts' W) -> the kernel's sa [K / 128, M] and sb [..., K / 128, N / 128]
    where b's scale is constant over 128-column blocks (tb a multiple of 128: weights in
    128 x 128 blocks, or one scale), else [..., K / 128, N]."""
    chunks = k // CHUNK
    if (k // a_scale.shape[-1]) % CHUNK or (k // b_scale.shape[-1]) % CHUNK:
        raise ValueError(
            f"fp8 GEMM (Mosaic GPU): scale blocks of {a_scale.shape}, "
            f"{b_scale.shape} along K = {k} are not multiples of {CHUNK}"
        )
    what = "fp8 GEMM (Mosaic GPU)"
    cols = n // CHUNK if (n // b_scale.shape[-2]) % CHUNK == 0 else n
    return (chunk_row_scales(a_scale, m, chunks, what), chunk_row_scales(b_scale, cols, chunks, what))


def _aligned_scale_rows(scale: jax.Array) -> jax.Array:
    """Block column scales [..., chunks, n] padded to 32 per row: each pipeline stage's row of
    scales is then 128-byte aligned in shared memory (the padding is never read)."""
    pad = [(0, 0)] * (scale.ndim - 1) + [(0, -scale.shape[-1] % 32)]
    return jnp.pad(scale.astype(jnp.float32), pad)


def _launch(m: int, n: int, out_dtype, tiling: MgpuTiling, num_sms: int | None, **static):
    """The persistent kernel over the [M / 128, N / tile_n] output tiles: one CTA per SM
    (at most one per tile), 2 compute + 1 TMA warpgroups."""
    tiles = (m // (COMPUTE_WGS * WG_ROWS)) * (n // tiling.tile_n)
    return plgpu.kernel(
        functools.partial(_kernel, tiling=tiling, **static),
        out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(min(num_sms or _num_sms(), tiles),),
        grid_names=("sm",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )


def fp8_grouped_rows_nt_mgpu(
    a: jax.Array,
    w: jax.Array,
    sa: jax.Array,
    sw: jax.Array,
    tile_group: jax.Array,
    *,
    out_dtype=jnp.float32,
    tiling: MgpuTiling = DEFAULT_MGPU_TILING,
    num_sms: int | None = None,
) -> jax.Array:
    """Grouped rows (experts' forward and input gradient): out[r] = sum_c sa[c, r]
    sw[g, c, n / 128] (a[r]_c W[g]_c^T) with g = tile_group[r // 128] for a [M, K] in the
    tile-aligned layout, w [G, N, K] (same fp8 dtype), sa [K / 128, M], sw [G, K / 128, N / 128]
    (weights in 128 x 128 blocks), tile_group [M / 128] (G or more: zero rows)."""
    (m, k), (g, n, kw) = a.shape, w.shape
    chunks = k // CHUNK
    problem = f"fp8 grouped GEMM (Mosaic GPU): a {a.shape} {a.dtype}, W {w.shape} {w.dtype}"
    if k != kw or a.dtype != w.dtype:
        raise ValueError(f"{problem}: operands must share the contraction width and dtype")
    if (
        sa.shape != (chunks, m)
        or sw.shape != (g, chunks, n // CHUNK)
        or tile_group.shape != (m // (COMPUTE_WGS * WG_ROWS),)
    ):
        raise ValueError(
            f"{problem}: scales {sa.shape}, {sw.shape} / tile_group "
            f"{tile_group.shape} are not [{chunks}, {m}], [{g}, {chunks}, "
            f"{n // CHUNK}] / [{m // (COMPUTE_WGS * WG_ROWS)}]"
        )
    if (why := check_shapes(m, n, k, tiling)) is not None or tiling.tile_n != CHUNK:
        raise ValueError(f"{problem}: {why or f'tile_n must be {CHUNK}'} ({tiling.name})")
    launch = _launch(m, n, out_dtype, tiling, num_sms, col_blocks=True, grouped=True)
    return launch(tile_group.astype(jnp.int32), a, w, sa.astype(jnp.float32), _aligned_scale_rows(sw))
