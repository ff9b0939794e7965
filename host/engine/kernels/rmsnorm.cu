// RMSNorm forward and input-gradient, one block per row. Kernel suffix = dtype of the weight w.
//   x, y, dy, dx [rows, dim] f32; w [dim]; rstd [rows] f32.
//   y = x * rstd * w,  rstd = 1/sqrt(mean(x^2) + eps)
//   dx (+)= rstd * (w*dy - xhat * mean(w*dy*xhat)),  xhat = x * rstd

template <typename W>
__device__ void rmsnorm_fwd(const float* x, const W* w, float* y, float* rstd, int rows, int dim, float eps) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    const float r = rsqrtf(ss / (float)dim + eps);
    float* yr = y + (size_t)row * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * r * to_f32(w[i]);
    if (threadIdx.x == 0) rstd[row] = r;
}

template <typename W>
__device__ void rmsnorm_bwd(const float* dy, const float* x, const W* w, const float* rstd, float* dx,
                            int rows, int dim, int accumulate) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * dim;
    const float* dyr = dy + (size_t)row * dim;
    const float r = rstd[row];
    float dot = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dot += to_f32(w[i]) * dyr[i] * xr[i] * r;
    const float mean = block_sum(dot, scratch) / (float)dim;
    float* dxr = dx + (size_t)row * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float g = r * (to_f32(w[i]) * dyr[i] - xr[i] * r * mean);
        dxr[i] = accumulate ? dxr[i] + g : g;
    }
}

extern "C" __global__ void rmsnorm_fwd_f32(const float* x, const float* w, float* y, float* rstd, int rows, int dim, float eps) {
    rmsnorm_fwd(x, w, y, rstd, rows, dim, eps);
}
extern "C" __global__ void rmsnorm_fwd_bf16(const float* x, const bf16* w, float* y, float* rstd, int rows, int dim, float eps) {
    rmsnorm_fwd(x, w, y, rstd, rows, dim, eps);
}
extern "C" __global__ void rmsnorm_bwd_f32(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                                           int rows, int dim, int accumulate) {
    rmsnorm_bwd(dy, x, w, rstd, dx, rows, dim, accumulate);
}
extern "C" __global__ void rmsnorm_bwd_bf16(const float* dy, const float* x, const bf16* w, const float* rstd, float* dx,
                                            int rows, int dim, int accumulate) {
    rmsnorm_bwd(dy, x, w, rstd, dx, rows, dim, accumulate);
}
