// AdamW, as torch.optim.AdamW (non-amsgrad, non-maximize) computes it. All f32, [n].
//   g = grad * grad_scale; p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps), step_size = lr / (1 - b1^step),
//   bc2_sqrt = sqrt(1 - b2^step) (both computed on the host in f64).
extern "C" __global__ void adamw_f32(float* param, const float* grad, float* m, float* v, size_t n, float lr,
                                     float beta1, float beta2, float eps, float weight_decay, float step_size,
                                     float bc2_sqrt, float grad_scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = grad[i] * grad_scale;
        float p = param[i] * (1.0f - lr * weight_decay);
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        p -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        param[i] = p;
        m[i] = mi;
        v[i] = vi;
    }
}
