// Elementwise ops, conversions and reductions. Grid-stride loops over [n] unless noted.

extern "C" __global__ void cast_f32_bf16(const float* x, bf16* y, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16(x[i]);
}
extern "C" __global__ void cast_bf16_f32(const bf16* x, float* y, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = __bfloat162float(x[i]);
}
extern "C" __global__ void fill_f32(float* y, size_t n, float value) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = value;
}
extern "C" __global__ void fill_bf16(bf16* y, size_t n, float value) {
    const bf16 b = __float2bfloat16(value);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = b;
}
extern "C" __global__ void fill_u32(u32* y, size_t n, u32 value) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = value;
}
// y += alpha * x
extern "C" __global__ void axpy_f32(float alpha, const float* x, float* y, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += alpha * x[i];
}
// y *= alpha
extern "C" __global__ void scale_f32(float alpha, float* y, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] *= alpha;
}
// y[rows, cols] += bias[cols]; suffix = dtype of bias.
extern "C" __global__ void add_bias_f32(const float* bias, float* y, int rows, int cols) {
    const size_t n = (size_t)rows * cols;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += bias[i % cols];
}
extern "C" __global__ void add_bias_bf16(const bf16* bias, float* y, int rows, int cols) {
    const size_t n = (size_t)rows * cols;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += __bfloat162float(bias[i % cols]);
}
// out[rows, cols] (+)= x[rows, cols] * s[cols]
extern "C" __global__ void scale_cols_f32(const float* x, const float* s, float* out, int rows, int cols,
                                          int accumulate) {
    const size_t n = (size_t)rows * cols;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float val = x[i] * s[i % cols];
        out[i] = accumulate ? out[i] + val : val;
    }
}
// out[cols] (+)= sum_i a[i, cols] * b[i, cols]: one thread per column, rows in order.
extern "C" __global__ void col_dot_f32(const float* a, const float* b, float* out, int rows, int cols,
                                       int accumulate) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float acc = 0.0f;
    for (int i = 0; i < rows; ++i) acc += a[(size_t)i * cols + c] * b[(size_t)i * cols + c];
    out[c] = accumulate ? out[c] + acc : acc;
}
// partial[blockIdx.x] = sum of x^2 over this block's grid-stride share, in f64; the host adds
// the partials in order (the grid size is fixed by the caller, so the result is deterministic).
extern "C" __global__ void sum_squares_f32(const float* x, size_t n, double* partial) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc += (double)x[i] * (double)x[i];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) scratch[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int w = 0; w < nwarps; ++w) total += scratch[w];
        partial[blockIdx.x] = total;
    }
}
// dst[r, dst_col + j] = src[r, src_col + j] for j < width: a column block of a row-major matrix
// (a fused projection's output split into its parts, and their gradients joined back).
extern "C" __global__ void copy_cols_f32(const float* src, size_t src_cols, size_t src_col, float* dst, size_t dst_cols,
                                         size_t dst_col, size_t rows, size_t width) {
    const size_t n = rows * width;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / width, j = i % width;
        dst[r * dst_cols + dst_col + j] = src[r * src_cols + src_col + j];
    }
}
// Qwen3-MoE's expert dispatch: dst[r, :] = src[idx[r], :] * (has_scale ? scale[r] : 1).
extern "C" __global__ void gather_rows_f32(const float* src, const unsigned int* idx, const float* scale, int has_scale,
                                           float* dst, size_t rows, size_t dim) {
    const size_t n = rows * dim;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / dim, j = i % dim;
        const float k = has_scale ? scale[r] : 1.0f;
        dst[i] = src[(size_t)idx[r] * dim + j] * k;
    }
}
// dst[idx[r], :] += src[r, :] * (has_scale ? scale[r] : 1). The rows idx names are distinct
// (an expert's tokens), so no two threads add to one element: deterministic without atomics.
extern "C" __global__ void scatter_add_rows_f32(const float* src, const unsigned int* idx, const float* scale, int has_scale,
                                                float* dst, size_t rows, size_t dim) {
    const size_t n = rows * dim;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / dim, j = i % dim;
        const float k = has_scale ? scale[r] : 1.0f;
        dst[(size_t)idx[r] * dim + j] += src[i] * k;
    }
}
// out[r] = sum_j a[r, j] b[r, j], one thread per row, in order (f32 accumulation).
extern "C" __global__ void row_dot_f32(const float* a, const float* b, float* out, size_t rows, size_t dim) {
    for (size_t r = (size_t)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += (size_t)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (size_t j = 0; j < dim; ++j) acc += a[r * dim + j] * b[r * dim + j];
        out[r] = acc;
    }
}
// out = a / b
extern "C" __global__ void div_f32(const float* a, const float* b, float* out, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = a[i] / b[i];
}
