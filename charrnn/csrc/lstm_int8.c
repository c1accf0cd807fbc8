/* charrnn's int8 LSTM step, the native half (charrnn/quantized.py holds the Python half).
   Built by charrnn/native.py with the system's C compiler (-O3 -march=native, reciprocal
   estimates, OpenMP when the compiler has it; linked without the math flags, which would switch
   the whole process to flush-to-zero) and loaded with ctypes.

   - lstm_layer_int8: one layer's gate math, from the GEMM's int32 sums to the new cell state
     and the new hidden state, already quantised for the next GEMM. In torch ops the same math
     is eleven calls over (B, 4H) slices; at 64 rows they cost more than the int8 GEMMs.
   - sample_rows: plain temperature sampling (and greedy rows) for a batch, as
     charrnn/sampling.py's sample_next does it without top-k or top-p.
   - On CPUs with AMX (Intel Sapphire Rapids and later), amx_gemm and lstm_step_amx: the GEMMs
     on the tile units, weights packed once, and the whole step in one call; above 32 rows its
     blocks of 32 rows are shared out to helper threads of its own. */
#include <stdint.h>
#include <string.h>

/* exp(x): 2^(x log2 e), the integer part into the exponent bits and a degree-4 polynomial for
   the fraction (a least-squares fit, relative error 3.6e-6, far under the int8 weights' own;
   degree 6 made the gate pass 15% slower). Unlike libm's expf the compiler vectorises it. */
static inline float fexp(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  float t = x * 1.44269504f;
  float fi = __builtin_floorf(t), f = t - fi;
  float p = 0.01368399654733105f;
  p = p * f + 0.05171782650450033f;
  p = p * f + 0.2416211630561944f;
  p = p * f + 0.692969620634759f;
  p = p * f + 1.0000035900142765f;
  int32_t e = ((int32_t)fi + 127) << 23;
  float s;
  memcpy(&s, &e, 4);
  return p * s;
}
static inline float sigm(float x) { return 1.0f / (1.0f + fexp(-x)); }
static inline float ftanh(float x) { return 2.0f / (1.0f + fexp(-2.0f * x)) - 1.0f; }

/* The gate columns come in blocks of ub units: block k holds i, f, o and g of units
   k*ub .. k*ub+ub-1, ub columns each (ub = H: the plain (i, f, o, g) order). The threads split
   the blocks as the GEMM splits its columns, so each reads the sums it wrote itself.
   One block k of one row: a (4ub) int32 sums, sc (4ub) each column's factor back to floats,
   bs (4ub) the row's additive term (layer 0: its looked-up input projection; else the bias),
   c (ub) the cell state in, co (ub) out. The new h, times 127 and rounded (|h| < 1, so it fits
   int8 with one fixed scale), goes to o1 and o2. */
static inline void gate_block(int ub, const int32_t *restrict a, const float *restrict sc,
                              const float *restrict bs, const float *restrict c,
                              float *restrict co, int8_t *restrict o1, int8_t *restrict o2) {
#pragma omp simd
  for (int j = 0; j < ub; j++) {
    float i = sigm(a[j] * sc[j] + bs[j]);
    float f = sigm(a[ub + j] * sc[ub + j] + bs[ub + j]);
    float o = sigm(a[2 * ub + j] * sc[2 * ub + j] + bs[2 * ub + j]);
    float g = ftanh(a[3 * ub + j] * sc[3 * ub + j] + bs[3 * ub + j]);
    float cn = f * c[j] + i * g;
    co[j] = cn;
    float h = o * ftanh(cn) * 127.0f;
    int8_t q = (int8_t)(int32_t)(h + (h >= 0.f ? 0.5f : -0.5f));
    o1[j] = q;
    o2[j] = q;
  }
}

/* Ids outside 0..n-1 (the table's rows), counted: the caller raises before any is read. */
static int out_of_range(int B, const int64_t *ids, int64_t n) {
  int bad = 0;
  for (int b = 0; b < B; b++)
    bad += ids[b] < 0 || ids[b] >= n;
  return bad;
}

/* One LSTM layer for B rows of H units (the path where torch._int_mm does the GEMMs).
   acc (B, 4H) int32, row stride acc_stride; scale (4H); row b's additive term is at
   base + rows[b] * base_stride (layer 0: rows = the ids, each checked against n_rows) or at
   base + b * base_stride (rows NULL; stride 0: a bias). c (B, H) in, c_out (B, H) out; the new
   h to out1 (row stride s1) and to out2 (s2) if given: the next layer's GEMM input. Returns how
   many ids were out of range; then nothing is written. */
int lstm_layer_int8(int B, int H, int ub, const int32_t *acc, int acc_stride, const float *scale,
                    const float *base, const int64_t *rows, int64_t n_rows, int base_stride,
                    const float *c, float *c_out, int8_t *out1, int s1, int8_t *out2, int s2) {
  if (rows) {
    int bad = out_of_range(B, rows, n_rows);
    if (bad)
      return bad;
  }
  const int blocks = H / ub;
#pragma omp parallel for collapse(2) if (B * H >= 4096)
  for (int k = 0; k < blocks; k++)
    for (int b = 0; b < B; b++) {
      const int64_t r = rows ? rows[b] : b, col = (int64_t)k * 4 * ub, unit = (int64_t)k * ub;
      int8_t *o1 = out1 + (int64_t)b * s1 + unit;
      gate_block(ub, acc + (int64_t)b * acc_stride + col, scale + col,
                 base + r * base_stride + col, c + (int64_t)b * H + unit,
                 c_out + (int64_t)b * H + unit, o1, out2 ? out2 + (int64_t)b * s2 + unit : o1);
    }
  return 0;
}

/* The head's logits (B, V) floats from its int32 sums (row stride acc_stride): acc * scale +
   bias, per column. */
void dequantize(int B, int V, const int32_t *acc, int acc_stride, const float *scale,
                const float *bias, float *out) {
  for (int b = 0; b < B; b++) {
    const int32_t *a = acc + (int64_t)b * acc_stride;
#pragma omp simd
    for (int v = 0; v < V; v++)
      out[(int64_t)b * V + v] = a[v] * scale[v] + bias[v];
  }
}

/* Next ids (B,) from logits (B, V), as sample_next without top-k/top-p: greedy rows take the
   first largest logit; the others draw from softmax(logits / temp[b]) by inverse CDF with the
   uniform u[b][min(steps[b], u_cols - 1)], the first index whose running sum reaches u times
   the total. */
void sample_rows(int B, int V, const float *logits, const float *temp, const uint8_t *greedy,
                 const float *u, int64_t u_cols, const int64_t *steps, int64_t *out) {
  for (int b = 0; b < B; b++) {
    const float *l = logits + (int64_t)b * V;
    float e[V];
    int best = 0;
    for (int v = 1; v < V; v++)
      best = l[v] > l[best] ? v : best;
    if (greedy[b]) {
      out[b] = best;
      continue;
    }
    const float m = l[best], inv = 1.0f / temp[b];
#pragma omp simd
    for (int v = 0; v < V; v++)
      e[v] = fexp((l[v] - m) * inv);
    float total = 0.f;
    for (int v = 0; v < V; v++)
      total += e[v];
    const int64_t s = steps[b] < u_cols - 1 ? steps[b] : u_cols - 1;
    const float target = u[(int64_t)b * u_cols + s] * total;
    float run = 0.f;
    int pick = V - 1;
    for (int v = 0; v < V; v++) {
      run += e[v];
      if (run >= target) {
        pick = v;
        break;
      }
    }
    out[b] = pick;
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* Linux hands AMX state to a process that asks (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA):
   1 when granted (oneDNN may have asked already), 0 when not (then torch._int_mm is used). */
int amx_init(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

/* Tiles 0-3: 16 x 16 int32 sums; 4-5: A, 16 rows x 64 int8; 6-7: B, 16 rows x 64 int8.
   A constant, not filled in on the stack: GCC 12's _tile_loadconfig tells the compiler it reads
   8 bytes of its 64, so the stores of the rows and widths were dropped as dead, and LDTILECFG
   read whatever the stack held there (a fault, once the helper threads called it). */
static const tile_config TILES = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};
static void load_tiles(void) { _tile_loadconfig(&TILES); }

/* Output block (32 rows from i*32, 32 columns from j*32) of C (M, N) int32 = A (M, K) int8 @ B,
   B packed four rows at a time, (K/4, 4N): packed[k4][4n + r] = B[4 k4 + r][n]. */
static inline void amx_block(int i, int j, int N, int K, const int8_t *A, const int8_t *Bp,
                             int32_t *C) {
  const int8_t *a = A + (int64_t)i * 32 * K;
  const int8_t *b = Bp + (int64_t)j * 32 * 4;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int k = 0; k < K; k += 64) {
    _tile_loadd(4, a + k, K);
    _tile_loadd(5, a + (int64_t)16 * K + k, K);
    _tile_loadd(6, b + (int64_t)(k / 4) * N * 4, N * 4);
    _tile_loadd(7, b + (int64_t)(k / 4) * N * 4 + 64, N * 4);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  int32_t *c = C + (int64_t)i * 32 * N + j * 32;
  _tile_stored(0, c, N * 4);
  _tile_stored(1, c + 16, N * 4);
  _tile_stored(2, c + (int64_t)16 * N, N * 4);
  _tile_stored(3, c + (int64_t)16 * N + 16, N * 4);
}

/* C (M, N) int32 = A (M, K) int8 @ B (packed as above). M % 32 == 0, K % 64 == 0,
   N % 32 == 0: the caller pads, with zeros where the padding is summed. */
void amx_gemm(int M, int N, int K, const int8_t *A, const int8_t *Bp, int32_t *C) {
#pragma omp parallel
  {
    load_tiles();
#pragma omp for collapse(2) schedule(static)
    for (int j = 0; j < N / 32; j++)
      for (int i = 0; i < M / 32; i++)
        amx_block(i, j, N, K, A, Bp, C);
    _tile_release();
  }
}

/* Everything one step needs; charrnn/native.py mirrors it as a ctypes Structure. */
typedef struct {
  int B, H, L, ub, V;         /* rows, units, layers, gate block, vocabulary */
  int threads;                /* threads for the step (the caller and its helpers) */
  int K0, K1, N, NV;          /* padded widths: layer 0's input, later inputs, 4H, the head's */
  const int64_t *ids;         /* (B,) */
  int64_t n_ids;              /* the table's rows */
  const int8_t **w;           /* L + 1 packed weights, the head's last */
  const float **scale;        /* L + 1 column factors */
  const float **base;         /* L: the table (n_ids, 4H), then each later layer's bias (4H) */
  const float *head_bias;     /* (V,) */
  int8_t *x0, *xh;            /* scratch, rows padded to 32 (M): (M, K0) layer 0's and the
                                 head's input; (M, K1) */
  int32_t *acc, *head_acc;    /* scratch (M, N), (M, NV) */
  const int8_t **h_in;        /* L x (B, H) */
  const float **c_in;         /* L x (B, H) */
  int8_t **h_out;             /* L x (B, H) */
  float **c_out;              /* L x (B, H) */
  float *logits;              /* (B, V) */
} step_args;

/* The whole step for row blocks i0..i1-1 (32 rows each; rows b0..b1-1 of the batch): per layer
   its input (h in, and x from the layer below), the GEMM and the gate pass; then the head.
   Rows are independent: threads that take different blocks need no barrier. */
static void step_rows(const step_args *s, int i0, int i1) {
  const int H = s->H, ub = s->ub;
  const int b0 = i0 * 32, b1 = i1 * 32 < s->B ? i1 * 32 : s->B;
  for (int l = 0; l < s->L; l++) {
    int8_t *x = l ? s->xh : s->x0;
    const int K = l ? s->K1 : s->K0;
    for (int b = b0; b < b1; b++) /* the layer's own h; layer l > 0 has x from below at 0 */
      memcpy(x + (int64_t)b * K + (l ? H : 0), s->h_in[l] + (int64_t)b * H, H);
    for (int j = 0; j < s->N / 32; j++)
      for (int i = i0; i < i1; i++)
        amx_block(i, j, s->N, K, x, s->w[l], s->acc);
    int8_t *up = l + 1 < s->L ? s->xh : s->x0;
    const int up_stride = l + 1 < s->L ? s->K1 : s->K0;
    for (int b = b0; b < b1; b++)
      for (int k = 0; k < H / ub; k++) {
        const int64_t r = l ? 0 : s->ids[b], col = (int64_t)k * 4 * ub, unit = (int64_t)k * ub;
        gate_block(ub, s->acc + (int64_t)b * s->N + col, s->scale[l] + col,
                   s->base[l] + r * 4 * H + col, s->c_in[l] + (int64_t)b * H + unit,
                   s->c_out[l] + (int64_t)b * H + unit, s->h_out[l] + (int64_t)b * H + unit,
                   up + (int64_t)b * up_stride + unit);
      }
  }
  for (int j = 0; j < s->NV / 32; j++)
    for (int i = i0; i < i1; i++)
      amx_block(i, j, s->NV, s->K0, s->x0, s->w[s->L], s->head_acc);
  dequantize(b1 - b0, s->V, s->head_acc + (int64_t)b0 * s->NV, s->NV, s->scale[s->L],
             s->head_bias, s->logits + (int64_t)b0 * s->V);
}

#include "blocks.h" /* run_blocks: independent blocks of work on the caller and helper threads */

/* One block of 32 rows of a step (run_blocks' callbacks; the tile registers are per thread). */
static void step_block(const void *s, int i) { step_rows(s, i, i + 1); }
static void tiles_off(void) { _tile_release(); }

/* The whole step, its blocks of 32 rows on s->threads threads at most (blocks.h). Returns how
   many ids were out of range; then nothing is written. */
int lstm_step_amx(const step_args *s) {
  int bad = out_of_range(s->B, s->ids, s->n_ids);
  if (bad)
    return bad;
  run_blocks((s->B + 31) / 32, s->threads, step_block, s, load_tiles, tiles_off);
  return 0;
}
#else
int amx_init(void) { return 0; }
void amx_gemm(int M, int N, int K, const int8_t *A, const int8_t *Bp, int32_t *C) {
  (void)M, (void)N, (void)K, (void)A, (void)Bp, (void)C;
}
int lstm_step_amx(const void *s) { return (void)s, -1; }
#endif
