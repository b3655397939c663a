// Kernel gradient of a 2-D convolution on the CPU, as an XLA FFI handler (see conv_ffi.py).
//
//   dk[i, j, c, o] = sum over n, y, x of  xp[n, y*sh + i*dh, x*sw + j*dw, c] * g[n, y, x, o]
//
// xp: the padded input (N, Hp, Wp, Cin); g: the output cotangent (N, Ho, Wo, Cout);
// dk: (kh, kw, Cin, Cout); float32, channels last, row-major.
//
// Why a handler: XLA's CPU backend has no fast kernel for this contraction (issue 8). Its
// convolution form runs at 4-60 GFLOP/s, and the matrix-product form in conv.py is limited by how
// Eigen splits small (96 x ~2000)^T (~2000 x 96) products between threads. Here the output rows
// (n, y) are split into one contiguous part per thread of XLA's intra-op pool, each part
// accumulates into its own dk, and the parts are summed at the end, so the threads never share a
// product. Within a part, kRows product rows (tap j, channel c) times two vectors of output
// channels are held in registers while a tile of output positions streams through: per position,
// kRows broadcasts of input values and two loads of the cotangent feed 2 * kRows fused
// multiply-adds. Output channels left over are done one vector at a time, the last cout % kLanes
// of them from a zero-padded copy of the cotangent.

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
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
// Measured on the 2-core EPYC over 32-1024 channels and 16x16 to 512x768 maps: 512 and 1024 were
// best, 128 was 5-30% slower (most on short rows with wide inputs), 2048 up to 1.6x slower.
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
