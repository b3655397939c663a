// Three XLA FFI handlers for 2-D convolutions on the CPU (see conv_ffi.py): the kernel gradient of
// any convolution (direct), and for 3x3 stride-1 convolutions Winograd's F(2x2, 3x3) algorithm (the
// forward pass and the input gradient) and its transpose F(3x3, 2x2) (the kernel gradient); the
// Winograd part is documented where it starts below.
//
// Direct kernel gradient:
//   dk[i, j, c, o] = sum over n, y, x of  xp[n, y*sh + i*dh, x*sw + j*dw, c] * g[n, y, x, o]
//
// xp: the padded input (N, Hp, Wp, Cin); g: the output cotangent (N, Ho, Wo, Cout);
// dk: (kh, kw, Cin, Cout); float32, channels last, row-major.
//
// Why a handler: XLA's CPU backend has no fast kernel for this contraction. Its convolution form is
// slow on large maps, and the matrix-product form in conv.py is limited by how Eigen splits small
// (96 x ~2000)^T (~2000 x 96) products between threads. Here the output rows (n, y) are split into
// one contiguous part per thread of XLA's intra-op pool, each part accumulates into its own dk, and
// the parts are summed at the end, so the threads never share a product. Within a part, kRows
// product rows (tap j, channel c) times two vectors of output channels are held in registers while
// a tile of output positions streams through: per position, kRows broadcasts of input values and
// two loads of the cotangent feed 2 * kRows fused multiply-adds. Output channels left over are done
// one vector at a time, the last cout % kLanes of them from a zero-padded copy of the cotangent.

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kRows = 12;  // 12 x 2 accumulators + 2 cotangent vectors of the 32 registers
#else
constexpr int kLanes = 8;
constexpr int kRows = 6;  // 6 x 2 accumulators + 2 cotangent vectors of the 16 registers
#endif
// Output positions per tile: the cotangent tile and the input columns it meets stay in the L2 cache
// while every row block passes over them, and the accumulators are read and written once per tile.
// Over 32-1024 channels and 16x16 to 512x768 maps, 512 and 1024 were best; smaller tiles lost most
// on short rows with wide inputs (benchmarks/README.md, "Kernel gradient on the CPU").
constexpr int64_t kTilePositions = 512;

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4), may_alias));

struct Geometry {
  int64_t n, hp, wp, cin, ho, wo, cout, kh, kw, sh, sw, dh, dw;
};

// out[out_offsets[r] + v*kLanes + lane] += sum over tile rows t < tile_rows and columns x in
// [x0, x1) of  x_row[t*x_row_stride + x*x_step + x_offsets[r]] * g_row[t*g_row_stride + x*g_step + v*kLanes + lane]
template <int R, int V>
void RowBlock(const float* x_row, int64_t x_row_stride, int64_t x_step, const int64_t* x_offsets, const float* g_row,
              int64_t g_row_stride, int64_t g_step, int64_t tile_rows, int64_t x0, int64_t x1, float* out,
              const int64_t* out_offsets) {
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = Vec{};
  int64_t offsets[R];
  for (int r = 0; r < R; ++r) offsets[r] = x_offsets[r];
  for (int64_t t = 0; t < tile_rows; ++t) {
    const float* xq = x_row + t * x_row_stride + x0 * x_step;
    const float* gq = g_row + t * g_row_stride + x0 * g_step;
    for (int64_t x = x0; x < x1; ++x, xq += x_step, gq += g_step) {
      Vec g[V];
      for (int v = 0; v < V; ++v) g[v] = *reinterpret_cast<const Vec*>(gq + v * kLanes);
      for (int r = 0; r < R; ++r) {
        const float value = xq[offsets[r]];
        for (int v = 0; v < V; ++v) acc[r][v] += value * g[v];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) *reinterpret_cast<Vec*>(out + out_offsets[r] + v * kLanes) += acc[r][v];
}

using RowBlockFn = void (*)(const float*, int64_t, int64_t, const int64_t*, const float*, int64_t, int64_t, int64_t,
                            int64_t, int64_t, float*, const int64_t*);

// table[V - 1][R - 1] = RowBlock<R, V>, so a block of any height up to kRows has its kernel.
template <int V, int... Rs>
constexpr std::array<RowBlockFn, sizeof...(Rs)> RowBlocks(std::integer_sequence<int, Rs...>) {
  return {&RowBlock<Rs + 1, V>...};
}
const std::array<std::array<RowBlockFn, kRows>, 2> kRowBlockTable = {
    RowBlocks<1>(std::make_integer_sequence<int, kRows>{}),
    RowBlocks<2>(std::make_integer_sequence<int, kRows>{})};

// Adds the kernel gradient of output rows [row_begin, row_end) of the flattened (n, y) into dk.
void AccumulateRows(const Geometry& geo, const float* xp, const float* g, float* dk, int64_t row_begin,
                    int64_t row_end) {
  // Product rows of one kernel row i are (tap j, channel c): their offsets within an input row,
  // in dk[i], and in the lane-padded accumulator of the last cout % kLanes channels.
  const int64_t rows = geo.kw * geo.cin;
  std::vector<int64_t> x_offsets(rows), dk_offsets(rows), tail_offsets(rows);
  for (int64_t j = 0; j < geo.kw; ++j)
    for (int64_t c = 0; c < geo.cin; ++c) {
      const int64_t r = j * geo.cin + c;
      x_offsets[r] = j * geo.dw * geo.cin + c;
      dk_offsets[r] = r * geo.cout;
      tail_offsets[r] = r * kLanes;
    }
  // A tile is kTilePositions columns of one output row, or several whole rows of one image when
  // rows are shorter, so the accumulators are stored once per ~kTilePositions positions.
  const int64_t tile_cols = std::min(geo.wo, kTilePositions);
  const int64_t rows_per_tile = std::max<int64_t>(1, kTilePositions / geo.wo);
  const int64_t tail = geo.cout % kLanes, tail_begin = geo.cout - tail;
  std::vector<float> tail_dk(tail ? geo.kh * rows * kLanes : 0, 0.f);
  std::vector<float> tail_g(tail ? rows_per_tile * tile_cols * kLanes : 0, 0.f);
  const int64_t x_step = geo.sw * geo.cin, x_row_stride = geo.sh * geo.wp * geo.cin, g_row_stride = geo.wo * geo.cout;

  for (int64_t row = row_begin; row < row_end;) {
    const int64_t n = row / geo.ho, y = row % geo.ho;
    const int64_t tile_rows = std::min({rows_per_tile, row_end - row, geo.ho - y});
    const float* g_row = g + row * g_row_stride;
    for (int64_t x0 = 0; x0 < geo.wo; x0 += tile_cols) {
      const int64_t x1 = std::min(geo.wo, x0 + tile_cols);
      if (tail) {
        // The last channels, zero padded to a full vector, at tile-relative positions.
        for (int64_t t = 0; t < tile_rows; ++t)
          for (int64_t x = x0; x < x1; ++x)
            std::memcpy(&tail_g[(t * tile_cols + x - x0) * kLanes], g_row + t * g_row_stride + x * geo.cout + tail_begin,
                        tail * sizeof(float));
      }
      for (int64_t i = 0; i < geo.kh; ++i) {
        const float* x_row = xp + (n * geo.hp + y * geo.sh + i * geo.dh) * geo.wp * geo.cin;
        float* dk_i = dk + i * rows * geo.cout;
        auto blocks = [&](int vectors, const float* x_first, const float* g_first, int64_t g_stride, int64_t g_step,
                          int64_t begin, int64_t end, float* out, const std::vector<int64_t>& out_offsets) {
          for (int64_t r = 0; r < rows; r += kRows) {
            const int64_t height = std::min<int64_t>(kRows, rows - r);
            kRowBlockTable[vectors - 1][height - 1](x_first, x_row_stride, x_step, x_offsets.data() + r, g_first,
                                                    g_stride, g_step, tile_rows, begin, end, out,
                                                    out_offsets.data() + r);
          }
        };
        int64_t o = 0;
        for (; o + 2 * kLanes <= geo.cout; o += 2 * kLanes)
          blocks(2, x_row, g_row + o, g_row_stride, geo.cout, x0, x1, dk_i + o, dk_offsets);
        if (o + kLanes <= geo.cout) blocks(1, x_row, g_row + o, g_row_stride, geo.cout, x0, x1, dk_i + o, dk_offsets);
        if (tail) {
          // tail_g holds columns [x0, x1) from 0: shift the input row to match.
          blocks(1, x_row + x0 * x_step, tail_g.data(), tile_cols * kLanes, kLanes, 0, x1 - x0,
                 tail_dk.data() + i * rows * kLanes, tail_offsets);
        }
      }
    }
    row += tile_rows;
  }
  for (int64_t k = 0; tail && k < geo.kh * rows; ++k)
    for (int64_t lane = 0; lane < tail; ++lane) dk[k * geo.cout + tail_begin + lane] += tail_dk[k * kLanes + lane];
}

// Runs run(part) for every part in [0, count) on the calling thread and the pool's threads and
// returns when all are done. Any thread may claim the next unclaimed part; the calling thread claims
// parts too and then waits only for parts already running, so a pool whose other threads are busy
// (or blocked in this same handler) cannot deadlock the call. Tasks scheduled on the pool may run
// after the call has returned: they hold the state by shared_ptr and find no part left.
struct Parts {
  std::function<void(int64_t)> run;
  int64_t count = 0;
  std::atomic<int64_t> next{0};
  std::mutex mutex;
  std::condition_variable all_done;
  int64_t done = 0;

  void Work() {
    for (int64_t part = next.fetch_add(1); part < count; part = next.fetch_add(1)) {
      run(part);
      std::lock_guard<std::mutex> lock(mutex);
      if (++done == count) all_done.notify_all();
    }
  }
};

void RunParts(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> run) {
  auto parts = std::make_shared<Parts>();
  parts->run = std::move(run);
  parts->count = count;
  const int64_t helpers = std::min<int64_t>(count, pool.num_threads()) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([parts] { parts->Work(); });
  parts->Work();
  std::unique_lock<std::mutex> lock(parts->mutex);
  parts->all_done.wait(lock, [&] { return parts->done == parts->count; });
}

// ---------------------------------------------------------------------------------------------
// 3x3 stride-1 convolution, Winograd F(2x2, 3x3) (Lavin & Gray 2016):
//
//   y[n, r, s, o] = sum over i, j < 3 and c of  x[n, r + dh*i - pt, s + dw*j - pl, c] * k[i, j, c, o]
//
// x: (N, H, W, Cin), read as zero outside; k: (3, 3, Cin, Cout); y: (N, Ho, Wo, Cout), any Ho, Wo;
// dilations dh, dw (TilePosition splits a dilated convolution into undilated phases).
// Per 2x2 output tile, the 4x4 input tile d is transformed to V = B^T d B, the kernel to
// U = G k G^T (once per call), the 16 elementwise products summed over channels are 16 matrix
// products M[xi] = V[xi] U[xi] over all tiles, and Y = A^T M A. That is 16 multiply-adds per tile
// and channel pair where the direct convolution needs 36 (2.25x fewer); the transforms are additions.
// Faster than XLA's own convolution over the benchmark U-Net's 3x3 layers (benchmarks/README.md,
// "Winograd F(2x2,3x3) handlers"). Rounding differs from the direct sum by ~1e-7 relative.
//
// The kernel gradient of the same convolution (WinogradKernelGradTiles) uses the same input transform.
//
// Tiles (flattened over n, row phase, tile row, tile column, column phase; TilePosition) are split
// between threads and processed a block at a time, the block's transformed values tile-major, so
// each tile's 16 are contiguous. Tile-major V also keeps the 16 output streams of the input
// transform from mapping onto the same cache sets, which slowed a [xi][tile][c] layout. Values
// are loaded and stored through Load/Store overloads rather than templates on the vector type: a
// template argument would drop Vec's alignment attribute and the compiler would emit aligned
// accesses to unaligned addresses.

inline Vec Load(const float* p, std::true_type) { return *reinterpret_cast<const Vec*>(p); }
inline float Load(const float* p, std::false_type) { return *p; }
inline void Store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }
inline void Store(float* p, float v) { *p = v; }

// c[r * ldc + v * kLanes + lane] = sum over k < depth of a[r * lda + k] * b[k * ldb + v * kLanes + lane]
template <int R, int V>
void ProductBlock(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc) {
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = Vec{};
  for (int64_t k = 0; k < depth; ++k) {
    Vec bv[V];
    for (int v = 0; v < V; ++v) bv[v] = *reinterpret_cast<const Vec*>(b + k * ldb + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float value = a[r * lda + k];
      for (int v = 0; v < V; ++v) acc[r][v] += value * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) *reinterpret_cast<Vec*>(c + r * ldc + v * kLanes) = acc[r][v];
}

using ProductBlockFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
template <int V, int... Rs>
constexpr std::array<ProductBlockFn, sizeof...(Rs)> ProductBlocks(std::integer_sequence<int, Rs...>) {
  return {&ProductBlock<Rs + 1, V>...};
}
const std::array<std::array<ProductBlockFn, kRows>, 2> kProductBlockTable = {
    ProductBlocks<1>(std::make_integer_sequence<int, kRows>{}),
    ProductBlocks<2>(std::make_integer_sequence<int, kRows>{})};

struct WinogradGeometry {
  int64_t n, h, w, cin, ho, wo, cout, pt, pl, dh, dw;
  int64_t cout_padded = 0;          // Cout rounded up to whole vectors
  int64_t tile_rows = 0, tile_cols = 0;  // tiles per image and dilation phase
  int64_t tiles = 0;

  // A dilated convolution is dh * dw undilated ones, one per phase (output rows r = phase + dh * r',
  // columns likewise), each tiled by 2x2 tiles of (r', s') on the grid of the largest phase.
  void Tile(int64_t channels_out_padded) {
    cout_padded = channels_out_padded;
    tile_rows = ((ho + dh - 1) / dh + 1) / 2;
    tile_cols = ((wo + dw - 1) / dw + 1) / 2;
    tiles = n * dh * dw * tile_rows * tile_cols;
  }
};

// The image and first output row and column of tile `tile` (flat over n, row phase, tile row, tile
// column, column phase); its outputs are rows r, r + dh and columns s, s + dw. With the column phase
// innermost, the dw tiles that follow each other together read and write a contiguous run of
// columns, as undilated tiles do; with it outermost, successive tiles were 2*dw pixels apart and
// each read every dw-th pixel, which made the dilation-4 layers of IMSAHLO's dense blocks slower
// than undilated ones (forward and kernel gradient alike).
struct TilePosition {
  int64_t n, r, s;
  TilePosition(const WinogradGeometry& geo, int64_t tile) {
    const int64_t phase_x = tile % geo.dw, tile_x = tile / geo.dw % geo.tile_cols,
                  tile_y = tile / geo.dw / geo.tile_cols % geo.tile_rows,
                  image_and_row_phase = tile / geo.dw / geo.tile_cols / geo.tile_rows,
                  phase_y = image_and_row_phase % geo.dh;
    n = image_and_row_phase / geo.dh;
    r = phase_y + 2 * geo.dh * tile_y;
    s = phase_x + 2 * geo.dw * tile_x;
  }
};

// V = B^T d B for the 4x4 input tile d under output tile `tile` (TilePosition),
// B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]; v[xi * Cin + c]. zeros: Cin zeros.
void TransformInputTile(const WinogradGeometry& geo, const float* x, const float* zeros, int64_t tile, float* v) {
  const TilePosition at(geo, tile);
  const float* d[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t r = at.r + geo.dh * i - geo.pt, s = at.s + geo.dw * j - geo.pl;
      d[i][j] = r >= 0 && r < geo.h && s >= 0 && s < geo.w ? x + ((at.n * geo.h + r) * geo.w + s) * geo.cin : zeros;
    }
  auto transform = [&](auto vector, int64_t c) {
    decltype(Load(nullptr, vector)) e[4][4];
    for (int j = 0; j < 4; ++j) {
      const auto d0 = Load(d[0][j] + c, vector), d1 = Load(d[1][j] + c, vector), d2 = Load(d[2][j] + c, vector),
                 d3 = Load(d[3][j] + c, vector);
      e[0][j] = d0 - d2;
      e[1][j] = d1 + d2;
      e[2][j] = d2 - d1;
      e[3][j] = d1 - d3;
    }
    for (int i = 0; i < 4; ++i) {
      Store(v + (4 * i + 0) * geo.cin + c, e[i][0] - e[i][2]);
      Store(v + (4 * i + 1) * geo.cin + c, e[i][1] + e[i][2]);
      Store(v + (4 * i + 2) * geo.cin + c, e[i][2] - e[i][1]);
      Store(v + (4 * i + 3) * geo.cin + c, e[i][1] - e[i][3]);
    }
  };
  int64_t c = 0;
  for (; c + kLanes <= geo.cin; c += kLanes) transform(std::true_type{}, c);
  for (; c < geo.cin; ++c) transform(std::false_type{}, c);
}

// Tiles per block: the block's transformed values (V and M, or V and W) in ~256 KB (the L2 cache)
// for narrow layers; for wide ones, where U or the kernel gradient's sums S (16 Cin Cout floats,
// streamed once per block) outgrow the caches, one tile per 512 of their floats per position, up to
// 192 tiles: much smaller blocks starved wide layers, and 192-tile blocks slowed narrow layers on
// large maps (benchmarks/README.md, "Winograd F(2x2,3x3) handlers").
constexpr int64_t kWinogradBlockFloats = 1 << 16;
constexpr int64_t kWinogradMaxBlock = 192;

int64_t WinogradBlock(const WinogradGeometry& geo) {
  const int64_t per_tile = 16 * (geo.cin + geo.cout_padded);
  const int64_t wanted =
      std::max(kWinogradBlockFloats / per_tile, std::min(kWinogradMaxBlock, geo.cin * geo.cout_padded / 512));
  return std::max<int64_t>(1, (wanted + kRows - 1) / kRows) * kRows;
}

void WinogradTiles(const WinogradGeometry& geo, const float* x, const float* u, float* y, int64_t tile_begin,
                   int64_t tile_end) {
  const int64_t block = WinogradBlock(geo);
  std::vector<float> v(block * 16 * geo.cin), m(block * 16 * geo.cout_padded), zeros(geo.cin, 0.f);
  const int64_t v_stride = 16 * geo.cin, m_stride = 16 * geo.cout_padded;
  for (int64_t first = tile_begin; first < tile_end; first += block) {
    const int64_t tiles = std::min(block, tile_end - first);
    for (int64_t t = 0; t < tiles; ++t) TransformInputTile(geo, x, zeros.data(), first + t, v.data() + t * v_stride);
    // M[xi] = V[xi] U[xi] for the 16 positions xi of the 4x4 tile.
    for (int xi = 0; xi < 16; ++xi) {
      const float* u_xi = u + xi * geo.cin * geo.cout_padded;
      for (int64_t o = 0; o < geo.cout_padded;) {
        const int vectors = o + 2 * kLanes <= geo.cout_padded ? 2 : 1;
        for (int64_t t = 0; t < tiles; t += kRows) {
          const int64_t height = std::min<int64_t>(kRows, tiles - t);
          kProductBlockTable[vectors - 1][height - 1](v.data() + t * v_stride + xi * geo.cin, v_stride, u_xi + o,
                                                      geo.cout_padded, geo.cin,
                                                      m.data() + t * m_stride + xi * geo.cout_padded + o, m_stride);
        }
        o += vectors * kLanes;
      }
    }
    // Y = A^T M A, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]; the tile's outputs past Ho or Wo are dropped.
    for (int64_t t = 0; t < tiles; ++t) {
      const TilePosition at(geo, first + t);
      if (at.r >= geo.ho || at.s >= geo.wo) continue;  // past a short phase's last row or column
      float* out = y + ((at.n * geo.ho + at.r) * geo.wo + at.s) * geo.cout;
      const int64_t right_offset = geo.dw * geo.cout, below_offset = geo.dh * geo.wo * geo.cout;
      const bool right = at.s + geo.dw < geo.wo, below = at.r + geo.dh < geo.ho;
      const float* mt = m.data() + t * m_stride;
      auto transform = [&](auto vector, int64_t o) {
        decltype(Load(nullptr, vector)) top[4], bottom[4];
        for (int j = 0; j < 4; ++j) {
          const auto m0 = Load(mt + j * geo.cout_padded + o, vector),
                     m1 = Load(mt + (4 + j) * geo.cout_padded + o, vector),
                     m2 = Load(mt + (8 + j) * geo.cout_padded + o, vector),
                     m3 = Load(mt + (12 + j) * geo.cout_padded + o, vector);
          top[j] = m0 + m1 + m2;
          bottom[j] = m1 - m2 - m3;
        }
        Store(out + o, top[0] + top[1] + top[2]);
        if (right) Store(out + right_offset + o, top[1] - top[2] - top[3]);
        if (below) {
          Store(out + below_offset + o, bottom[0] + bottom[1] + bottom[2]);
          if (right) Store(out + below_offset + right_offset + o, bottom[1] - bottom[2] - bottom[3]);
        }
      };
      int64_t o = 0;
      for (; o + kLanes <= geo.cout; o += kLanes) transform(std::true_type{}, o);
      for (; o < geo.cout; ++o) transform(std::false_type{}, o);
    }
  }
}

// Kernel gradient of the same convolution by Winograd's F(3x3, 2x2), the transpose of the forward
// F(2x2, 3x3): per 2x2 tile of the cotangent g, V = B^T d B of the 4x4 input tile (as forward) and
// W = A g A^T, A = [[1, 0], [1, 1], [1, -1], [0, -1]]; the 16 sums S[xi] = sum over tiles of
// V[xi]^T W[xi] (Cin x Cout each) are accumulated per thread, and dk = G^T S G at the end
// (16 products per tile and channel pair where the direct sum needs 36).
void WinogradKernelGradTiles(const WinogradGeometry& geo, const float* x, const float* g, float* sums,
                             int64_t tile_begin, int64_t tile_end) {
  const int64_t block = WinogradBlock(geo);
  std::vector<float> v(block * 16 * geo.cin), w(block * 16 * geo.cout_padded, 0.f), zeros(std::max(geo.cin, geo.cout), 0.f);
  const int64_t v_stride = 16 * geo.cin, w_stride = 16 * geo.cout_padded;
  // Product rows (xi, c): their offsets in a tile's V and in the sums.
  std::vector<int64_t> v_offsets(16 * geo.cin), sum_offsets(16 * geo.cin);
  for (int64_t row = 0; row < 16 * geo.cin; ++row) {
    v_offsets[row] = row;
    sum_offsets[row] = row * geo.cout_padded;
  }
  for (int64_t first = tile_begin; first < tile_end; first += block) {
    const int64_t tiles = std::min(block, tile_end - first);
    for (int64_t t = 0; t < tiles; ++t) {
      TransformInputTile(geo, x, zeros.data(), first + t, v.data() + t * v_stride);
      const TilePosition at(geo, first + t);
      const float* q[2][2];
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) {
          const int64_t r = at.r + geo.dh * i, s = at.s + geo.dw * j;
          q[i][j] = r < geo.ho && s < geo.wo ? g + ((at.n * geo.ho + r) * geo.wo + s) * geo.cout : zeros.data();
        }
      float* wt = w.data() + t * w_stride;
      auto transform = [&](auto vector, int64_t o) {
        decltype(Load(nullptr, vector)) e[4][2];
        for (int j = 0; j < 2; ++j) {
          const auto g0 = Load(q[0][j] + o, vector), g1 = Load(q[1][j] + o, vector);
          e[0][j] = g0;
          e[1][j] = g0 + g1;
          e[2][j] = g0 - g1;
          e[3][j] = -g1;
        }
        for (int i = 0; i < 4; ++i) {
          Store(wt + (4 * i + 0) * geo.cout_padded + o, e[i][0]);
          Store(wt + (4 * i + 1) * geo.cout_padded + o, e[i][0] + e[i][1]);
          Store(wt + (4 * i + 2) * geo.cout_padded + o, e[i][0] - e[i][1]);
          Store(wt + (4 * i + 3) * geo.cout_padded + o, -e[i][1]);
        }
      };
      int64_t o = 0;
      for (; o + kLanes <= geo.cout; o += kLanes) transform(std::true_type{}, o);
      for (; o < geo.cout; ++o) transform(std::false_type{}, o);
    }
    // S[xi, c, o] += sum over the block's tiles t of V[t, xi, c] * W[t, xi, o].
    for (int xi = 0; xi < 16; ++xi) {
      for (int64_t c = 0; c < geo.cin; c += kRows) {
        const int64_t height = std::min<int64_t>(kRows, geo.cin - c), row = xi * geo.cin + c;
        for (int64_t o = 0; o < geo.cout_padded;) {
          const int vectors = o + 2 * kLanes <= geo.cout_padded ? 2 : 1;
          kRowBlockTable[vectors - 1][height - 1](v.data(), 0, v_stride, v_offsets.data() + row,
                                                  w.data() + xi * geo.cout_padded + o, 0, w_stride, 1, 0, tiles,
                                                  sums + o, sum_offsets.data() + row);
          o += vectors * kLanes;
        }
      }
    }
  }
}

// dk[i, j, c, o] = (G^T S[:, c, o] G)[i, j], G^T = [[1, .5, .5, 0], [0, .5, -.5, 0], [0, .5, .5, 1]].
void WinogradKernelGradOutput(const WinogradGeometry& geo, const float* sums, float* dk) {
  for (int64_t c = 0; c < geo.cin; ++c)
    for (int64_t o = 0; o < geo.cout; ++o) {
      float m[4][4], rows[3][4];
      for (int xi = 0; xi < 16; ++xi) m[xi / 4][xi % 4] = sums[(xi * geo.cin + c) * geo.cout_padded + o];
      for (int j = 0; j < 4; ++j) {
        rows[0][j] = m[0][j] + 0.5f * (m[1][j] + m[2][j]);
        rows[1][j] = 0.5f * (m[1][j] - m[2][j]);
        rows[2][j] = 0.5f * (m[1][j] + m[2][j]) + m[3][j];
      }
      for (int i = 0; i < 3; ++i) {
        const float* m_i = rows[i];
        const float out[3] = {m_i[0] + 0.5f * (m_i[1] + m_i[2]), 0.5f * (m_i[1] - m_i[2]),
                              0.5f * (m_i[1] + m_i[2]) + m_i[3]};
        for (int j = 0; j < 3; ++j) dk[((i * 3 + j) * geo.cin + c) * geo.cout + o] = out[j];
      }
    }
}

// U[xi, c, o] = (G k[:, :, c, o] G^T)[xi] for input channels [c_begin, c_end),
// G = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]; u holds zeros past Cout.
void WinogradKernel(const WinogradGeometry& geo, const float* k, float* u, int64_t c_begin, int64_t c_end) {
  for (int64_t c = c_begin; c < c_end; ++c)
    for (int64_t o = 0; o < geo.cout; ++o) {
      float rows[4][3];
      for (int j = 0; j < 3; ++j) {
        const float k0 = k[((0 * 3 + j) * geo.cin + c) * geo.cout + o], k1 = k[((1 * 3 + j) * geo.cin + c) * geo.cout + o],
                    k2 = k[((2 * 3 + j) * geo.cin + c) * geo.cout + o];
        rows[0][j] = k0;
        rows[1][j] = 0.5f * (k0 + k1 + k2);
        rows[2][j] = 0.5f * (k0 - k1 + k2);
        rows[3][j] = k2;
      }
      for (int i = 0; i < 4; ++i) {
        const float k0 = rows[i][0], k1 = rows[i][1], k2 = rows[i][2];
        const float transformed[4] = {k0, 0.5f * (k0 + k1 + k2), 0.5f * (k0 - k1 + k2), k2};
        for (int j = 0; j < 4; ++j) u[((4 * i + j) * geo.cin + c) * geo.cout_padded + o] = transformed[j];
      }
    }
}

// Named, because a comma inside a template argument would split the handler macro's arguments.
using Array4 = ffi::Buffer<ffi::F32, 4>;
using Result4 = ffi::ResultBuffer<ffi::F32, 4>;

ffi::Error KernelGrad(ffi::ThreadPool pool, Array4 xp, Array4 g, Result4 dk, int64_t sh, int64_t sw, int64_t dh,
                      int64_t dw) {
  const auto xd = xp.dimensions(), gd = g.dimensions(), kd = dk->dimensions();
  const Geometry geo{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], kd[0], kd[1], sh, sw, dh, dw};
  if (sh < 1 || sw < 1 || dh < 1 || dw < 1 || gd[0] != geo.n || kd[2] != geo.cin || kd[3] != geo.cout ||
      (geo.ho - 1) * sh + (geo.kh - 1) * dh >= geo.hp || (geo.wo - 1) * sw + (geo.kw - 1) * dw >= geo.wp)
    return ffi::Error::InvalidArgument("neuroseg conv kernel gradient: inconsistent operand shapes");
  const int64_t size = geo.kh * geo.kw * geo.cin * geo.cout;
  float* result = dk->typed_data();
  std::memset(result, 0, size * sizeof(float));
  if (geo.n * geo.ho * geo.wo == 0) return ffi::Error::Success();
  // One part per thread, each with its own accumulator (part 0 uses the result), summed at the end.
  const int64_t count = std::clamp<int64_t>(pool.num_threads(), 1, geo.n * geo.ho);
  std::vector<std::vector<float>> scratch(count - 1, std::vector<float>(size, 0.f));
  const int64_t total_rows = geo.n * geo.ho;
  RunParts(pool, count, [&](int64_t part) {
    float* accumulator = part == 0 ? result : scratch[part - 1].data();
    AccumulateRows(geo, xp.typed_data(), g.typed_data(), accumulator, total_rows * part / count,
                   total_rows * (part + 1) / count);
  });
  for (const auto& buffer : scratch)
    for (int64_t k = 0; k < size; ++k) result[k] += buffer[k];
  return ffi::Error::Success();
}

ffi::Error ConvWinograd(ffi::ThreadPool pool, Array4 x, Array4 k, Result4 y, int64_t pt, int64_t pl, int64_t dh,
                        int64_t dw) {
  const auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  WinogradGeometry geo{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], pt, pl, dh, dw};
  if (dh < 1 || dw < 1 || kd[0] != 3 || kd[1] != 3 || kd[2] != geo.cin || kd[3] != geo.cout || yd[0] != geo.n)
    return ffi::Error::InvalidArgument("neuroseg Winograd convolution: inconsistent operand shapes");
  float* result = y->typed_data();
  if (geo.n * geo.ho * geo.wo * geo.cout == 0) return ffi::Error::Success();
  if (geo.cin == 0) {
    std::memset(result, 0, geo.n * geo.ho * geo.wo * geo.cout * sizeof(float));
    return ffi::Error::Success();
  }
  geo.Tile((geo.cout + kLanes - 1) / kLanes * kLanes);
  std::vector<float> u(16 * geo.cin * geo.cout_padded, 0.f);
  const int64_t kernel_parts = std::clamp<int64_t>(pool.num_threads(), 1, geo.cin);
  RunParts(pool, kernel_parts, [&](int64_t part) {
    WinogradKernel(geo, k.typed_data(), u.data(), geo.cin * part / kernel_parts, geo.cin * (part + 1) / kernel_parts);
  });
  const int64_t count = std::clamp<int64_t>(pool.num_threads(), 1, geo.tiles);
  RunParts(pool, count, [&](int64_t part) {
    WinogradTiles(geo, x.typed_data(), u.data(), result, geo.tiles * part / count, geo.tiles * (part + 1) / count);
  });
  return ffi::Error::Success();
}

ffi::Error KernelGradWinograd(ffi::ThreadPool pool, Array4 x, Array4 g, Result4 dk, int64_t pt, int64_t pl,
                              int64_t dh, int64_t dw) {
  const auto xd = x.dimensions(), gd = g.dimensions(), kd = dk->dimensions();
  WinogradGeometry geo{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], pt, pl, dh, dw};
  if (dh < 1 || dw < 1 || kd[0] != 3 || kd[1] != 3 || kd[2] != geo.cin || kd[3] != geo.cout || gd[0] != geo.n)
    return ffi::Error::InvalidArgument("neuroseg Winograd kernel gradient: inconsistent operand shapes");
  float* result = dk->typed_data();
  const int64_t size = 9 * geo.cin * geo.cout;
  std::memset(result, 0, size * sizeof(float));
  if (size == 0 || geo.n * geo.ho * geo.wo == 0) return ffi::Error::Success();
  geo.Tile((geo.cout + kLanes - 1) / kLanes * kLanes);
  const int64_t count = std::clamp<int64_t>(pool.num_threads(), 1, geo.tiles);
  // One accumulator of the 16 sums per part, summed into the first.
  std::vector<std::vector<float>> sums(count, std::vector<float>(16 * geo.cin * geo.cout_padded, 0.f));
  RunParts(pool, count, [&](int64_t part) {
    WinogradKernelGradTiles(geo, x.typed_data(), g.typed_data(), sums[part].data(), geo.tiles * part / count,
                            geo.tiles * (part + 1) / count);
  });
  for (int64_t part = 1; part < count; ++part)
    for (size_t k = 0; k < sums[0].size(); ++k) sums[0][k] += sums[part][k];
  WinogradKernelGradOutput(geo, sums[0].data(), result);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeurosegConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Array4>()
                                  .Arg<Array4>()
                                  .Ret<Array4>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw"));

// Both Winograd handlers: two arrays in, one out, the input's top-left shift and the dilation.
static auto WinogradBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<Array4>()
      .Arg<Array4>()
      .Ret<Array4>()
      .Attr<int64_t>("pt")
      .Attr<int64_t>("pl")
      .Attr<int64_t>("dh")
      .Attr<int64_t>("dw");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeurosegConvWinograd, ConvWinograd, WinogradBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeurosegConvKernelGradWinograd, KernelGradWinograd, WinogradBinding());
